"""What every dataset reader returns (:class:`LabeledData`), the cell parsers the readers
share, and how the images of a table are found below its image root."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.data.schema import AGE_COLUMN, IMAGE_COLUMN, LABEL_VALUES, PATH_COLUMN
from cxr.errors import DataError
from cxr.extras import require

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([YMDW]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def line_namer(path: Path):
    def where(row: int) -> str:
        # Line numbers as a user sees them in an editor: the header is line 1.
        return f"{path}, line {row + 2}: "

    return where


@dataclass
class LabeledData:
    """One row per image (:mod:`cxr.data.schema`), the labels in order, and where they came
    from. ``layout`` is the name of the layout that read it
    (:func:`cxr.data.layouts.get_layout` gives its :class:`~cxr.data.layouts.Layout`)."""

    table: pd.DataFrame
    labels: tuple[str, ...]
    layout: str
    source: Path
    image_root: Path | None = None
    dropped_missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        """What a split folder and a run record about the data (``dataset.json``)."""
        return {"layout": self.layout, "labels": list(self.labels), "source": str(self.source)}


def read_text_table(path: Path, max_bytes: int = 4 << 30) -> pd.DataFrame:
    """A CSV (optionally gzipped) or Parquet file, every cell as text ('' for blank)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size > max_bytes:
        raise DataError(f"{path}: {size:,} bytes is more than a label table may be")
    if path.suffix.lower() in (".parquet", ".pq"):
        # pandas reads Parquet through pyarrow
        require("parquet", f"reading a Parquet table ({path}; or give it as CSV)")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pd.read_parquet(path).astype("string").fillna("").astype(str)
        else:
            table = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the table is empty") from None
    except UnicodeDecodeError as exc:
        where = _first_non_utf8_line(path)
        raise DataError(f"{path}{where}: not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    except (ImportError, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable table ({exc})") from None
    if path.suffix.lower() not in (".parquet", ".pq"):
        _refuse_duplicate_header(path)
    table = table.rename(columns=lambda c: str(c).strip())
    if table.empty:
        raise DataError(f"{path}: the table has a header but no rows")
    return table


def _open_text(path: Path):
    import gzip

    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _refuse_duplicate_header(path: Path) -> None:
    """pandas renames a repeated column (``site``, ``site.1``): which one a user meant is
    not ours to guess."""
    import csv

    with _open_text(path) as handle:
        header = next(csv.reader(handle), [])
    seen: set[str] = set()
    for name in (column.strip() for column in header):
        if name in seen:
            raise DataError(f"{path}, line 1: the column {name!r} appears more than once")
        seen.add(name)


def _first_non_utf8_line(path: Path) -> str:
    """', line N' of the first line that is not UTF-8 (pandas' error gives an offset into
    its own buffer, not the file), or '' when it cannot be found."""
    import gzip

    try:
        opener = gzip.open if path.suffix.lower() == ".gz" else open
        with opener(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return f", line {number}"
    except OSError:
        pass
    return ""


def parse_label_cells(cells: pd.Series, label: str, where) -> pd.Series:
    """1 / 0 / -1 / blank (also written 1.0, 0.0, -1.0) to floats, blank as NaN; anything
    else raises a :class:`DataError` naming the line, the label and the value."""
    stripped = cells.astype(str).str.strip()
    values = pd.to_numeric(stripped.replace("", np.nan), errors="coerce")
    bad = (stripped != "") & ~values.isin(LABEL_VALUES)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{where(row)}label {label!r} is {cells.iloc[row]!r}; "
            "expected 1 (positive), 0 (negative), -1 (uncertain) or blank (unknown)"
        )
    return values.astype(np.float32)


def normalise_sex(value: str) -> str:
    text = str(value).strip().upper()
    return {"MALE": "M", "FEMALE": "F", "M": "M", "F": "F"}.get(text, "")


def parse_age_years(value) -> float:
    """v2020 ages are integers; v2017 ages look like ``058Y``, ``011M`` or ``005D``."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return float("nan")
    match = _AGE.match(str(value))
    if not match:
        raise ValueError(f"unreadable age {value!r}")
    return float(match.group(1)) * _AGE_UNIT_YEARS[match.group(2).upper()]


def parse_ages(cells: pd.Series, where, column: str = AGE_COLUMN) -> list[float]:
    ages = []
    for row, value in enumerate(cells.to_numpy()):
        try:
            ages.append(parse_age_years(value) if str(value).strip() else float("nan"))
        except ValueError as exc:
            raise DataError(f"{where(row)}{exc} in {column!r}") from None
    return ages


def check_unique_images(table: pd.DataFrame, where) -> None:
    duplicated = table[IMAGE_COLUMN].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        name = table[IMAGE_COLUMN].iloc[row]
        first = int(np.flatnonzero((table[IMAGE_COLUMN] == name).to_numpy())[0])
        raise DataError(f"{where(row)}image {name!r} is listed again (first on line {first + 2})")


# ---------------------------------------------------------------------------------------------
# Image files


def resolve_paths(data: LabeledData, *, drop_missing: bool = False) -> LabeledData:
    """Each image's file below the image root (relative names) or as given (absolute ones);
    missing files raise a :class:`DataError` naming them, or are dropped with a note."""
    root = data.image_root or data.source.parent
    names = data.table[IMAGE_COLUMN].astype(str)
    paths, exists = image_files(data)
    missing = names[~exists].tolist()
    if missing and not drop_missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"{data.source}: {len(missing):,} of {len(names):,} listed image(s) are not on disk "
            f"below {root} (first: {shown}); pass --drop-missing to go on without them"
        )
    table = data.table.assign(**{PATH_COLUMN: [os.path.abspath(p) for p in paths]})
    if missing:
        table = table[exists].reset_index(drop=True)
        data.notes.append(f"dropped {len(missing):,} image(s) not found on disk")
        if table.empty:
            raise DataError(f"{root}: none of the listed images is on disk")
    data.table, data.dropped_missing = table, missing
    return data


def image_files(data: LabeledData) -> tuple[list[str], np.ndarray]:
    """Each image's file path, and whether it is a file on disk."""
    root = data.image_root or data.source.parent
    names = data.table[IMAGE_COLUMN].astype(str)
    paths = [name if os.path.isabs(name) else os.path.join(root, name) for name in names]
    exists = np.fromiter((os.path.isfile(p) for p in paths), dtype=bool, count=len(paths))
    return paths, exists
