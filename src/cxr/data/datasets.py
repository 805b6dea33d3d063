"""Every dataset cxr reads, as one image table: NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG, or
a generic table of the user's own images.

Whatever the layout, :func:`read_dataset` returns a :class:`LabeledData` whose table has one
row per image with the columns the rest of cxr reads:

- ``Image Index``: the image's name, unique in the table (NIH's file name; the relative path
  for the other layouts);
- ``Patient ID``: the patient (integers for NIH, text elsewhere);
- ``path``: the image file ("" when the images were not looked for);
- one column per label, in the dataset's order: 1 positive, 0 negative, -1 uncertain and
  NaN unknown (not mentioned) - NIH's labels are only ever 0 or 1;
- where the dataset has them: ``Patient Gender`` (M / F), ``age_years``, ``View Position``.

The labels travel with the table (:attr:`LabeledData.labels`), into the split folder
(``dataset.json``), the run and the bundle.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.config import UNCERTAIN_POLICIES
from cxr.data import chexpert, mimic
from cxr.data.nih import (
    AGE_COLUMN,
    IMAGE_COLUMN,
    LABELS_COLUMN,
    PATH_COLUMN,
    PATIENT_COLUMN,
    SEX_COLUMN,
    TABLE_PATTERN,
    VIEW_COLUMN,
    load_nih,
)
from cxr.data.table import (
    LABEL_VALUES,
    SOURCE_SPLIT_COLUMN,
    UNCERTAIN,
    LabeledData,
    check_unique_images,
    line_namer,
    normalise_sex,
    parse_ages,
    parse_label_cells,
    read_text_table,
)
from cxr.errors import DataError
from cxr.labels import PATHOLOGIES, label_name_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LAYOUTS = ("nih", "chexpert", "mimic", "generic")
FRONTAL_VIEWS = ("PA", "AP")
ALL_VIEWS = "all"
DATASET_FILES = ("dataset.toml", "dataset.json")
# A dataset file or a table is read whole; these caps refuse a hostile one before pandas
# allocates for it (the real CheXpert table is 26 MB, MIMIC's metadata 60 MB).
MAX_DATASET_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class DatasetSpec:
    """How to read a dataset: its layout (``auto`` tells it from the files) and, for a
    generic table, which columns hold what. ``views``: ``None`` keeps the frontal views where
    the table says which they are; ``("all",)`` keeps every view."""

    layout: str = "auto"
    table: str | None = None
    image_col: str | None = None
    patient_col: str | None = None
    labels: tuple[str, ...] | None = None
    view_col: str | None = None
    sex_col: str | None = None
    age_col: str | None = None
    image_root: str | None = None
    views: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.layout not in ("auto", *LAYOUTS):
            raise DataError(
                f"unknown dataset layout {self.layout!r}; choose auto, {', '.join(LAYOUTS)}"
            )
        for name in ("labels", "views"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, split_names(value))
            elif value is not None:
                object.__setattr__(self, name, tuple(str(v) for v in value))

    @property
    def describes_table(self) -> bool:
        return any((self.image_col, self.patient_col, self.labels, self.table))

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def merged(self, other: DatasetSpec) -> DatasetSpec:
        """``other``'s settings where given, this one's elsewhere (options over a file)."""
        values = asdict(self)
        for f in fields(other):
            value = getattr(other, f.name)
            if value is not None and not (f.name == "layout" and value == "auto"):
                values[f.name] = value
        return DatasetSpec(**values)


def split_names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


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
    spec = spec or DatasetSpec()
    if source.is_file() and source.suffix.lower() in (".toml", ".json"):
        spec = load_dataset_spec(source).merged(spec)
    elif source.is_dir():
        for name in DATASET_FILES:
            if (source / name).is_file() and not spec.describes_table:
                spec = load_dataset_spec(source / name).merged(spec)
                break
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    layout = spec.layout if spec.layout != "auto" else detect_layout(source, spec)
    if layout == "nih":
        return _read_nih(source, spec, require_images, drop_missing)
    if layout == "chexpert":
        data = chexpert.read_layout(source, spec.image_root)
    elif layout == "mimic":
        data = mimic.read_layout(source, spec.image_root)
    else:
        data = read_generic(source, spec)
    data = select_views(data, spec.views)
    if require_images:
        data = resolve_paths(data, drop_missing=drop_missing)
    return data


def detect_layout(source: Path, spec: DatasetSpec) -> str:
    """Which reader a folder or file needs, from its files (cheapest checks first)."""
    if spec.describes_table or spec.layout == "generic" or source.suffix.lower() in (".toml",):
        return "generic"
    if source.is_file():
        if chexpert.is_chexpert_table(source):
            return "chexpert"
        if mimic.is_mimic_table(source):
            return "mimic"
        if TABLE_PATTERN.match(source.name) or _has_nih_columns(source):
            return "nih"
        raise DataError(
            f"{source}: not a table cxr knows (NIH's Data_Entry_2017, CheXpert's train/valid "
            "CSV, MIMIC-CXR-JPG's tables); for your own table pass --image-col, --patient-col "
            "and --labels, or a dataset file"
        )
    if mimic.find_tables(source, required=False):
        return "mimic"
    if chexpert.find_tables(source, required=False):
        return "chexpert"
    return "nih"


def _has_nih_columns(path: Path) -> bool:
    try:
        header = pd.read_csv(path, nrows=0, index_col=False).columns
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError, EOFError):
        return False
    return bool({IMAGE_COLUMN, LABELS_COLUMN} & {str(c).strip() for c in header})


def _read_nih(source: Path, spec: DatasetSpec, require_images: bool, drop: bool) -> LabeledData:
    nih = load_nih(
        source,
        require_images=require_images,
        drop_missing=drop,
        image_root=spec.image_root,
    )
    data = LabeledData(
        table=nih.table,
        labels=PATHOLOGIES,
        layout="nih",
        source=nih.table_path,
        image_root=nih.image_root,
        dropped_missing=nih.dropped_missing,
    )
    if nih.dropped_missing:
        data.notes.append(f"dropped {len(nih.dropped_missing):,} image(s) not found on disk")
    return select_views(data, spec.views)


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
        values["layout"] = "generic"
    return DatasetSpec(**values)


# ---------------------------------------------------------------------------------------------
# The generic table


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
        table=table, labels=tuple(labels), layout="generic", source=table_path, image_root=root
    )


# Columns cxr itself puts in an image table: a user's column of the same name is not kept.
_OWN_COLUMNS = {IMAGE_COLUMN, PATIENT_COLUMN, PATH_COLUMN, VIEW_COLUMN, SEX_COLUMN, AGE_COLUMN,
                "age_years", SOURCE_SPLIT_COLUMN}  # fmt: skip


def _keep_other_columns(table: pd.DataFrame, raw: pd.DataFrame, used: set[str]) -> None:
    """The table's other columns (a site, a scanner) travel with the images, as text, so
    that splits keep them and ``--subgroup site`` can group by them."""
    for column in raw.columns:
        if column not in used and column not in _OWN_COLUMNS and column not in table.columns:
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
        table["age_years"] = parse_ages(raw[spec.age_col], where, spec.age_col)


# ---------------------------------------------------------------------------------------------
# Views and image files


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
    elif "Frontal/Lateral" in table.columns:
        keep = table["Frontal/Lateral"] == "Frontal"
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
    if "Frontal/Lateral" in table.columns:
        stats["frontal"] = int((table["Frontal/Lateral"] == "Frontal").sum())
    elif VIEW_COLUMN in table.columns:
        stats["frontal"] = int(table[VIEW_COLUMN].isin(FRONTAL_VIEWS).sum())
    if VIEW_COLUMN in table.columns:
        stats["views"] = _counts(table[VIEW_COLUMN].replace("", "(blank)"))
    if SEX_COLUMN in table.columns:
        stats["sex"] = _counts(table[SEX_COLUMN].replace("", "(unknown)"))
    if "age_years" in table.columns and table["age_years"].notna().any():
        ages = table["age_years"]
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
