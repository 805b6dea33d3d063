"""CheXpert's label tables (``train.csv`` / ``valid.csv``): reading, checking and statistics.

A row is one image: ``Path`` (``CheXpert-v1.0[-small]/train/patientNNNNN/studyN/viewN_....jpg``),
``Sex``, ``Age``, ``Frontal/Lateral``, ``AP/PA`` and the 14 observations, each ``1`` (positive),
``0`` (negative), ``-1`` (uncertain) or blank (not mentioned: unknown). The patient is the
``patientNNNNN`` part of the path (CheXpert has no patient column). The first step towards
training on CheXpert (issue 15): the table alone, no images needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.errors import DataError

CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS)
PATIENT_PATTERN = r"(patient\d+)/"
LABEL_VALUES = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}


def is_chexpert_table(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a CSV (or ``.csv.gz``) whose header is CheXpert's."""
    try:
        header = pd.read_csv(path, nrows=0).columns
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError):
        return False
    return list(header[:5]) == list(CHEXPERT_COLUMNS[:5])


def read_chexpert(path: str | os.PathLike) -> pd.DataFrame:
    """The table with a ``Patient ID`` column added; label cells as floats (NaN = blank).

    Raises :class:`DataError` naming the file, and the line where there is one, for missing
    columns, a label value other than 1 / 0 / -1 / blank, or a path without a patient.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None
    missing = [c for c in CHEXPERT_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}")
    for label in CHEXPERT_LABELS:
        table[label] = _label_column(table[label], label, path)
    patients = table["Path"].str.extract(PATIENT_PATTERN, expand=False)
    if patients.isna().any():
        row = int(np.flatnonzero(patients.isna().to_numpy())[0])
        raise DataError(
            f"{path}, line {row + 2}: no patient in the path {table['Path'].iloc[row]!r} "
            "(expected .../patientNNNNN/...)"
        )
    return table.assign(**{"Patient ID": patients})


def _label_column(cells: pd.Series, label: str, path: Path) -> pd.Series:
    stripped = cells.str.strip()
    values = pd.to_numeric(stripped.replace("", np.nan), errors="coerce")
    bad = (stripped != "") & ~values.isin(list(LABEL_VALUES))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{path}, line {row + 2}: {label} is {cells.iloc[row]!r}; expected 1, 0, -1 or blank"
        )
    return values


def chexpert_stats(table: pd.DataFrame) -> dict:
    """Images, patients, views, and per label the positive / negative / uncertain / blank
    counts."""
    views = table["Frontal/Lateral"].value_counts()
    labels = {}
    for label in CHEXPERT_LABELS:
        column = table[label]
        counts = {name: int((column == value).sum()) for value, name in LABEL_VALUES.items()}
        labels[label] = {**counts, "blank": int(column.isna().sum())}
    return {
        "layout": "chexpert",
        "images": len(table),
        "patients": int(table["Patient ID"].nunique()),
        "frontal": int(views.get("Frontal", 0)),
        "lateral": int(views.get("Lateral", 0)),
        "labels": labels,
    }
