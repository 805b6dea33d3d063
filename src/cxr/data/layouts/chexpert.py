"""CheXpert's layout: ``train.csv`` / ``valid.csv`` and the images they name.

A row is one image: ``Path`` (``CheXpert-v1.0[-small]/train/patientNNNNN/studyN/viewN_....jpg``),
``Sex``, ``Age``, ``Frontal/Lateral``, ``AP/PA`` and the 14 observations, each ``1`` (positive),
``0`` (negative), ``-1`` (uncertain) or blank (not mentioned: unknown). The patient is the
``patientNNNNN`` part of the path (CheXpert has no patient column). ``Path`` starts with the
download's own folder name, so images are looked for below the folder that holds that folder
(keep the download's folder name, or point ``--image-root`` at a folder that has it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.data.layouts.registry import Layout, register
from cxr.data.schema import (
    AGE_YEARS_COLUMN,
    FRONTAL_LATERAL_COLUMN,
    IMAGE_COLUMN,
    PATIENT_COLUMN,
    SEX_COLUMN,
    SOURCE_SPLIT_COLUMN,
    VIEW_COLUMN,
)
from cxr.data.spec import DatasetSpec
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
from cxr.labels import CHEXPERT_LABELS

CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS)
PATIENT_PATTERN = r"(patient\d+)/"
LABEL_VALUES = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}
TABLE_NAMES = ("train.csv", "valid.csv")


def is_chexpert_table(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a CSV (or ``.csv.gz``) whose header is CheXpert's."""
    try:
        header = pd.read_csv(path, nrows=0).columns
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError, EOFError):
        return False
    return list(header[:5]) == list(CHEXPERT_COLUMNS[:5])


def find_tables(folder: Path, *, required: bool = True) -> list[Path]:
    """``train.csv`` and ``valid.csv`` (or ``.csv.gz``) in ``folder`` or one level down
    (``CheXpert-v1.0-small/``), CheXpert's header checked."""
    for place in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())][:64]:
        found = []
        for name in TABLE_NAMES:
            for candidate in (place / name, place / f"{name}.gz"):
                if candidate.is_file() and is_chexpert_table(candidate):
                    found.append(candidate)
                    break
        if found:
            return found
    if required:
        raise DataError(f"{folder}: no CheXpert train.csv / valid.csv here or one level down")
    return []


def read_chexpert(path: str | os.PathLike) -> pd.DataFrame:
    """One CheXpert table with a ``Patient ID`` column added; label cells as floats (NaN =
    blank). Raises :class:`DataError` naming the file, and the line where there is one, for
    missing columns, a label value other than 1 / 0 / -1 / blank, or a path without a patient.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    table = read_text_table(path)
    missing = [c for c in CHEXPERT_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}")
    where = line_namer(path)
    for label in CHEXPERT_LABELS:
        table[label] = parse_label_cells(table[label], label, where)
    patients = table["Path"].str.extract(PATIENT_PATTERN, expand=False)
    if patients.isna().any():
        row = int(np.flatnonzero(patients.isna().to_numpy())[0])
        raise DataError(
            f"{where(row)}no patient in the path {table['Path'].iloc[row]!r} "
            "(expected .../patientNNNNN/...)"
        )
    return table.assign(**{PATIENT_COLUMN: patients})


def read_layout(source: Path, image_root: str | None = None) -> LabeledData:
    """A CheXpert folder (both tables, ``source_split`` telling which) or one of its tables,
    as the canonical image table."""
    paths = [source] if source.is_file() else find_tables(source)
    frames = []
    for path in paths:
        frame = to_canonical(read_chexpert(path), path)
        frame[SOURCE_SPLIT_COLUMN] = "valid" if path.name.startswith("valid") else "train"
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    check_unique_images(table, line_namer(paths[0]))
    root = Path(image_root) if image_root else _image_root(paths[0])
    return LabeledData(
        table=table, labels=CHEXPERT_LABELS, layout=LAYOUT.name, source=paths[0], image_root=root
    )


def to_canonical(raw: pd.DataFrame, path: Path) -> pd.DataFrame:
    frontal = raw["Frontal/Lateral"].str.strip() == "Frontal"
    view = raw["AP/PA"].str.strip().str.upper().where(frontal, "LATERAL")
    table = pd.DataFrame(
        {
            IMAGE_COLUMN: raw["Path"].str.strip(),
            PATIENT_COLUMN: raw[PATIENT_COLUMN],
            SEX_COLUMN: raw["Sex"].map(normalise_sex),
            AGE_YEARS_COLUMN: parse_ages(raw["Age"], line_namer(path), "Age"),
            VIEW_COLUMN: view,
            FRONTAL_LATERAL_COLUMN: raw["Frontal/Lateral"].str.strip(),
        }
    )
    for label in CHEXPERT_LABELS:
        table[label] = raw[label].astype(np.float32)
    return table


def _image_root(table_path: Path) -> Path:
    """``Path`` is ``CheXpert-v1.0-small/train/...``: relative to the folder that holds the
    download's folder, where the table sits (``--image-root`` names another)."""
    return table_path.parent.parent


def chexpert_stats(table: pd.DataFrame) -> dict:
    """Images, patients, views, and per label the positive / negative / uncertain / blank
    counts (of a table from :func:`read_chexpert`)."""
    views = table["Frontal/Lateral"].value_counts()
    labels = {}
    for label in CHEXPERT_LABELS:
        column = table[label]
        counts = {name: int((column == value).sum()) for value, name in LABEL_VALUES.items()}
        labels[label] = {**counts, "blank": int(column.isna().sum())}
    return {
        "layout": LAYOUT.name,
        "images": len(table),
        "patients": int(table[PATIENT_COLUMN].nunique()),
        "frontal": int(views.get("Frontal", 0)),
        "lateral": int(views.get("Lateral", 0)),
        "labels": labels,
    }


def _detect(source: Path, spec: DatasetSpec) -> bool:
    del spec
    if source.is_file():
        return is_chexpert_table(source)
    return bool(find_tables(source, required=False))


LAYOUT = register(
    Layout(
        name="chexpert",
        title="CheXpert",
        files="CheXpert's train/valid CSV",
        read=lambda source, spec: read_layout(source, spec.image_root),
        detect=_detect,
        priority=20,
        labels=CHEXPERT_LABELS,
        description="CheXpert (Stanford Hospital chest radiographs)",
        label_source="CheXpert labeller on the reports: positive, negative, uncertain, blank",
        limitation=(
            "CheXpert's labels come from a rule-based report labeller with uncertain (-1) and "
            "blank (not mentioned) labels; the uncertainty policy used in training is stated "
            "above."
        ),
    )
)
