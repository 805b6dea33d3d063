"""Every dataset cxr reads, as one image table: NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG, a
generic table of the user's own images, or any layout registered in :mod:`cxr.data.layouts`.

Whatever the layout, :func:`read_dataset` returns a :class:`LabeledData` whose table has one
row per image with the columns of :mod:`cxr.data.schema`; the labels travel with the table
(:attr:`LabeledData.labels`), into the split folder (``dataset.json``), the run and the bundle.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.config import UNCERTAIN_POLICIES
from cxr.data.layouts import detect_layout, generic, get_layout
from cxr.data.schema import (
    AGE_YEARS_COLUMN,
    FRONTAL_LATERAL_COLUMN,
    FRONTAL_VIEWS,
    PATIENT_COLUMN,
    SEX_COLUMN,
    UNCERTAIN,
    VIEW_COLUMN,
)
from cxr.data.spec import ALL_VIEWS, AUTO, DATASET_FILES, DatasetSpec, split_names
from cxr.data.table import LabeledData, image_files, resolve_paths
from cxr.errors import DataError
from cxr.labels import PATHOLOGIES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Kept importable from here: what a caller of read_dataset needs besides it.
__all__ = [
    "ALL_VIEWS",
    "DATASET_FILES",
    "DatasetSpec",
    "LabeledData",
    "dataset_summary",
    "find_images",
    "image_files",
    "label_counts",
    "label_matrix",
    "load_dataset_spec",
    "read_dataset",
    "resolve_paths",
    "resolve_spec",
    "select_views",
    "split_names",
]

# A dataset file is read whole; this cap refuses a hostile one before it is parsed.
MAX_DATASET_FILE_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------
# Reading


def read_dataset(
    source: str | os.PathLike,
    spec: DatasetSpec | None = None,
    *,
    require_images: bool = True,
    drop_missing: bool = False,
) -> LabeledData:
    """Read the dataset at ``source`` (a folder, a table, or a dataset file).

    With ``require_images`` every image is looked for and a missing one raises a
    :class:`DataError` naming it, unless ``drop_missing``; without it the table alone is
    read (statistics and splits need no images).
    """
    source = Path(source)
    spec = resolve_spec(source, spec)
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    layout = get_layout(spec.layout) if spec.layout != AUTO else detect_layout(source, spec)
    data = select_views(layout.read(source, spec), spec.views)
    if require_images:
        data = find_images(data, drop_missing=drop_missing)
    return data


def resolve_spec(source: str | os.PathLike, spec: DatasetSpec | None = None) -> DatasetSpec:
    """``spec`` over the dataset file that ``source`` is or holds (options win)."""
    source = Path(source)
    spec = spec or DatasetSpec()
    if source.is_file() and source.suffix.lower() in (".toml", ".json"):
        return load_dataset_spec(source).merged(spec)
    if source.is_dir() and not spec.describes_table:
        for name in DATASET_FILES:
            if (source / name).is_file():
                return load_dataset_spec(source / name).merged(spec)
    return spec


def find_images(data: LabeledData, *, drop_missing: bool = False) -> LabeledData:
    """``data`` with each image's file in ``path``, found as its layout finds them."""
    return get_layout(data.layout).find_images([data], drop_missing=drop_missing)[0]


def load_dataset_spec(path: str | os.PathLike) -> DatasetSpec:
    """A dataset file (TOML or JSON): ``table``, ``image_col``, ``patient_col``, ``labels``
    and optionally ``view_col``, ``sex_col``, ``age_col``, ``image_root``, ``views``, ``layout``.
    Relative paths are relative to the file."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_DATASET_FILE_BYTES:
            raise DataError(f"{path}: a dataset file of {path.stat().st_size:,} bytes is too big")
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the dataset file ({exc.strerror or exc})") from None
    try:
        values = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise DataError(f"{path}: not valid {path.suffix.lstrip('.')} ({exc})") from None
    if not isinstance(values, dict):
        raise DataError(f"{path}: expected a table of settings")
    values = values.get("dataset", values)
    known = {f.name for f in fields(DatasetSpec)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DataError(
            f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    for key in ("table", "image_root"):
        if isinstance(values.get(key), str):
            values[key] = str(path.parent / values[key])
    if "layout" not in values:
        values["layout"] = generic.LAYOUT.name
    return DatasetSpec(**values)


# ---------------------------------------------------------------------------------------------
# Views


def select_views(data: LabeledData, views: tuple[str, ...] | None) -> LabeledData:
    """Keep the frontal views where the table says which they are (``views`` None), the
    named ``View Position`` values, or every image (``("all",)``)."""
    table = data.table
    if views and ALL_VIEWS in (v.lower() for v in views):
        return data
    if VIEW_COLUMN not in table.columns:
        if views:
            raise DataError(f"{data.source}: --views needs a view column; this table has none")
        return data
    position = table[VIEW_COLUMN].astype(str).str.strip().str.upper()
    if views:
        keep = position.isin([v.upper() for v in views])
    elif FRONTAL_LATERAL_COLUMN in table.columns:
        keep = table[FRONTAL_LATERAL_COLUMN] == "Frontal"
    else:
        keep = position.isin(FRONTAL_VIEWS)
    dropped = int((~keep).sum())
    if not dropped:
        return data
    shown = ", ".join(sorted(set(position[~keep]) - {""}) or ["blank"])
    data.notes.append(
        f"kept {int(keep.sum()):,} of {len(table):,} images: left out {dropped:,} of other "
        f"views ({shown}); --views chooses (e.g. --views PA,AP,LATERAL, or --views all)"
    )
    if not keep.any():
        raise DataError(f"{data.source}: no image of the chosen views is left")
    data.table = table[keep.to_numpy()].reset_index(drop=True)
    return data


# ---------------------------------------------------------------------------------------------
# Labels as a matrix


def label_matrix(
    frame: pd.DataFrame,
    labels: tuple[str, ...] | list[str] = PATHOLOGIES,
    *,
    uncertain: str = "ignore",
) -> np.ndarray:
    """``[images, labels]`` float32: 1 / 0, NaN for unknown; uncertain (-1) cells follow the
    policy (Irvin et al. 2019): ``ignore`` makes them unknown (U-Ignore), ``zeros`` negative
    (U-Zeros), ``ones`` positive (U-Ones)."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise DataError(
            f"unknown uncertain-label policy {uncertain!r}; choose {', '.join(UNCERTAIN_POLICIES)}"
        )
    missing = [name for name in labels if name not in frame.columns]
    if missing:
        raise DataError(f"the table has no column for label(s) {', '.join(map(repr, missing))}")
    matrix = frame[list(labels)].to_numpy(dtype=np.float32, na_value=np.nan, copy=True)
    replacement = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[uncertain]
    matrix[matrix == UNCERTAIN] = replacement
    return matrix


def label_counts(frame: pd.DataFrame, labels) -> dict[str, dict[str, int]]:
    """Per label: positive, negative, uncertain and blank (unknown) cells."""
    counts = {}
    for name in labels:
        column = frame[name].astype(np.float32)
        counts[name] = {
            "positive": int((column == 1).sum()),
            "negative": int((column == 0).sum()),
            "uncertain": int((column == UNCERTAIN).sum()),
            "blank": int(column.isna().sum()),
        }
    return counts


def dataset_summary(data: LabeledData) -> dict[str, Any]:
    """What ``cxr data stats`` shows for any layout: images, patients, views (and how many
    are frontal), sex, age, and per label the positive / negative / uncertain / blank cells
    with the share of images positive."""
    table = data.table
    stats: dict[str, Any] = {
        "layout": data.layout,
        "table": str(data.source),
        "images": len(table),
        "patients": int(table[PATIENT_COLUMN].nunique()),
    }
    if FRONTAL_LATERAL_COLUMN in table.columns:
        stats["frontal"] = int((table[FRONTAL_LATERAL_COLUMN] == "Frontal").sum())
    elif VIEW_COLUMN in table.columns:
        stats["frontal"] = int(table[VIEW_COLUMN].isin(FRONTAL_VIEWS).sum())
    if VIEW_COLUMN in table.columns:
        stats["views"] = _counts(table[VIEW_COLUMN].replace("", "(blank)"))
    if SEX_COLUMN in table.columns:
        stats["sex"] = _counts(table[SEX_COLUMN].replace("", "(unknown)"))
    if AGE_YEARS_COLUMN in table.columns and table[AGE_YEARS_COLUMN].notna().any():
        ages = table[AGE_YEARS_COLUMN]
        stats["age_years"] = {
            "min": float(ages.min()),
            "max": float(ages.max()),
            "median": float(ages.median()),
        }
    labels = label_counts(table, data.labels)
    for entry in labels.values():
        entry["prevalence"] = entry["positive"] / len(table) if len(table) else None
    stats["labels"] = labels
    return stats


def _counts(column: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in column.value_counts().items()}
