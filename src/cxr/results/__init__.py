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

__all__ = [
    "COLUMNS",
    "DEFAULT_STORE_NAME",
    "STATUSES",
    "ResultsStore",
    "StoreError",
    "open_store",
    "rows_table",
]
