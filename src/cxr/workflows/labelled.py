"""``--data LABELLED`` on ``cxr thresholds``, ``cxr calibrate`` and ``cxr report`` for an
imported bundle: the labelled set becomes one of the bundle's splits.

A model from ``cxr model import`` was trained elsewhere and comes without the validation and
test splits a cxr run has; the commands that fit or report on a split then have nothing to
read. The labelled set given with ``--data`` (any layout, read like ``cxr evaluate --data``
reads it) is written as the bundle's ``split/val.csv`` (what thresholds, calibration and the
out-of-distribution summary are fitted on) or ``split/test.csv`` (what the report shows),
with its labels mapped onto the model's outputs, and every command that reads a split then
works on it unchanged.

Only a data label answered by exactly one output gives that output its truth: a label that
several outputs answer together (``Lung Lesion=Mass|Nodule``) says nothing about each of them
alone. Outputs no label answers are left blank (unknown), so their thresholds are kept and
they are left out of the fits and the metrics.

A run that cxr trained keeps its own splits (its validation split chose its weights): there
``--data`` is refused and ``cxr evaluate RUN --data`` is the way to measure it elsewhere. The
validation and test sets of a bundle never share an image, nor a patient of the same dataset:
thresholds fitted on the patients the report scores would flatter the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.data.datasets import DatasetSpec, read_dataset
from cxr.data.schema import PATH_COLUMN, PATIENT_COLUMN
from cxr.data.split import write_split_info
from cxr.errors import DataError
from cxr.labels import default_label_map
from cxr.model.bundle import read_bundle_meta
from cxr.model.imports import IMPORTED_LAYOUT
from cxr.run import SPLIT_NAMES, RunFolder
from cxr.safety import csv_text
from cxr.utils import atomic_write_text
from cxr.workflows.card import write_metrics

LabelMap = Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class LabelledSet:
    """A labelled set for an imported bundle's split, as ``--data`` and its options give it."""

    data: str | Path
    dataset: DatasetSpec | None = None
    label_map: LabelMap | None = None
    drop_missing: bool = False

    def attach(self, run_dir: str | Path, split: str) -> dict[str, Any]:
        return attach_labelled_data(
            run_dir, split, self.data, dataset=self.dataset, label_map=self.label_map,
            drop_missing=self.drop_missing,
        )  # fmt: skip


def attach_labelled_data(
    run_dir: str | Path,
    split: str,
    data: str | Path,
    *,
    dataset: DatasetSpec | None = None,
    label_map: LabelMap | None = None,
    drop_missing: bool = False,
) -> dict[str, Any]:
    """Write the labelled set ``data`` as the imported bundle's ``split``; return what
    ``split/dataset.json`` records of it (``replaced``: the source it took the place of)."""
    if split not in SPLIT_NAMES:
        raise DataError(f"split must be one of {', '.join(SPLIT_NAMES)}, not {split!r}")
    run = RunFolder(run_dir).require()
    info = run.dataset_info()
    if info["layout"] != IMPORTED_LAYOUT:
        raise DataError(
            f"{run.root} was trained by cxr on {info['layout']} data: its thresholds, "
            "calibration and report use its own validation and test splits. To measure it "
            "on other data, use `cxr evaluate RUN --data OTHER`"
        )
    outputs = list(read_bundle_meta(run.root).labels)
    found = read_dataset(data, dataset or DatasetSpec(), drop_missing=drop_missing)
    if found.table.empty:
        raise DataError(f"{found.source}: no labelled images")
    mapping = dict(label_map) if label_map else default_label_map(outputs, found.labels)
    truth_of = _truth_sources(mapping, outputs, found.labels, found.source)
    table = _in_output_labels(found.table, found.labels, outputs, truth_of)
    entry = {
        "data": str(found.source),
        "layout": found.layout,
        "images": len(table),
        "patients": int(table[PATIENT_COLUMN].nunique()),
        "truth_of": {output: list(labels) for output, labels in truth_of.items()},
        "unlabelled_outputs": [o for o in outputs if o not in truth_of],
    }
    splits = dict(info.get("splits") or {})
    _check_apart(run, split, table, entry, splits)
    text = csv_text(table)  # what atomic_write_csv writes: formula cells neutralised
    path = run.split_file(split)
    if path.exists() and path.read_text(encoding="utf-8") == text and split in splits:
        return {**entry, "replaced": None, "unchanged": True}
    replaced = splits.get(split, {}).get("data") if path.exists() else None
    # What described the old set (its predictions, its metrics) describes it no longer.
    run.predictions(split).unlink(missing_ok=True)
    metrics = run.read_metrics()
    if split in metrics:
        del metrics[split]
        write_metrics(run.root, metrics)
    atomic_write_text(path, text)
    write_split_info(run.split_dir, {**info, "splits": {**splits, split: entry}})
    return {**entry, "replaced": replaced, "unchanged": False}


def _truth_sources(
    mapping: dict[str, Sequence[str]], outputs: list[str], data_labels, source: Path
) -> dict[str, list[str]]:
    """For each model output, the data labels that answer it alone."""
    unknown_outputs = sorted({o for sources in mapping.values() for o in sources} - set(outputs))
    if unknown_outputs:
        raise DataError(
            f"label map names output(s) the model does not have: {', '.join(unknown_outputs)}; "
            f"its outputs are {', '.join(outputs)}"
        )
    unknown_labels = sorted(set(mapping) - set(data_labels))
    if unknown_labels:
        raise DataError(
            f"label map names label(s) {source} does not have: {', '.join(unknown_labels)}"
        )
    truth_of: dict[str, list[str]] = {}
    for label, sources in mapping.items():
        if len(sources) == 1:
            truth_of.setdefault(sources[0], []).append(label)
    if not truth_of:
        raise DataError(
            f"no label of {source} ({', '.join(data_labels)}) answers one of the model's "
            f"outputs ({', '.join(outputs)}); give a --label-map"
        )
    return {o: truth_of[o] for o in outputs if o in truth_of}


def _in_output_labels(
    table: pd.DataFrame, data_labels, outputs: list[str], truth_of: dict[str, list[str]]
) -> pd.DataFrame:
    """The table with one column per model output (1 / 0 / -1 / blank) in place of the
    data's label columns. Several labels answering one output: positive where any is,
    else negative where any is, else uncertain where any is."""
    kept = table.drop(columns=[c for c in data_labels if c in table.columns])
    columns = {}
    for output in outputs:
        cells = table[truth_of[output]].to_numpy(dtype=np.float32) if output in truth_of else None
        if cells is None:
            columns[output] = np.full(len(table), np.nan, dtype=np.float32)
            continue
        merged = np.full(len(table), np.nan, dtype=np.float32)
        for value in (-1.0, 0.0, 1.0):  # later values win: 1 over 0 over -1
            merged[(cells == value).any(axis=1)] = value
        columns[output] = merged
    labels = pd.DataFrame(columns, index=table.index)
    return pd.concat([kept.drop(columns=[o for o in outputs if o in kept.columns]), labels], axis=1)


def _check_apart(
    run: RunFolder, split: str, table: pd.DataFrame, entry: dict, splits: dict[str, Any]
) -> None:
    """No image of ``table`` in another split of the bundle, nor a patient where the other
    split is of the same layout (ids of different datasets may coincide by chance)."""
    images = set(table[PATH_COLUMN].map(lambda p: str(Path(p).resolve())))
    patients = set(table[PATIENT_COLUMN].astype(str))
    for other in SPLIT_NAMES:
        if other == split or not run.split_file(other).exists():
            continue
        frame = run.read_split(other)
        shared_images = images & set(frame[PATH_COLUMN].map(lambda p: str(Path(p).resolve())))
        same_dataset = splits.get(other, {}).get("layout") == entry["layout"]
        shared_patients = patients & set(frame[PATIENT_COLUMN].astype(str)) if same_dataset else ()
        if shared_images or shared_patients:
            what = (
                f"{len(shared_images):,} image(s)"
                if shared_images
                else f"{len(shared_patients):,} patient(s)"
            )
            raise DataError(
                f"{entry['data']} shares {what} with the bundle's {other} split "
                f"({splits.get(other, {}).get('data', run.split_file(other))}): the {split} "
                f"and {other} sets must hold different patients, or the {other} numbers are "
                "not measured on unseen data"
            )
