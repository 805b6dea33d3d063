"""The generic layout: a CSV or Parquet table of the user's own images, described by a
:class:`~cxr.data.spec.DatasetSpec` (``--image-col``, ``--patient-col``, ``--labels``, ... or a
dataset file).

One column names the image (a path relative to the image root - by default the table's folder
- or absolute), one the patient, one per label (1 / 0 / -1 / blank); optional ones the view,
sex and age. The table's other columns (a site, a scanner) travel with the images as text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxr.data.layouts.registry import Layout, register
from cxr.data.schema import (
    AGE_YEARS_COLUMN,
    IMAGE_COLUMN,
    LABEL_VALUES,
    OWN_COLUMNS,
    PATIENT_COLUMN,
    SEX_COLUMN,
    VIEW_COLUMN,
)
from cxr.data.spec import DATASET_FILES, DatasetSpec
from cxr.data.table import (
    LabeledData,
    check_unique_images,
    line_namer,
    normalise_sex,
    parse_ages,
    parse_label_cells,
    read_text_table,
)
from cxr.errors import DataError
from cxr.labels import label_name_problem


def read_generic(source: Path, spec: DatasetSpec) -> LabeledData:
    """A CSV or Parquet table of the user's own images: one column names the image (a path,
    relative to ``image_root`` - by default the table's folder - or absolute), one the patient,
    one per label (1 / 0 / -1 / blank)."""
    table_path = Path(spec.table) if spec.table else source
    if table_path.is_dir():
        raise DataError(
            f"{table_path}: a folder; name the table (a CSV or Parquet file) or give a dataset "
            f"file ({' or '.join(DATASET_FILES)}) in it"
        )
    for option, value in (("--image-col", spec.image_col), ("--patient-col", spec.patient_col)):
        if not value:
            raise DataError(f"{table_path}: a generic table needs {option} (or a dataset file)")
    raw = read_text_table(table_path)
    where = line_namer(table_path)
    named = [spec.image_col, spec.patient_col, spec.view_col, spec.sex_col, spec.age_col]
    missing = [c for c in [*named, *(spec.labels or ())] if c and c not in raw.columns]
    if missing:
        raise DataError(
            f"{table_path}: missing column(s) {', '.join(map(repr, missing))}; "
            f"found {', '.join(map(repr, raw.columns))}"
        )
    labels = spec.labels or infer_label_columns(raw, {c for c in named if c}, table_path)
    for label in labels:
        problem = label_name_problem(label)
        if problem:
            shown = repr(label[:60]) + ("..." if len(label) > 60 else "")
            raise DataError(f"{table_path}: the label column {shown} cannot be a label: {problem}")
    table = pd.DataFrame(
        {
            IMAGE_COLUMN: raw[spec.image_col].str.strip(),
            PATIENT_COLUMN: raw[spec.patient_col].str.strip(),
        }
    )
    for column, name in ((IMAGE_COLUMN, spec.image_col), (PATIENT_COLUMN, spec.patient_col)):
        empty = np.flatnonzero((table[column] == "").to_numpy())
        if len(empty):
            what = "no patient id" if column == PATIENT_COLUMN else "no image"
            raise DataError(f"{where(int(empty[0]))}{what} (column {name!r} is empty)")
    for label in labels:
        table[label] = parse_label_cells(raw[label], label, where)
    _add_demographics(table, raw, spec, where)
    _keep_other_columns(table, raw, {c for c in named if c} | set(labels))
    check_unique_images(table, where)
    root = Path(spec.image_root) if spec.image_root else table_path.parent
    return LabeledData(
        table=table, labels=tuple(labels), layout=LAYOUT.name, source=table_path, image_root=root
    )


def _keep_other_columns(table: pd.DataFrame, raw: pd.DataFrame, used: set[str]) -> None:
    """The table's other columns (a site, a scanner) travel with the images, as text, so
    that splits keep them and ``--subgroup site`` can group by them."""
    for column in raw.columns:
        if column not in used and column not in OWN_COLUMNS and column not in table.columns:
            table[column] = raw[column].to_numpy()


def infer_label_columns(raw: pd.DataFrame, taken: set[str], path: Path) -> list[str]:
    """Without ``--labels``: every other column whose cells are all 1 / 0 / -1 / blank and
    which has a positive."""
    labels = []
    for column in raw.columns:
        if column in taken:
            continue
        values = pd.to_numeric(raw[column].str.strip().replace("", np.nan), errors="coerce")
        filled = raw[column].str.strip() != ""
        if filled.any() and values[filled].isin(LABEL_VALUES).all() and (values == 1).any():
            labels.append(column)
    if not labels:
        raise DataError(
            f"{path}: no label column found (columns of 1 / 0 / -1 / blank); name them with "
            "--labels A,B,C"
        )
    return labels


def _add_demographics(table: pd.DataFrame, raw: pd.DataFrame, spec: DatasetSpec, where) -> None:
    if spec.view_col:
        table[VIEW_COLUMN] = raw[spec.view_col].str.strip().str.upper()
    if spec.sex_col:
        table[SEX_COLUMN] = raw[spec.sex_col].map(normalise_sex)
    if spec.age_col:
        table[AGE_YEARS_COLUMN] = parse_ages(raw[spec.age_col], where, spec.age_col)


def _detect(source: Path, spec: DatasetSpec) -> bool:
    """Options or a dataset file that describe a table choose this layout before any file
    is looked at."""
    return spec.describes_table or source.suffix.lower() == ".toml"


LAYOUT = register(
    Layout(
        name="generic",
        title="your own table",
        short_name="generic",
        read=read_generic,
        detect=_detect,
        priority=0,
    )
)
