"""Every result of the DICOM listener, one row per instance (:mod:`cxr.results.store`)."""

from cxr.results.store import (
    COLUMNS,
    STATUSES,
    ResultsStore,
    StoreError,
    open_store,
    rows_table,
)

DEFAULT_STORE_NAME = "results.sqlite"


def existing_store(source: str) -> str:
    """The store a reader names: a database URL, an SQLite file, or a run folder (its
    ``results.sqlite``). A path that holds no store is an error: reading must never create
    an empty store in its place."""
    from pathlib import Path

    from cxr.errors import ConfigError

    if "://" in source:
        import sqlalchemy as sa

        try:
            url = sa.make_url(source)
        except Exception:  # open_store names the problem
            return source
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return source
        path = Path(url.database)
        if not path.is_file():
            raise ConfigError(f"{path}: no results store here (cxr dicom listen writes one)")
        return source
    path = Path(source)
    if path.is_dir():
        path = path / DEFAULT_STORE_NAME
    if not path.is_file():
        raise ConfigError(f"{path}: no results store here (cxr dicom listen writes one)")
    return str(path)


def open_existing_store(source: str) -> ResultsStore:
    """The store a reader names (:func:`existing_store`), opened without creating anything:
    a database that holds no results table is refused too."""
    return open_store(existing_store(source), create=False)


__all__ = [
    "COLUMNS",
    "DEFAULT_STORE_NAME",
    "STATUSES",
    "ResultsStore",
    "StoreError",
    "existing_store",
    "open_existing_store",
    "open_store",
    "rows_table",
]
