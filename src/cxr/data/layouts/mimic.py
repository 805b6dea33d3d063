"""MIMIC-CXR-JPG's layout (v2.0.0): three tables and ``files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg``.

- ``mimic-cxr-2.0.0-chexpert.csv(.gz)``: one row per study (``subject_id``, ``study_id``),
  the 14 CheXpert labeller observations as 1.0 / 0.0 / -1.0 / blank;
- ``mimic-cxr-2.0.0-metadata.csv(.gz)``: one row per image (``dicom_id``, ``subject_id``,
  ``study_id``, ``ViewPosition``, ...);
- ``mimic-cxr-2.0.0-split.csv(.gz)``: each image's official ``split`` (train / validate / test).

Labels are per study, so every image of a study gets its study's labels; the patient is
``subject_id``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.data.layouts.registry import Layout, register
from cxr.data.schema import IMAGE_COLUMN, PATIENT_COLUMN, SOURCE_SPLIT_COLUMN, VIEW_COLUMN
from cxr.data.spec import DatasetSpec
from cxr.data.table import (
    LabeledData,
    line_namer,
    parse_label_cells,
    read_text_table,
)
from cxr.errors import DataError
from cxr.labels import MIMIC_LABELS

PREFIX = "mimic-cxr-2.0.0-"
TABLES = {"labels": "chexpert", "metadata": "metadata", "split": "split"}
KEYS = {
    "labels": ("subject_id", "study_id", *MIMIC_LABELS),
    "metadata": ("dicom_id", "subject_id", "study_id", "ViewPosition"),
    "split": ("dicom_id", "split"),
}
_IDS = r"\d+"


def is_mimic_table(path: str | os.PathLike) -> bool:
    return Path(path).name.startswith(PREFIX + TABLES["labels"] + ".csv")


def find_tables(folder: Path, *, required: bool = True) -> dict[str, Path]:
    """The three tables in ``folder`` (or one level down); the split table is optional."""
    places = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())[:64]]
    for place in places:
        found = {}
        for key, stem in TABLES.items():
            for name in (f"{PREFIX}{stem}.csv", f"{PREFIX}{stem}.csv.gz"):
                if (place / name).is_file():
                    found[key] = place / name
        if "labels" in found:
            if "metadata" not in found:
                raise DataError(
                    f"{place}: {found['labels'].name} is here but not {PREFIX}metadata.csv(.gz),"
                    " which says which images each study has"
                )
            return found
    if required:
        raise DataError(f"{folder}: no {PREFIX}chexpert.csv(.gz) here or one level down")
    return {}


def _read(path: Path, key: str) -> pd.DataFrame:
    table = read_text_table(path)
    missing = [c for c in KEYS[key] if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}")
    where = line_namer(path)
    for column in ("subject_id", "study_id"):
        if column in table.columns:
            bad = ~table[column].str.strip().str.fullmatch(_IDS)
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                value = table[column].iloc[row]
                raise DataError(f"{where(row)}{column} is {value!r}, not a number")
            table[column] = table[column].str.strip()
    return table


def read_layout(source: Path, image_root: str | None = None) -> LabeledData:
    """The images of the metadata table, each with its study's labels, as the canonical table.
    Images whose study has no label row, or only blank labels, are left out (with a note):
    they would count for nothing in training or evaluation."""
    folder = source.parent if source.is_file() else source
    paths = find_tables(folder)
    labels = _read(paths["labels"], "labels")
    where = line_namer(paths["labels"])
    for name in MIMIC_LABELS:
        labels[name] = parse_label_cells(labels[name], name, where)
    duplicated = labels.duplicated(["subject_id", "study_id"])
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DataError(f"{where(row)}study {labels['study_id'].iloc[row]} is listed again")
    images = _read(paths["metadata"], "metadata")
    images["dicom_id"] = images["dicom_id"].str.strip()
    table = images.merge(
        labels[["subject_id", "study_id", *MIMIC_LABELS]],
        on=["subject_id", "study_id"],
        how="left",
        indicator=True,
        validate="many_to_one",
    )
    no_row = int((table.pop("_merge") != "both").sum())
    known = labels_known(table)
    unlabelled = int((~known).sum())
    table = table[known].reset_index(drop=True)
    canonical = _canonical(table)
    if "split" in paths:
        canonical[SOURCE_SPLIT_COLUMN] = _official_split(paths["split"], table)
    data = LabeledData(
        table=canonical,
        labels=MIMIC_LABELS,
        layout=LAYOUT.name,
        source=paths["labels"],
        image_root=Path(image_root) if image_root else paths["labels"].parent,
    )
    if unlabelled:
        data.notes.append(
            f"left out {unlabelled:,} image(s) whose study has no known label "
            f"({no_row:,} with no row in {paths['labels'].name}, the others all blank)"
        )
    return data


def labels_known(table: pd.DataFrame) -> pd.Series:
    return table[list(MIMIC_LABELS)].notna().any(axis=1)


def _canonical(table: pd.DataFrame) -> pd.DataFrame:
    subject = table["subject_id"]
    names = (
        "files/p" + subject.str[:2] + "/p" + subject + "/s" + table["study_id"] + "/"
        + table["dicom_id"] + ".jpg"
    )  # fmt: skip
    canonical = pd.DataFrame(
        {
            IMAGE_COLUMN: names,
            PATIENT_COLUMN: subject,
            "study_id": table["study_id"],
            VIEW_COLUMN: table["ViewPosition"].str.strip().str.upper(),
        }
    )
    for label in MIMIC_LABELS:
        canonical[label] = table[label].astype(np.float32)
    return canonical


def _official_split(path: Path, table: pd.DataFrame) -> pd.Series:
    split = _read(path, "split").drop_duplicates("dicom_id").set_index("dicom_id")["split"]
    named = table["dicom_id"].map(split.str.strip())
    if named.isna().any():
        first = table["dicom_id"][named.isna()].iloc[0]
        raise DataError(
            f"{path}: {int(named.isna().sum()):,} image(s) of the metadata table have no split "
            f"(first: {first})"
        )
    return named.to_numpy()


def _detect(source: Path, spec: DatasetSpec) -> bool:
    del spec
    if source.is_file():
        return is_mimic_table(source)
    return bool(find_tables(source, required=False))


LAYOUT = register(
    Layout(
        name="mimic",
        title="MIMIC-CXR-JPG",
        files="MIMIC-CXR-JPG's tables",
        read=lambda source, spec: read_layout(source, spec.image_root),
        detect=_detect,
        priority=10,
        labels=MIMIC_LABELS,
        description="MIMIC-CXR-JPG (Beth Israel Deaconess Medical Center chest radiographs)",
        label_source="CheXpert labeller on the reports: positive, negative, uncertain, blank",
        limitation=(
            "MIMIC-CXR's labels come from the CheXpert labeller run on the reports, with "
            "uncertain (-1) and blank labels; the uncertainty policy used in training is "
            "stated above."
        ),
    )
)
