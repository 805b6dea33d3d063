"""``cxr evaluate RUN --data OTHER``: a trained model scored on another dataset (external
validation), and ``--labels google2019``: an NIH model scored against radiologists' labels.

The model's outputs answer the other dataset's labels through a name map
(:func:`cxr.labels.default_label_map`, or the user's): a data label is scored by the highest
probability among its model outputs, and called positive when any of them is. Only labels
that the map answers are scored; the others are listed as dropped. Results go to
``RUN/external/<name>/predictions.csv`` and under ``"external"`` in ``metrics.json``, where
the report shows them beside the internal test results.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.data.datasets import DatasetSpec, LabeledData, label_matrix, read_dataset
from cxr.data.layouts import get_layout, is_layout
from cxr.data.schema import GOOGLE2019_LABELS, IMAGE_COLUMN, PATIENT_COLUMN, SOURCE_SPLIT_COLUMN
from cxr.data.split import find_official_lists, read_name_list
from cxr.data.table import line_namer, read_text_table
from cxr.errors import DataError
from cxr.labels import default_label_map
from cxr.metrics import (
    apply_thresholds,
    auroc,
    bootstrap_auroc,
    known_only,
    mean_defined,
    percentile_interval,
    probabilities,
    threshold_metrics,
)
from cxr.model.bundle import read_bundle_meta
from cxr.run import RunFolder
from cxr.utils import atomic_write_csv, safe_name
from cxr.workflows.card import write_metrics
from cxr.workflows.evaluate import (
    bundle_logits,
    check_no_training_patients,
    predictions_frame,
)

EXTERNAL_SPLITS = ("test", "all")
GOOGLE2019 = "google2019"
GOOGLE2019_FILE = re.compile(r"^google2019_nih-chest-xray-labels\.csv(\.gz)?$")
EXTERNAL_RESAMPLES = 1000


def external_evaluate(
    run_dir: str | Path,
    data: str | Path | None,
    *,
    dataset: DatasetSpec | None = None,
    split: str = "test",
    labels: str | None = None,
    labels_file: str | Path | None = None,
    label_map: Mapping[str, Sequence[str]] | None = None,
    name: str | None = None,
    drop_missing: bool = False,
    resamples: int = EXTERNAL_RESAMPLES,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Score the run's bundle on ``data`` (any layout) or, with ``labels="google2019"``, on
    the NIH images that Majkowska et al. 2019 labelled; write predictions and metrics."""
    if split not in EXTERNAL_SPLITS:
        raise DataError(f"--split must be one of {', '.join(EXTERNAL_SPLITS)}, not {split!r}")
    run = RunFolder(run_dir).require()
    meta = read_bundle_meta(run.root)
    if labels == GOOGLE2019:
        found = _google2019_data(run, data, split, labels_file, dataset)
        default = GOOGLE2019
    elif labels is not None:
        raise DataError(f"--labels {labels!r}: the only named label set is {GOOGLE2019}")
    else:
        if data is None:
            raise DataError("give --data OTHER (a dataset folder or table) to validate on")
        found = _external_data(run, Path(data), dataset or DatasetSpec(), split, drop_missing)
        default = Path(data).resolve().name
    name = _result_name(run, name, default, found.source)
    mapping = dict(label_map) if label_map else default_label_map(meta.labels, found.labels)
    unknown = sorted({s for sources in mapping.values() for s in sources} - set(meta.labels))
    if unknown:
        raise DataError(
            f"label map names output(s) the model does not have: {', '.join(unknown)}; its "
            f"outputs are {', '.join(meta.labels)}"
        )
    scored = [label for label in found.labels if label in mapping]
    if not scored:
        raise DataError(
            f"no label of {found.source} is answered by the model's outputs "
            f"({', '.join(meta.labels)}); give a --label-map"
        )
    bundle, logits = bundle_logits(
        run, found.table, device=device, batch_size=batch_size, workers=workers, on_batch=on_batch
    )
    prob = probabilities(logits, bundle.temperature)
    calls = apply_thresholds(prob, bundle.thresholds)
    scores, answers = _mapped(prob, calls, list(meta.labels), mapping, scored)
    truth = label_matrix(found.table, scored)
    result = _external_metrics(truth, scores, answers, found, scored, mapping, resamples)
    result.update(
        name=name,
        data=str(found.source),
        layout=found.layout,
        split=split,
        dropped=[label for label in found.labels if label not in mapping],
        notes=found.notes,
        model_epoch=meta.epoch,
    )
    folder = run.root / "external" / _folder_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    table = predictions_frame(found.table, scored, truth, scores, answers)
    atomic_write_csv(table, folder / "predictions.csv")
    result["predictions"] = str((folder / "predictions.csv").relative_to(run.root))
    metrics = run.read_metrics()
    metrics.setdefault("external", {})[name] = result
    write_metrics(run.root, metrics)
    json.dumps(result)  # fail here, not in a later reader, if something is not serialisable
    return result


def _result_name(run: RunFolder, name: str | None, default: str, source: Path) -> str:
    """The key of an external result: ``--name``, else ``default`` (the data's folder name).
    A name that already holds the result of another source is never replaced: an explicit
    one is refused, a default one gets the source's short hash."""
    held = run.read_metrics().get("external", {})

    def taken(key: str) -> bool:
        return key in held and held[key].get("data") != str(source)

    if name is not None:
        if taken(name):
            raise DataError(
                f"external result {name!r} already holds {held[name].get('data')}; choose "
                "another --name"
            )
        return name
    if taken(default):
        digest = hashlib.sha256(str(source).encode("utf-8", "surrogateescape")).hexdigest()
        default = f"{default}-{digest[:8]}"
    return default


def _folder_name(name: str) -> str:
    """A file-name-safe folder for the result ``name``, distinct for distinct names."""
    safe = safe_name(name) or "external"
    if safe == name:
        return safe
    return f"{safe}-{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def _mapped(prob, calls, outputs: list[str], mapping, scored: list[str]):
    """Each scored label's probability (the highest of its outputs) and call (any of them)."""
    scores = np.empty((len(prob), len(scored)))
    answers = np.empty((len(prob), len(scored)), dtype=np.int8)
    for column, label in enumerate(scored):
        sources = [outputs.index(s) for s in mapping[label]]
        scores[:, column] = prob[:, sources].max(axis=1)
        answers[:, column] = calls[:, sources].max(axis=1)
    return scores, answers


def _external_metrics(truth, scores, answers, found: LabeledData, scored, mapping, resamples):
    patients = found.table[PATIENT_COLUMN].astype(str).to_numpy()
    boot = bootstrap_auroc(truth, scores, patients, resamples=resamples, seed=0)
    per_class = {}
    for column, label in enumerate(scored):
        known_truth, known_scores, known_calls = known_only(
            truth[:, column], scores[:, column], answers[:, column]
        )
        value = auroc(known_truth, known_scores)
        low, high = percentile_interval(boot.per_class[:, column])
        at = threshold_metrics(known_truth, known_calls.astype(float), 0.5)
        per_class[label] = {
            "model_outputs": list(mapping[label]),
            "auroc": value,
            "auroc_ci": [low, high] if value is not None else [None, None],
            "positives": int(known_truth.sum()),
            "negatives": int(len(known_truth) - known_truth.sum()),
            "unknown": int(len(truth) - len(known_truth)),
            **{key: at[key] for key in ("tp", "fp", "fn", "tn", "sensitivity", "specificity")},
        }
    mean = mean_defined([entry["auroc"] for entry in per_class.values()])
    low, high = percentile_interval(boot.mean)
    return {
        "images": len(found.table),
        "patients": int(len(set(patients))),
        "auroc_mean": mean,
        "auroc_mean_ci": [low, high] if mean is not None else [None, None],
        "bootstrap": {"unit": "patient", "resamples": resamples},
        "per_class": per_class,
        "label_map": {label: list(mapping[label]) for label in scored},
    }


# ---------------------------------------------------------------------------------------------
# Which images


def _external_data(
    run: RunFolder, data: Path, spec: DatasetSpec, split: str, drop_missing: bool
) -> LabeledData:
    """The other dataset's test images (its own split: MIMIC's test, CheXpert's valid.csv,
    NIH's test_list) or all of them; never patients the run trained on, if the ids are of
    the same dataset. Only the chosen images need be on disk."""
    found = read_dataset(data, spec, require_images=False)
    layout = get_layout(found.layout)
    if split == "test":
        found.table = _own_test_rows(found, data)
    # A download that comes in parts (NIH's 12 archives) lacks the images of the parts not
    # fetched: those are left out (and said), not refused.
    drop = drop_missing or layout.partial_download
    found = layout.find_images([found], drop_missing=drop)[0]
    if found.layout == run.dataset_info()["layout"]:
        check_no_training_patients(run, found.table, found.source)
    if found.table.empty:
        raise DataError(f"{found.source}: no images to evaluate on")
    return found


def _own_test_rows(found: LabeledData, data: Path) -> pd.DataFrame:
    table = found.table
    if SOURCE_SPLIT_COLUMN in table.columns:
        named = table[SOURCE_SPLIT_COLUMN].astype(str)
        test = named == "test" if (named == "test").any() else named == "valid"
        if test.any():
            return table[test.to_numpy()].reset_index(drop=True)
    if get_layout(found.layout).official_lists:
        _, test_list = find_official_lists([found.source.parent, data])
        names = set(read_name_list(test_list))
        return table[table[IMAGE_COLUMN].isin(names)].reset_index(drop=True)
    raise DataError(
        f"{found.source}: this {found.layout} dataset has no test split of its own (CheXpert's "
        "valid.csv, MIMIC's split table, NIH's test_list); use --split all"
    )


def _google2019_data(
    run: RunFolder,
    data: str | Path | None,
    split: str,
    labels_file: str | Path | None,
    spec: DatasetSpec | None,
) -> LabeledData:
    """The NIH images with Majkowska et al.'s labels that the run never trained on: those
    of its test split (``test``), or every one whose patient is in neither its train nor its
    val split (``all``)."""
    trained_on = run.dataset_info()["layout"]
    if not (is_layout(trained_on) and get_layout(trained_on).google2019_labels):
        raise DataError("--labels google2019 scores NIH models; this run was not trained on NIH")
    root = Path(data) if data else Path(run.load_info().get("data") or ".")
    path = Path(labels_file) if labels_file else _find_google2019(root)
    expert = _read_google2019(path)
    nih = read_dataset(root, spec, drop_missing=True)
    table = nih.table.drop(columns=[c for c in GOOGLE2019_LABELS if c in nih.table.columns])
    table = table.merge(expert, on=IMAGE_COLUMN, how="inner")
    if split == "test":
        keep = table[IMAGE_COLUMN].isin(set(run.read_split("test")[IMAGE_COLUMN].astype(str)))
    else:
        trained = set()
        for name in ("train", "val"):
            trained |= set(run.read_split(name)[PATIENT_COLUMN].astype(str))
        keep = ~table[PATIENT_COLUMN].astype(str).isin(trained)
    which = "in the run's test split" if split == "test" else "of patients it never trained on"
    notes = [
        f"{len(expert):,} images have expert labels; {int(keep.sum()):,} of them are on the "
        f"data's table and {which}"
    ]
    table = table[keep.to_numpy()].reset_index(drop=True)
    if table.empty:
        raise DataError(f"{path}: no expertly labelled image of {root} is {which}")
    return LabeledData(
        table=table, labels=GOOGLE2019_LABELS, layout=nih.layout, source=path,
        image_root=nih.image_root or nih.source.parent, notes=notes,
    )  # fmt: skip


def _find_google2019(root: Path) -> Path:
    folders = [root, *(p for p in sorted(root.glob("*")) if p.is_dir())]
    folders += [p for f in folders[1:] for p in sorted(f.glob("*")) if p.is_dir()]
    for folder in folders[:256]:
        for candidate in sorted(folder.iterdir()) if folder.is_dir() else ():
            if GOOGLE2019_FILE.match(candidate.name):
                return candidate
    raise DataError(
        f"{root}: no google2019_nih-chest-xray-labels.csv(.gz) here or two levels down; "
        "pass it with --labels-file"
    )


def _read_google2019(path: Path) -> pd.DataFrame:
    """Image names and the four findings as 1 / 0 (YES / NO)."""
    raw = read_text_table(path)
    missing = [c for c in (IMAGE_COLUMN, *GOOGLE2019_LABELS) if c not in raw.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}")
    where = line_namer(path)
    expert = pd.DataFrame({IMAGE_COLUMN: raw[IMAGE_COLUMN].str.strip()})
    for label in GOOGLE2019_LABELS:
        cells = raw[label].str.strip().str.upper()
        bad = ~cells.isin(["YES", "NO", ""])
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{where(row)}{label} is {raw[label].iloc[row]!r}; expected YES or NO")
        expert[label] = cells.map({"YES": 1.0, "NO": 0.0, "": np.nan}).astype(np.float32)
    return expert.drop_duplicates(IMAGE_COLUMN)
