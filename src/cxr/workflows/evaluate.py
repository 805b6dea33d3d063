"""``cxr evaluate`` over a run folder: predict every image of a split with the run's bundle,
write ``predictions-<split>.csv`` and the split's entry in ``metrics.json``; and the shared
steps that calibration, thresholds and the report build on (the logits of a split, fresh
predictions)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.data.datasets import DatasetSpec, LabeledData, find_images, label_matrix, read_dataset
from cxr.data.loaders import split_loader
from cxr.data.schema import IMAGE_COLUMN, PATH_COLUMN, PATIENT_COLUMN
from cxr.data.split import read_split_table
from cxr.engine.inference import bundle_ood, predict_outputs
from cxr.errors import DataError, LeakageError
from cxr.metrics import apply_thresholds, classification_metrics, mean_defined, probabilities
from cxr.model.bundle import (
    BUNDLE_META,
    BUNDLE_WEIGHTS,
    Bundle,
    load_bundle,
    meta_digest,
    read_bundle_meta,
    resolve_bundle,
    weights_digest,
)
from cxr.run import SPLIT_NAMES, RunFolder
from cxr.runtime import resolve_device
from cxr.safety import restored_frame
from cxr.subgroups import build_groupings, subgroup_analysis
from cxr.utils import atomic_write_csv, safe_name
from cxr.workflows.card import write_metrics

OnBatch = Callable[[int], None] | None


def split_frame(run: RunFolder, split: str) -> tuple[pd.DataFrame, str]:
    """The table of ``split`` (a split of the run, or the path of a CSV in NIH format with a
    ``path`` column or image names found below the run's data folder) and its name."""
    if split in SPLIT_NAMES:
        frame, name = run.read_split(split), split
    else:
        path = Path(split)
        frame, name = read_split_table(path, run.dataset_info()), other_split_name(path)
        if PATH_COLUMN not in frame.columns:
            frame = _with_image_paths(run, frame, path)
        check_no_training_patients(run, frame, path)
    if frame.empty:
        raise DataError(f"split {split!r} of {run.root} has no images")
    return frame, name


def other_split_name(path: Path) -> str:
    """What the results of a table that is not one of the run's splits are kept under:
    ``split-<stem>-<8 hex of its absolute path>``, so that ``other/test.csv`` never replaces
    the run's own ``test`` results and two tables called ``test.csv`` never meet."""
    digest = hashlib.sha256(str(path.resolve()).encode("utf-8", "surrogateescape")).hexdigest()
    return f"split-{safe_name(path.stem) or 'table'}-{digest[:8]}"


def _with_image_paths(run: RunFolder, frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The images of a table without paths, found where the run's data has them (below the
    dataset's image root), as its layout finds them (NIH's by name)."""
    info = run.load_info()
    data = Path(info["data"]) if info.get("data") else path.parent
    layout = run.dataset_info()
    spec = DatasetSpec(**(info.get("dataset") or {}).get("spec", {}))
    source = read_dataset(data, spec, require_images=False)
    found = LabeledData(
        frame, tuple(layout["labels"]), layout["layout"], path, image_root=source.image_root
    )
    return find_images(found).table


def check_no_training_patients(run: RunFolder, frame: pd.DataFrame, path: Path) -> None:
    """Refuse a table sharing patients with the run's train or val split: their images (or
    images of the same people) shaped the weights or the thresholds, so the numbers would
    overstate the model."""
    shared: dict[str, list[str]] = {}
    patients = set(frame[PATIENT_COLUMN].astype(str))
    for name in ("train", "val"):
        if run.split_file(name).exists():
            seen = set(run.read_split(name)[PATIENT_COLUMN].astype(str))
            overlap = sorted(patients & seen)
            if overlap:
                shared[name] = overlap
    if shared:
        where = "; ".join(
            f"{len(ids):,} in {name} (first: {', '.join(ids[:5])})" for name, ids in shared.items()
        )
        raise LeakageError(
            f"{path}: patients of this table are in the run's training data: {where}. "
            "Evaluate on patients the run never saw",
            shared,
        )


def bundle_logits(
    run: RunFolder,
    frame: pd.DataFrame,
    *,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    on_batch: OnBatch = None,
) -> tuple[Bundle, np.ndarray]:
    """The run's bundle and its raw logits (temperature 1) for every image of ``frame``, in
    the table's order."""
    bundle, logits, _ = bundle_outputs(
        run, frame, device=device, batch_size=batch_size, workers=workers, on_batch=on_batch
    )
    return bundle, logits


def bundle_outputs(
    run: RunFolder,
    frame: pd.DataFrame,
    *,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    on_batch: OnBatch = None,
) -> tuple[Bundle, np.ndarray, np.ndarray]:
    """:func:`bundle_logits` and the pooled features of the same forward pass."""
    device_obj = resolve_device(device)
    bundle = load_bundle(run.root, device=device_obj)
    preprocess = bundle.preprocess
    loader, _ = split_loader(frame, preprocess, batch_size=batch_size, workers=workers)
    indices, logits, features = predict_outputs(bundle.model, loader, device_obj, on_batch=on_batch)
    order = np.argsort(indices, kind="stable")
    return bundle, logits[order], features[order]


def evaluate_run(
    run_dir,
    split: str = "test",
    *,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    on_batch: OnBatch = None,
    subgroups: Sequence[str] | None = (),
) -> dict[str, Any]:
    """Predict every image of a split with the run's best bundle; write predictions and metrics.

    ``split`` is ``test``, ``val`` or the path of a table (:func:`split_frame`), whose results
    are kept under their own name (:func:`other_split_name`).
    The subgroup analysis (:mod:`cxr.subgroups`) covers sex, age, view and follow-up and the
    columns named in ``subgroups``; ``None`` leaves it out.
    """
    run = RunFolder(run_dir).require()
    frame, name = split_frame(run, split)
    if subgroups is not None:
        build_groupings(frame, subgroups)  # a column that is not there fails before inference
    bundle, logits, features = bundle_outputs(
        run, frame, device=device, batch_size=batch_size, workers=workers, on_batch=on_batch
    )
    labels = label_matrix(frame, bundle.labels)
    prob = probabilities(logits, bundle.temperature)
    per_class = classification_metrics(labels, prob, bundle.thresholds, bundle.labels)
    aurocs = [per_class[n]["auroc"] for n in bundle.labels]
    table = _predictions_table(frame, bundle, labels, prob)
    ood = ood_columns(run, bundle, features)
    table = table if ood is None else pd.concat([table, ood.set_axis(table.index)], axis=1)
    result = {
        "split": name,
        "images": len(frame),
        "patients": int(frame[PATIENT_COLUMN].nunique()),
        "auroc_mean": mean_defined(aurocs),
        "auroc_undefined": [n for n, v in zip(bundle.labels, aurocs) if v is None],
        "threshold_rule": bundle.meta.threshold_rule,
        "model_epoch": bundle.meta.epoch,
        "per_class": per_class,
        "predictions": run.predictions(name).name,
        "bundle": bundle_fingerprint(run.root),
        **({} if ood is None else {"ood": ood_summary(ood, bundle)}),
    }
    if subgroups is not None:
        result["subgroups"] = subgroup_analysis(
            frame, labels, prob, bundle.thresholds, bundle.labels, columns=subgroups
        )
    metrics = run.read_metrics()
    metrics[name] = result
    atomic_write_csv(table, run.predictions(name))
    # The card describes the model only, so the predictions stay fresh after it is rewritten.
    write_metrics(run.root, metrics)
    result["path"] = str(run.metrics)
    json.dumps(result)  # fail here, not in a later reader, if something is not serialisable
    return result


def _predictions_table(
    frame: pd.DataFrame, bundle: Bundle, labels: np.ndarray, prob: np.ndarray
) -> pd.DataFrame:
    """``Image Index``, ``Patient ID``, then ``prob_``, ``true_`` and ``call_`` per label."""
    calls = apply_thresholds(prob, bundle.thresholds)
    return predictions_frame(frame, bundle.labels, labels, prob, calls)


def predictions_frame(
    frame: pd.DataFrame, labels, truth: np.ndarray, prob: np.ndarray, calls: np.ndarray
) -> pd.DataFrame:
    """The predictions table: ``Image Index``, ``Patient ID``, then ``prob_``, ``true_`` and
    ``call_`` per label."""
    columns = {IMAGE_COLUMN: frame[IMAGE_COLUMN], PATIENT_COLUMN: frame[PATIENT_COLUMN]}
    # Unknown labels are blank cells (a nullable integer column), read back as NaN.
    known = pd.DataFrame(truth).round().astype("Int8").to_numpy()
    for prefix, values in (("prob", prob), ("true", known), ("call", calls)):
        for c, label in enumerate(labels):
            columns[f"{prefix}_{label}"] = values[:, c]
    return pd.DataFrame(columns)


def predictions_are_fresh(run_dir: str | Path, split: str) -> bool:
    """Whether ``predictions-<split>.csv`` and its metrics were written by the current bundle.

    Fresh means newer than both bundle files: a new temperature, new thresholds or new
    weights all rewrite one of them.
    """
    run = RunFolder(run_dir)
    path = run.predictions(split)
    if not path.exists() or split not in run.read_metrics():
        return False
    recorded = run.read_metrics()[split].get("bundle")
    if recorded is not None:
        # What the predictions were made with, by content: a refreshed model card is not news.
        return recorded == bundle_fingerprint(run.root)
    bundle_time = max((run.root / n).stat().st_mtime_ns for n in (BUNDLE_META, BUNDLE_WEIGHTS))
    return path.stat().st_mtime_ns > bundle_time


def ensure_predictions(
    run_dir: str | Path,
    split: str,
    *,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    on_batch: OnBatch = None,
) -> pd.DataFrame:
    """The split's predictions table, re-running :func:`evaluate_run` if it is missing or
    older than the bundle."""
    run = RunFolder(run_dir).require()
    if not predictions_are_fresh(run.root, split):
        evaluate_run(
            run.root, split, device=device, batch_size=batch_size, workers=workers,
            on_batch=on_batch,
        )  # fmt: skip
    return restored_frame(
        pd.read_csv(run.predictions(split), dtype={IMAGE_COLUMN: str, PATIENT_COLUMN: str})
    )


def bundle_fingerprint(run_dir: str | Path) -> dict[str, str]:
    """The SHA-256 of the weights and of what in model.json shapes predictions (not the
    model card): predictions made with another fingerprint are stale."""
    weights, _ = resolve_bundle(run_dir)
    return {
        "weights_sha256": weights_digest(weights),
        "meta_sha256": meta_digest(read_bundle_meta(run_dir)),
    }


def ood_columns(run: RunFolder, bundle: Bundle, features: np.ndarray) -> pd.DataFrame | None:
    """``ood_distance``, ``ood_percentile``, ``ood_flag`` per image, where the bundle has an
    out-of-distribution summary."""
    summary = bundle_ood(run.root, bundle.meta)
    if summary is None:
        return None
    scores = summary.score(features)
    return pd.DataFrame(
        {
            "ood_distance": [s["distance"] for s in scores],
            "ood_percentile": [s["percentile"] for s in scores],
            "ood_flag": [int(s["flagged"]) for s in scores],
        }
    )


def ood_summary(columns: pd.DataFrame, bundle: Bundle) -> dict[str, Any]:
    flagged = int(columns["ood_flag"].sum())
    return {
        "flag_percentile": bundle.meta.ood.flag_percentile,
        "images_flagged": flagged,
        "share_flagged": flagged / len(columns) if len(columns) else None,
        "median_percentile": float(columns["ood_percentile"].median()) if len(columns) else None,
    }
