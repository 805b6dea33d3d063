"""Patient-level train/val/test splits of any labelled image table, stratified on its labels.

A patient's images always land in one set: X-rays of the same person are strongly correlated,
so sharing a patient between train and test inflates test scores (leakage).

Sizes are given per set, either as a number of patients (``val_patients=1672, test_patients=389``,
as in CheXNet) or as a fraction of the patients. A set given neither gets the default fraction:
10% of the patients for validation and 20% for test.

Assignment follows iterative stratification (Sechidis, Tsoumakas & Vlahavas, 2011) on each
patient's per-pathology flags (1 when any of the patient's images is positive): labels are
taken rarest first and each of their patients goes to the set that still lacks the most
patients with that label. Patients without findings fill the remaining places, so the patient
counts are exact. Everything random comes from ``numpy.random.default_rng(seed)`` applied to
patients sorted by id, so one seed and one table give one split on any machine.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.data.layouts import get_layout, is_layout, nih
from cxr.data.schema import AGE_YEARS_COLUMN, IMAGE_COLUMN, PATIENT_COLUMN, SOURCE_SPLIT_COLUMN
from cxr.data.table import line_namer, parse_label_cells
from cxr.errors import DataError, LeakageError
from cxr.labels import PATHOLOGIES
from cxr.safety import restored_frame
from cxr.utils import atomic_write_csv, atomic_write_text

SPLITS: tuple[str, ...] = ("train", "val", "test")
# What a split folder records about its data: the layout and the labels in order.
DATASET_INFO = "dataset.json"
# Split folders (and runs) from before dataset.json hold NIH's data: cxr read nothing else.
NIH_INFO = nih.LAYOUT.info()
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.2
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
# Official lists usually sit in the dataset root or a metadata/ folder one or two levels down.
_LIST_SEARCH_DEPTH = 2
_SHOW = 5
_SHOW_SHARED = 10


@dataclass
class Split:
    """Three image tables with the input's columns, rows in the input's order."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    method: str  # "patients" | "fractions" | "official"
    seed: int
    labels: tuple[str, ...] = PATHOLOGIES
    layout: str = nih.LAYOUT.name

    def frames(self) -> dict[str, pd.DataFrame]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def summary(self) -> pd.DataFrame:
        """Rows train/val/test; columns images, patients, then positive images per label."""
        rows = {}
        for name, frame in self.frames().items():
            row = {"images": len(frame), "patients": int(frame[PATIENT_COLUMN].nunique())}
            for label in self.labels:
                row[label] = int((frame[label] == 1).sum()) if label in frame.columns else 0
            rows[name] = row
        summary = pd.DataFrame.from_dict(rows, orient="index")
        summary.index.name = "split"
        return summary


# ---------------------------------------------------------------------------------------------
# Patient-level stratified assignment


def split_by_patients(
    table: pd.DataFrame,
    *,
    val_patients: int | None = None,
    test_patients: int | None = None,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    seed: int = 0,
    labels: Sequence[str] = PATHOLOGIES,
    layout: str = nih.LAYOUT.name,
) -> Split:
    """Split ``table`` into train/val/test by patient, stratified on its ``labels``.

    Each of val and test is sized by a patient count or a fraction of the patients (not both);
    a set given neither gets the default fraction (val 0.1, test 0.2). Counts are exact; a
    positive fraction gives at least one patient. Train keeps the other patients and must keep
    at least one.
    """
    _check_table(table, labels)
    patients, inverse, flags = _patient_flags(table, labels)
    n = len(patients)
    n_val = _set_size("val", val_patients, val_fraction, DEFAULT_VAL_FRACTION, n)
    n_test = _set_size("test", test_patients, test_fraction, DEFAULT_TEST_FRACTION, n)
    if n_val + n_test > n - 1:
        raise DataError(
            f"asked for {n_val:,} validation and {n_test:,} test patients, but the table has "
            f"only {n:,} patients and at least one must be left for training"
        )
    rng = np.random.default_rng(seed)
    assignment = _stratified_assign(flags, [n - n_val - n_test, n_val, n_test], rng)
    per_row = assignment[inverse]
    frames = [table[per_row == s].reset_index(drop=True) for s in range(len(SPLITS))]
    by_count = val_patients is not None or test_patients is not None
    method = "patients" if by_count else "fractions"
    split = Split(*frames, method=method, seed=seed, labels=tuple(labels), layout=layout)
    check_split(split.frames())
    return split


def _check_table(table: pd.DataFrame, labels: Sequence[str] = PATHOLOGIES) -> None:
    missing = [c for c in (PATIENT_COLUMN, *labels) if c not in table.columns]
    if missing:
        raise DataError(
            f"cannot split: the table lacks column(s) {', '.join(repr(c) for c in missing)}; "
            "read it with cxr.data.datasets.read_dataset"
        )
    if table.empty:
        raise DataError("cannot split an empty table")


def patient_keys(patients: pd.Series) -> np.ndarray:
    """Patient ids to sort and compare by: numbers where every id is one (NIH, MIMIC), so
    that one seed gives one split whether ids were read as numbers or text, else text."""
    if patients.dtype.kind in "iu":
        return patients.to_numpy(dtype=np.int64)
    text = patients.astype(str).str.strip()
    if len(text) and text.str.fullmatch(r"\d{1,18}").all():
        return text.to_numpy().astype(np.int64)
    return text.to_numpy().astype(str)


def _patient_flags(
    table: pd.DataFrame, label_names: Sequence[str] = PATHOLOGIES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patients sorted by id, each row's patient index, and per-patient positive flags
    (uncertain and unknown labels count as not positive)."""
    patients, inverse = np.unique(patient_keys(table[PATIENT_COLUMN]), return_inverse=True)
    labels = table[list(label_names)].to_numpy(dtype=np.float64, na_value=0.0)
    flags = np.empty((len(patients), len(label_names)), dtype=bool)
    for column in range(len(label_names)):
        flags[:, column] = (
            np.bincount(
                inverse, weights=(labels[:, column] > 0).astype(np.float64), minlength=len(patients)
            )
            > 0
        )
    return patients, inverse, flags


def _set_size(name: str, count, fraction, default: float, n: int) -> int:
    if count is not None and fraction is not None:
        raise DataError(
            f"give the {name} set a patient count or a fraction, not both "
            f"({name}_patients={count!r}, {name}_fraction={fraction!r})"
        )
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise DataError(f"{name}_patients must be a whole number >= 0, not {count!r}")
        if count > n:
            raise DataError(
                f"asked for {count:,} {name} patients, but the table has only {n:,} patients"
            )
        return int(count)
    if fraction is None:
        fraction = default
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise DataError(f"{name}_fraction must be a number, not {fraction!r}") from None
    if not (0.0 <= fraction < 1.0):
        raise DataError(f"{name}_fraction must be in [0, 1), not {fraction!r}")
    # Round half up rather than Python's round-half-even so sizes are easy to predict.
    size = math.floor(fraction * n + 0.5)
    return max(size, 1) if fraction > 0 else size


def _stratified_assign(flags: np.ndarray, sizes: Sequence[int], rng) -> np.ndarray:
    """Give each patient (a row of ``flags``) a set index so that set ``s`` gets ``sizes[s]``."""
    n_patients, n_labels = flags.shape
    n_sets = len(sizes)
    assert sum(sizes) == n_patients
    visit = rng.permutation(n_patients)
    tiebreak = rng.random((n_patients, n_sets)).tolist()
    assignment = np.full(n_patients, -1, dtype=np.int64)

    sizes_arr = np.asarray(sizes, dtype=np.float64)
    totals = flags.sum(axis=0)
    desired = totals[:, None] * sizes_arr[None, :] / n_patients
    # Ask for at least one positive per non-empty set wherever the label has enough patients;
    # proportional demand alone can stay below 1 for small sets and rare labels.
    open_sets = sizes_arr > 0
    enough = totals >= open_sets.sum()
    floor = np.where(enough[:, None] & open_sets[None, :], 1.0, 0.0)
    demand = np.maximum(desired, floor).tolist()
    capacity = [int(s) for s in sizes]

    # Python lists: the loop below touches a handful of numbers per patient, where numpy's
    # per-call overhead would dominate.
    labels_of = {}
    for p in np.flatnonzero(flags.any(axis=1)).tolist():
        labels_of[p] = np.flatnonzero(flags[p]).tolist()
    unassigned = totals.astype(np.int64).tolist()
    done = [False] * n_labels
    sets = range(n_sets)
    for _ in range(n_labels):
        pending = [(unassigned[k], k) for k in range(n_labels) if not done[k] and unassigned[k]]
        if not pending:
            break
        label = min(pending)[1]
        done[label] = True
        in_order = visit[flags[visit, label] & (assignment[visit] < 0)].tolist()
        for p in in_order:
            row = demand[label]
            ties = tiebreak[p]
            target = max(
                (s for s in sets if capacity[s] > 0),
                key=lambda s: (row[s], capacity[s], ties[s]),
            )
            assignment[p] = target
            capacity[target] -= 1
            for k in labels_of[p]:
                demand[k][target] -= 1
                unassigned[k] -= 1

    rest = visit[assignment[visit] < 0]
    start = 0
    for s in sets:
        assignment[rest[start : start + capacity[s]]] = s
        start += capacity[s]
    _ensure_coverage(flags, assignment, sizes_arr, totals, visit)
    return assignment


def _ensure_coverage(flags, assignment, sizes, totals, visit) -> None:
    """Swap patients so every non-empty set has a positive of each label that has enough.

    The greedy pass misses this for labels with barely more patients than sets: train's larger
    demand takes the first two of three, or a small set fills up before the label reaches it.
    Swaps keep the set sizes and never take away a set's last positive of another label.
    """
    n_sets = len(sizes)
    open_sets = np.flatnonzero(sizes > 0)
    rank = np.empty(len(visit), dtype=np.int64)
    rank[visit] = np.arange(len(visit))
    n_flags = flags.sum(axis=1)
    for label in np.argsort(totals, kind="stable"):
        if totals[label] < len(open_sets):
            continue
        for target in open_sets:
            counts = np.stack([flags[assignment == s].sum(axis=0) for s in range(n_sets)])
            if counts[target, label] > 0:
                continue
            donor = int(np.argmax(counts[:, label]))
            if counts[donor, label] < 2:
                continue
            # A patient may move only if every label it carries keeps a positive where it leaves.
            leaves_donor = (
                (assignment == donor) & flags[:, label] & ~(flags & (counts[donor] < 2)).any(axis=1)
            )
            leaves_target = (
                (assignment == target)
                & ~flags[:, label]
                & ~(flags & (counts[target] < 2)).any(axis=1)
            )
            if not leaves_donor.any() or not leaves_target.any():
                continue
            out = _fewest_labels(leaves_donor, n_flags, rank)
            back = _fewest_labels(leaves_target, n_flags, rank)
            assignment[out], assignment[back] = target, donor


def _fewest_labels(mask, n_flags, rank) -> int:
    candidates = np.flatnonzero(mask)
    best = np.lexsort((rank[candidates], n_flags[candidates]))[0]
    return int(candidates[best])


# ---------------------------------------------------------------------------------------------
# Official NIH lists


def read_name_list(path: str | os.PathLike) -> list[str]:
    """Image names, one a line, from a plain or gzipped text file; blank lines are skipped."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    # Decide by content, not suffix: lists get renamed and re-compressed.
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file ({exc})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def find_official_lists(
    search: str | os.PathLike | Sequence[str | os.PathLike],
) -> tuple[Path, Path]:
    """Find NIH's ``train_val_list.txt`` and ``test_list.txt`` (plain or .gz) in one folder.

    Each search entry is a folder (looked in, then its subfolders two levels down, in sorted
    order) or a file whose folder is looked in. The first folder holding both lists wins; a
    plain list beats a gzipped one beside it.
    """
    roots = [search] if isinstance(search, (str, os.PathLike)) else list(search)
    looked: list[Path] = []
    partial: list[Path] = []
    for root in map(Path, roots):
        if root.is_file():
            root = root.parent
        for folder in _folders(root, _LIST_SEARCH_DEPTH):
            looked.append(folder)
            train_val = _list_file(folder, TRAIN_VAL_LIST)
            test = _list_file(folder, TEST_LIST)
            if train_val and test:
                return train_val, test
            partial.extend(p for p in (train_val, test) if p)
    where = ", ".join(str(Path(r)) for r in roots) or "(nowhere: no folder given)"
    message = (
        f"no {TRAIN_VAL_LIST}(.gz) and {TEST_LIST}(.gz) side by side in {where} "
        f"or its subfolders up to {_LIST_SEARCH_DEPTH} levels down ({len(looked)} folder(s) "
        "searched)"
    )
    if partial:
        message += f"; found only {', '.join(map(str, partial[:_SHOW]))}"
    raise DataError(message)


def _folders(root: Path, depth: int):
    if not root.is_dir():
        return
    level = [root]
    for _ in range(depth + 1):
        yield from level
        below = []
        for folder in level:
            try:
                with os.scandir(folder) as entries:
                    below.extend(
                        sorted(Path(e.path) for e in entries if e.is_dir() and e.name[0] != ".")
                    )
            except OSError:
                continue
        level = below


def _list_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def split_official(
    table: pd.DataFrame,
    lists: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    val_patients: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    allow_subset: bool = True,
) -> Split:
    """NIH's official split: test is ``test_list``; val is carved out of ``train_val_list``.

    ``lists`` is a pair of files ``(train_val_list, test_list)`` or where to search for them
    (see :func:`find_official_lists`). Validation takes ``val_patients`` or ``val_fraction``
    (default 0.1) of the train_val patients, stratified as in :func:`split_by_patients`.

    Every table row must be in exactly one list. With ``allow_subset`` (the default) the
    lists may name images the table lacks, as for a mini-dataset; without it they may not.
    """
    _check_table(table)
    train_val_path, test_path = _resolve_lists(lists)
    train_val_names = read_name_list(train_val_path)
    test_names = read_name_list(test_path)
    in_both = sorted(set(train_val_names).intersection(test_names))
    if in_both:
        raise LeakageError(
            f"{len(in_both):,} image(s) are in both {train_val_path} and {test_path} "
            f"(first: {', '.join(in_both[:_SHOW])})"
        )

    names = table[IMAGE_COLUMN]
    in_train_val = names.isin(train_val_names).to_numpy()
    in_test = names.isin(test_names).to_numpy()
    unlisted = names[~(in_train_val | in_test)].tolist()
    if unlisted:
        raise DataError(
            f"{len(unlisted):,} of {len(table):,} table row(s) are in neither "
            f"{train_val_path} nor {test_path} (first: {_first(unlisted)})"
        )
    if not allow_subset:
        known = set(names)
        absent = [n for n in (*train_val_names, *test_names) if n not in known]
        if absent:
            raise DataError(
                f"{len(absent):,} image name(s) in the official lists are not in the table "
                f"(first: {_first(absent)})"
            )
    if not in_test.any():
        raise DataError(f"no table row is in {test_path}; the test set would be empty")
    if not in_train_val.any():
        raise DataError(f"no table row is in {train_val_path}; nothing left to train on")

    train_val = table[in_train_val]
    try:
        check_split({"train_val": train_val, "test": table[in_test]})
    except LeakageError as exc:
        raise LeakageError(
            f"the official lists {train_val_path} and {test_path} share patients: {exc}",
            exc.shared,
        ) from None

    patients, inverse, flags = _patient_flags(train_val)
    n = len(patients)
    n_val = _set_size("val", val_patients, val_fraction, DEFAULT_VAL_FRACTION, n)
    if n_val > n - 1:
        raise DataError(
            f"asked for {n_val:,} validation patients, but {train_val_path} has only {n:,} "
            "patients in the table and at least one must be left for training"
        )
    rng = np.random.default_rng(seed)
    assignment = _stratified_assign(flags, [n - n_val, n_val], rng)
    per_row = np.full(len(table), 2, dtype=np.int64)
    per_row[in_train_val] = assignment[inverse]
    frames = [table[per_row == s].reset_index(drop=True) for s in range(len(SPLITS))]
    split = Split(*frames, method="official", seed=seed)
    check_split(split.frames())
    return split


def _resolve_lists(lists) -> tuple[Path, Path]:
    if (
        not isinstance(lists, (str, os.PathLike))
        and len(lists) == 2
        and all(Path(p).is_file() for p in lists)
    ):
        return Path(lists[0]), Path(lists[1])
    return find_official_lists(lists)


def _first(items: Sequence[str]) -> str:
    return ", ".join(items[:_SHOW]) + (", ..." if len(items) > _SHOW else "")


# ---------------------------------------------------------------------------------------------
# Checking, writing and reading


def dataset_split(
    table: pd.DataFrame,
    *,
    labels: Sequence[str],
    layout: str,
    search: Sequence[str | os.PathLike],
    val_patients: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
) -> Split:
    """The dataset's own split: NIH's official lists (found in ``search``: the lists, or
    folders to look in), or the split a layout's table carries (CheXpert's valid.csv,
    MIMIC's split table); validation carved out of the training patients."""
    if not get_layout(layout).official_lists:
        return split_by_source(
            table, labels=labels, layout=layout, val_patients=val_patients,
            val_fraction=val_fraction, seed=seed,
        )  # fmt: skip
    return split_official(
        table, find_official_lists(search), val_patients=val_patients,
        val_fraction=val_fraction, seed=seed,
    )  # fmt: skip


def check_split(frames: Mapping[str, pd.DataFrame]) -> None:
    """Raise :class:`LeakageError` if any patient has images in more than one set.

    ``LeakageError.shared`` maps each shared patient id to ``{set name: image count}``.
    """
    parts = []
    for code, (name, frame) in enumerate(frames.items()):
        if PATIENT_COLUMN not in frame.columns:
            raise DataError(f"the {name} set has no {PATIENT_COLUMN!r} column")
        parts.append(
            pd.DataFrame(
                {
                    "patient": patient_keys(frame[PATIENT_COLUMN]),
                    "set": np.full(len(frame), code),
                }
            )
        )
    if not parts:
        return
    both = pd.concat(parts, ignore_index=True)
    sets_per_patient = both.groupby("patient")["set"].nunique()
    shared_ids = sets_per_patient.index[sets_per_patient > 1]
    if len(shared_ids) == 0:
        return
    counts = both[both["patient"].isin(shared_ids)].groupby(["patient", "set"]).size().sort_index()
    names = list(frames)
    shared: dict[int, dict[str, int]] = {}
    for (patient, code), n in counts.items():
        key = int(patient) if isinstance(patient, (int, np.integer)) else str(patient)
        shared.setdefault(key, {})[names[code]] = int(n)
    described = [
        f"patient {patient} ("
        + ", ".join(f"{name}: {n} image{'s' if n != 1 else ''}" for name, n in where.items())
        + ")"
        for patient, where in list(shared.items())[:_SHOW_SHARED]
    ]
    more = len(shared) - len(described)
    verb = "patient is" if len(shared) == 1 else "patients are"
    message = f"{len(shared):,} {verb} in more than one set: {', '.join(described)}"
    if more:
        message += f", and {more:,} more"
    raise LeakageError(message, shared)


def split_by_source(
    table: pd.DataFrame,
    *,
    labels: Sequence[str],
    layout: str,
    val_patients: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
) -> Split:
    """The dataset's own split (``source_split``): MIMIC's train / validate / test as they are;
    CheXpert's valid.csv as the test set, validation carved out of train.csv by patient."""
    _check_table(table, labels)
    if SOURCE_SPLIT_COLUMN not in table.columns:
        raise DataError(f"the {layout} table has no split of its own; split by patient instead")
    named = table[SOURCE_SPLIT_COLUMN].astype(str)
    test = (named == "test") if (named == "test").any() else (named == "valid")
    if not test.any():
        raise DataError(f"the {layout} table's own split has no test images")
    given_val = named == "validate"
    per_row = np.where(test, 2, np.where(given_val, 1, 0))
    if not given_val.any():
        train_val = table[~test.to_numpy()]
        patients, inverse, flags = _patient_flags(train_val, labels)
        n = len(patients)
        n_val = _set_size("val", val_patients, val_fraction, DEFAULT_VAL_FRACTION, n)
        if n_val > n - 1:
            raise DataError(f"asked for {n_val:,} validation patients of only {n:,}")
        assignment = _stratified_assign(flags, [n - n_val, n_val], np.random.default_rng(seed))
        per_row[~test.to_numpy()] = assignment[inverse]
    frames = [table[per_row == s].reset_index(drop=True) for s in range(len(SPLITS))]
    split = Split(*frames, method="official", seed=seed, labels=tuple(labels), layout=layout)
    check_split(split.frames())
    return split


def write_split(split: Split, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Check ``split`` for leakage, then write train.csv, val.csv and test.csv into ``out_dir``.

    Each file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    frames = split.frames()
    check_split(frames)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot create the split folder ({exc})") from None
    written = {}
    write_file = _layout_hook(split.layout, "write_split_file")
    for name, frame in frames.items():
        if write_file is not None:
            frame = write_file(frame)
        path = out_dir / f"{name}.csv"
        _write_atomic(frame, path)
        written[name] = path
    write_split_info(out_dir, {"layout": split.layout, "labels": list(split.labels)})
    return written


def write_split_info(out_dir: str | os.PathLike, info: dict) -> None:
    path = Path(out_dir) / DATASET_INFO
    try:
        atomic_write_text(path, json.dumps(info, indent=2) + "\n")
    except OSError as exc:
        raise DataError(f"{path}: cannot write ({exc})") from None


def read_split_info(directory: str | os.PathLike) -> dict:
    """The layout and labels of a split folder (NIH's when it predates ``dataset.json``)."""
    path = Path(directory) / DATASET_INFO
    if not path.is_file():
        return dict(NIH_INFO)
    try:
        if path.stat().st_size > 1 << 20:
            raise DataError(f"{path}: too big for a dataset description")
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable dataset description ({exc})") from None
    labels = info.get("labels") if isinstance(info, dict) else None
    if (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(n, str) and n for n in labels)
        or len(set(labels)) != len(labels)
        or not isinstance(info.get("layout"), str)
    ):
        raise DataError(f"{path}: expected a layout and a list of distinct label names")
    return info


def _write_atomic(frame: pd.DataFrame, path: Path) -> None:
    try:
        atomic_write_csv(frame, path)
    except OSError as exc:
        raise DataError(f"{path}: cannot write ({exc})") from None


def read_split(directory: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Read train.csv, val.csv and test.csv written by :func:`write_split`, validated."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such split folder")
    info = read_split_info(directory)
    frames = {}
    for name in SPLITS:
        path = directory / f"{name}.csv"
        if not path.is_file():
            present = sorted(p.name for p in directory.glob("*.csv"))
            raise DataError(
                f"{path}: missing; a split folder holds {', '.join(f'{s}.csv' for s in SPLITS)}"
                f" (found: {', '.join(present) or 'no CSV files'})"
            )
        frames[name] = read_split_table(path, info)
    check_split(frames)
    return frames


def read_split_table(path: Path, info: dict | None = None) -> pd.DataFrame:
    """One table of a split folder: NIH's through its own reader, any other layout with its
    label columns as written (1 / 0 / -1 / blank)."""
    info = info or dict(NIH_INFO)
    try:
        table = restored_frame(pd.read_csv(path, dtype=str, keep_default_na=False))
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: not a readable CSV table ({exc})") from None
    read_file = _layout_hook(info["layout"], "read_split_file")
    if read_file is not None:
        return read_file(table, path)
    labels = info["labels"]
    missing = [c for c in (IMAGE_COLUMN, PATIENT_COLUMN, *labels) if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}")
    where = line_namer(path)
    for label in labels:
        table[label] = parse_label_cells(table[label], label, where)
    if AGE_YEARS_COLUMN in table.columns:
        table[AGE_YEARS_COLUMN] = pd.to_numeric(table[AGE_YEARS_COLUMN], errors="coerce")
    empty = np.flatnonzero((table[PATIENT_COLUMN].str.strip() == "").to_numpy())
    if len(empty):
        raise DataError(f"{where(int(empty[0]))}no patient id")
    return table


def _layout_hook(name: str, hook: str):
    """The split-file hook of the layout ``name``; ``None`` where it has none or is not
    registered here (a split folder of a layout this cxr lacks is read as written)."""
    return getattr(get_layout(name), hook) if is_layout(name) else None
