"""NIH ChestX-ray14's layout: the Data_Entry_2017 table (v2017 and v2020) and the images
wherever NIH's archives unpack them, found by name.

The table has one row per image: ``Image Index`` (``NNNNNNNN_NNN.png``), ``Finding Labels``
(``A|B|C`` or ``No Finding``), ``Patient ID``, ``Patient Age`` (``058Y`` in v2017, years in
v2020), ``Patient Gender``, ``View Position`` and the original size and spacing. Its 14 labels
are only ever 0 or 1. The download also holds NIH's official ``train_val_list.txt`` /
``test_list.txt`` and the bounding boxes of ``BBox_List_2017.csv``.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.data.layouts.registry import Layout, register
from cxr.data.schema import (
    AGE_COLUMN,
    AGE_YEARS_COLUMN,
    IMAGE_COLUMN,
    PATH_COLUMN,
    PATIENT_COLUMN,
    SEX_COLUMN,
    VIEW_COLUMN,
)
from cxr.data.spec import DatasetSpec
from cxr.data.table import LabeledData, parse_age_years
from cxr.errors import DataError
from cxr.labels import NO_FINDING, PATHOLOGIES, format_finding_labels, parse_finding_labels

# NIH's label text: ``A|B|C`` or ``No Finding``; the 14 label columns are derived from it.
LABELS_COLUMN = "Finding Labels"
# NIH's own header, bracketed column names included (split on commas they give 11 fields).
NIH_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)
REQUIRED_COLUMNS = (IMAGE_COLUMN, LABELS_COLUMN)
TABLE_PATTERN = re.compile(r"^Data_Entry_2017.*\.csv(\.gz)?$", re.IGNORECASE)
_NIH_NAME = re.compile(r"^(\d{8})_\d{3}\.png$")


@dataclass
class NihData:
    """The index table (one row per image) and where it came from."""

    table: pd.DataFrame
    table_path: Path
    image_root: Path | None
    dropped_missing: list[str] = field(default_factory=list)


def find_table(source: str | os.PathLike) -> Path:
    """``source`` is a Data_Entry CSV, or a folder with one somewhere below it."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    found = sorted(
        (p for p in _walk_files(source) if TABLE_PATTERN.match(p.name)),
        key=lambda p: (len(p.relative_to(source).parts), p.name),
    )
    if not found:
        raise DataError(
            f"{source}: no Data_Entry_2017*.csv (or .csv.gz) found in this folder or below it"
        )
    return found[0]


def _walk(root: str | os.PathLike):
    """``os.walk`` that follows symlinked folders (data is often linked in), each folder once."""
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link loop, or two links to one folder
            dirs.clear()
            continue
        seen.add(real)
        dirs.sort()
        yield folder, dirs, files


def _walk_files(root: Path):
    for folder, _dirs, files in _walk(root):
        for name in sorted(files):
            yield Path(folder) / name


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a Data_Entry table; add one 0/1 column per pathology (NIH order)."""
    path = Path(path)
    try:
        # index_col=False: rows with a trailing comma (as in NIH's v2017 file) must not turn the
        # first column into the index and shift every column left.
        table = pd.read_csv(
            path, dtype=str, keep_default_na=False, compression="infer", index_col=False
        )
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable CSV table ({exc})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the table is empty") from None
    return prepare_table(table, source=str(path))


def prepare_table(table: pd.DataFrame, *, source: str) -> pd.DataFrame:
    """Validate a raw table (all columns as text) and derive patient, age and label columns."""
    table = table.rename(columns=lambda c: str(c).strip())
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"found {', '.join(repr(c) for c in table.columns)}"
        )
    if table.empty:
        raise DataError(f"{source}: the table has a header but no rows")
    table = table.copy()
    table[IMAGE_COLUMN] = table[IMAGE_COLUMN].str.strip()

    # Line numbers as a user sees them in an editor: the header is line 1.
    def where(row: int) -> str:
        return f"{source}, line {row + 2}: "

    empty_names = np.flatnonzero(table[IMAGE_COLUMN].to_numpy() == "")
    if len(empty_names):
        raise DataError(f"{where(int(empty_names[0]))}empty {IMAGE_COLUMN!r}")

    label_text = table[LABELS_COLUMN].to_numpy()
    flags = np.zeros((len(table), len(PATHOLOGIES)), dtype=np.int8)
    # Most rows repeat a few dozen label strings; parse each distinct string once.
    parsed: dict[str, list[int]] = {}
    for row, text in enumerate(label_text):
        if text not in parsed:
            parsed[text] = parse_finding_labels(text, where=where(row))
        flags[row] = parsed[text]
    for column, name in enumerate(PATHOLOGIES):
        table[name] = flags[:, column]

    table[PATIENT_COLUMN] = _patient_ids(table, where)
    if AGE_COLUMN in table.columns:
        ages = []
        for row, value in enumerate(table[AGE_COLUMN].to_numpy()):
            try:
                ages.append(parse_age_years(value) if value != "" else float("nan"))
            except ValueError as exc:
                raise DataError(f"{where(row)}{exc} in {AGE_COLUMN!r}") from None
        table[AGE_YEARS_COLUMN] = ages

    _check_duplicates(table, where)
    return table.reset_index(drop=True)


def _patient_ids(table: pd.DataFrame, where) -> pd.Series:
    names = table[IMAGE_COLUMN]
    from_name = names.str.extract(r"^(\d{8})_", expand=False)
    if PATIENT_COLUMN in table.columns:
        raw = table[PATIENT_COLUMN].str.strip()
        bad = ~raw.str.fullmatch(r"\d+")
        # An empty Patient ID may still be recovered from an NIH-style file name.
        bad &= ~((raw == "") & from_name.notna())
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{where(row)}{PATIENT_COLUMN!r} is {raw.iloc[row]!r}, not a number")
        raw = raw.where(raw != "", from_name)
        return raw.astype(np.int64)
    if from_name.isna().any():
        row = int(np.flatnonzero(from_name.isna().to_numpy())[0])
        raise DataError(
            f"{where(row)}no {PATIENT_COLUMN!r} column and the image name "
            f"{names.iloc[row]!r} does not start with an 8-digit patient number"
        )
    return from_name.astype(np.int64)


def _check_duplicates(table: pd.DataFrame, where) -> None:
    duplicated = table[IMAGE_COLUMN].duplicated(keep=False)
    if not duplicated.any():
        return
    dupes = table[duplicated]
    patients_per_image = dupes.groupby(IMAGE_COLUMN)[PATIENT_COLUMN].nunique()
    conflicting = patients_per_image[patients_per_image > 1]
    if len(conflicting):
        name = conflicting.index[0]
        rows = np.flatnonzero((table[IMAGE_COLUMN] == name).to_numpy())
        patients = sorted(set(table.loc[rows, PATIENT_COLUMN]))
        raise DataError(
            f"{where(int(rows[1]))}image {name!r} is listed with different patients "
            f"{', '.join(map(str, patients))} (lines {', '.join(str(r + 2) for r in rows)})"
        )
    first = dupes[IMAGE_COLUMN].iloc[0]
    rows = np.flatnonzero((table[IMAGE_COLUMN] == first).to_numpy())
    raise DataError(
        f"{where(int(rows[1]))}image {first!r} is listed more than once "
        f"(lines {', '.join(str(r + 2) for r in rows)}); "
        f"{dupes[IMAGE_COLUMN].nunique()} image name(s) are duplicated"
    )


def index_images(root: str | os.PathLike) -> dict[str, Path]:
    """Map each image file name below ``root`` to its path (NIH archives unpack to images_NNN/)."""
    found: dict[str, Path] = {}
    for folder, _dirs, files in _walk(root):
        for name in files:
            if name.lower().endswith((".png", ".jpg", ".jpeg", ".dcm")) and name not in found:
                found[name] = Path(folder) / name
    return found


def load_nih(
    source: str | os.PathLike,
    *,
    require_images: bool = True,
    drop_missing: bool = False,
    image_root: str | os.PathLike | None = None,
) -> NihData:
    """Read the table of ``source`` and resolve every image to a path.

    ``source`` may be a folder (table and images below it) or a CSV alone; with a CSV alone
    images are looked up beside it unless ``image_root`` is given. Missing images raise a
    :class:`DataError` naming them, or are dropped when ``drop_missing`` is set.
    """
    source = Path(source)
    table_path = find_table(source)
    table = read_table(table_path)
    root = Path(image_root) if image_root else (source if source.is_dir() else None)
    if not require_images:
        return NihData(table=table, table_path=table_path, image_root=root)
    if root is None:
        root = table_path.parent
    return attach_image_paths(table, root, drop_missing=drop_missing, table_path=table_path)


def attach_image_paths(
    table: pd.DataFrame,
    root: str | os.PathLike,
    *,
    drop_missing: bool = False,
    table_path: Path | None = None,
    found: dict[str, Path] | None = None,
) -> NihData:
    """The table with each image's path (``found``: an :func:`index_images` of ``root``
    already made, so that several tables share one walk of the image tree)."""
    root = Path(root)
    paths = index_images(root) if found is None else found
    resolved = table[IMAGE_COLUMN].map(lambda name: str(paths[name]) if name in paths else "")
    missing_mask = resolved == ""
    missing = table.loc[missing_mask, IMAGE_COLUMN].tolist()
    if missing and not drop_missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"{table_path or root}: {len(missing):,} of {len(table):,} listed image(s) are "
            f"not on disk below {root} (first: {shown}); pass --drop-missing to train "
            "without them"
        )
    table = table.assign(**{PATH_COLUMN: resolved})
    if missing:
        table = table[~missing_mask].reset_index(drop=True)
        if table.empty:
            raise DataError(f"{root}: none of the listed images is on disk")
    return NihData(
        table=table, table_path=table_path or root, image_root=root, dropped_missing=missing
    )


def dataset_stats(table: pd.DataFrame) -> dict:
    """Counts a user checks against NIH's published numbers."""
    images = len(table)
    stats: dict = {
        "images": images,
        "patients": int(table[PATIENT_COLUMN].nunique()),
    }
    if VIEW_COLUMN in table.columns:
        stats["views"] = {str(k): int(v) for k, v in table[VIEW_COLUMN].value_counts().items()}
    if SEX_COLUMN in table.columns:
        stats["sex"] = {str(k): int(v) for k, v in table[SEX_COLUMN].value_counts().items()}
    if AGE_YEARS_COLUMN in table.columns and table[AGE_YEARS_COLUMN].notna().any():
        ages = table[AGE_YEARS_COLUMN]
        stats["age_years"] = {
            "min": float(ages.min()),
            "max": float(ages.max()),
            "median": float(ages.median()),
        }
    labels = {}
    for name in PATHOLOGIES:
        count = int(table[name].sum())
        labels[name] = {"count": count, "prevalence": count / images if images else 0.0}
    no_finding = int((table[list(PATHOLOGIES)].sum(axis=1) == 0).sum())
    labels[NO_FINDING] = {"count": no_finding, "prevalence": no_finding / images if images else 0.0}
    stats["labels"] = labels
    return stats


def is_nih_name(name: str) -> bool:
    return bool(_NIH_NAME.match(name))


# ---------------------------------------------------------------------------------------------
# The layout


def _detect(source: Path, spec: DatasetSpec) -> bool:
    """A Data_Entry table, a table with NIH's columns, or any folder: NIH's is the layout a
    folder is taken to be when no other claims it (:func:`find_table` then says when it
    holds no Data_Entry table)."""
    del spec
    return source.is_dir() or bool(TABLE_PATTERN.match(source.name)) or _has_nih_columns(source)


def _has_nih_columns(path: Path) -> bool:
    try:
        header = pd.read_csv(path, nrows=0, index_col=False).columns
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError, EOFError):
        return False
    return bool({IMAGE_COLUMN, LABELS_COLUMN} & {str(c).strip() for c in header})


def _read(source: Path, spec: DatasetSpec) -> LabeledData:
    nih = load_nih(source, require_images=False, image_root=spec.image_root)
    return LabeledData(
        table=nih.table,
        labels=PATHOLOGIES,
        layout=LAYOUT.name,
        source=nih.table_path,
        image_root=nih.image_root or nih.table_path.parent,
    )


def _find_images(tables: Sequence[LabeledData], *, drop_missing: bool = False) -> list[LabeledData]:
    """Each table's images by name below its image root, one walk per root for all of them
    (NIH's tree is 112,120 files in 12 folders)."""
    walked: dict[Path, dict[str, Path]] = defaultdict(dict)
    found = []
    for data in tables:
        root = Path(data.image_root or data.source.parent)
        if root not in walked:
            walked[root] = index_images(root)
        nih = attach_image_paths(
            data.table.drop(columns=[PATH_COLUMN], errors="ignore"),
            root,
            drop_missing=drop_missing,
            table_path=data.source,
            found=walked[root],
        )
        data.table, data.image_root, data.dropped_missing = nih.table, root, nih.dropped_missing
        if nih.dropped_missing:
            data.notes.append(f"dropped {len(nih.dropped_missing):,} image(s) not found on disk")
        found.append(data)
    return found


def _read_split_file(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """A split table through NIH's own reader (labels from ``Finding Labels``)."""
    return _empty_set(table, path) if table.empty else prepare_table(table, source=str(path))


def _write_split_file(frame: pd.DataFrame) -> pd.DataFrame:
    """The split table with ``Finding Labels`` in step with its label columns, which reading
    it back derives from that text."""
    if LABELS_COLUMN in frame.columns:
        return frame
    labels = [format_finding_labels(row) for row in frame[list(PATHOLOGIES)].to_numpy()]
    return frame.assign(**{LABELS_COLUMN: labels})


def _empty_set(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """A set may legitimately be empty (e.g. val_fraction=0); prepare_table rejects that."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}")
    table = table.copy()
    for label in PATHOLOGIES:
        table[label] = pd.Series(dtype=np.int8)
    table[PATIENT_COLUMN] = pd.Series(dtype=np.int64)
    return table


LAYOUT = register(
    Layout(
        name="nih",
        title="NIH ChestX-ray14",
        short_name="NIH",
        files="NIH's Data_Entry_2017",
        read=_read,
        detect=_detect,
        priority=100,
        labels=PATHOLOGIES,
        find_images=_find_images,
        read_split_file=_read_split_file,
        write_split_file=_write_split_file,
        stats=dataset_stats,
        official_lists=True,
        bounding_boxes=True,
        google2019_labels=True,
        folder_has_images=True,
        partial_download=True,
        description="NIH ChestX-ray14 (frontal chest radiographs, NIH Clinical Center)",
        label_source="text-mined from radiology reports (NLP); about 90 % accurate per NIH",
        limitation=(
            "NIH's labels were text-mined from radiology reports; the dataset's authors "
            "estimate them at about 90 % accurate, so both training and test labels are noisy."
        ),
    )
)
