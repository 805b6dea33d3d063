"""``cxr calibrate`` and ``cxr thresholds`` over a run folder: fit on the validation split,
store in the bundle. The method and its reasons are in :mod:`cxr.calibration`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cxr.calibration import (
    DEFAULT_TARGET_SENSITIVITY,
    FIT_SPLIT,
    fit_temperature,
    fit_thresholds,
    mean_ece,
    nll,
    prior_offsets,
    stored_rule,
    threshold_meta,
    validate_rule,
)
from cxr.data.datasets import label_matrix
from cxr.errors import DataError
from cxr.metrics import prediction_arrays, probabilities
from cxr.model.bundle import BundleMeta, read_bundle_meta, shift_classifier_bias
from cxr.run import RunFolder
from cxr.workflows.card import update_model
from cxr.workflows.evaluate import bundle_logits, ensure_predictions
from cxr.workflows.labelled import LabelledSet

OnBatch = Callable[[int], None] | None


def refit_thresholds(
    run_dir: str | Path,
    rule: str = "youden",
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    *,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    on_batch: OnBatch = None,
    labelled: LabelledSet | None = None,
) -> dict[str, Any]:
    """Choose per-class thresholds on the validation predictions with ``rule``; store them.
    With ``labelled`` (an imported bundle), that set becomes the validation split first."""
    validate_rule(rule, target_sensitivity)
    run_dir = Path(run_dir)
    attached = labelled.attach(run_dir, FIT_SPLIT) if labelled else None
    predictions = ensure_predictions(
        run_dir, FIT_SPLIT, device=device, batch_size=batch_size, workers=workers, on_batch=on_batch
    )
    meta = read_bundle_meta(run_dir)
    labels, prob = prediction_arrays(predictions, meta.labels)
    before = meta.decision_thresholds
    thresholds, kept = fit_thresholds(labels, prob, rule, target_sensitivity, before, meta.labels)
    changes = threshold_meta(
        thresholds, rule, target_sensitivity, len(labels), meta.effective_temperature, kept
    )
    update_model(run_dir, **changes)
    return {
        **changes,
        "previous_thresholds": before,
        "labels": list(meta.labels),
        "attached": attached,
    }


def split_logits(
    run_dir: str | Path,
    split: str = FIT_SPLIT,
    *,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    on_batch: OnBatch = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits), each ``[N, classes]`` in the split table's order, from the run's
    bundle. The raw logits (temperature 1): calibration needs them, not probabilities."""
    run = RunFolder(run_dir).require()
    frame = run.read_split(split)
    if frame.empty:
        raise DataError(f"split {split!r} of {run.root} has no images")
    _, logits = bundle_logits(
        run, frame, device=device, batch_size=batch_size, workers=workers, on_batch=on_batch
    )
    return label_matrix(frame, run.labels).astype(np.float64), logits.astype(np.float64)


def calibrate_run(
    run_dir: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    on_batch: OnBatch = None,
    labelled: LabelledSet | None = None,
) -> dict[str, Any]:
    """Prior correction + temperature scaling fitted on the validation split, stored in the
    bundle; then the thresholds refitted on the calibrated validation probabilities with the
    bundle's stored rule. With ``labelled`` (an imported bundle), that set becomes the
    validation split first."""
    run_dir = Path(run_dir)
    attached = labelled.attach(run_dir, FIT_SPLIT) if labelled else None
    meta = read_bundle_meta(run_dir)
    labels, logits = split_logits(
        run_dir, FIT_SPLIT, device=device, batch_size=batch_size, workers=workers, on_batch=on_batch
    )
    classes = labels.shape[1]
    previous = meta.effective_temperature
    applied = np.asarray(
        (meta.calibration or {}).get("logit_offsets") or [0.0] * classes, dtype=np.float64
    )
    offsets = prior_offsets(meta)
    new_offsets = np.asarray(offsets if offsets is not None else [0.0] * classes)
    shifted = logits - applied[None, :] + new_offsets[None, :]  # raw model output + new shift
    temperature = fit_temperature(shifted, labels)
    after_prob = probabilities(shifted, temperature)
    changes = _refitted_thresholds(meta, labels, after_prob, applied, new_offsets, temperature)
    shift_classifier_bias(run_dir, new_offsets - applied)
    update_model(
        run_dir,
        temperature=temperature,
        calibration=_calibration_note(new_offsets, temperature, len(labels), offsets is not None),
        **changes,
    )
    return {
        "temperature": temperature,
        "previous_temperature": previous,
        "prior_correction": offsets is not None,
        "logit_offsets": [float(v) for v in new_offsets],
        "val_images": len(labels),
        "val_nll_before": nll(logits, labels, previous),
        "val_nll_after": nll(shifted, labels, temperature),
        "val_ece_before": mean_ece(labels, probabilities(logits, previous)),
        "val_ece_after": mean_ece(labels, after_prob),
        "threshold_rule": changes["threshold_rule"],
        "thresholds": changes["thresholds"],
        "previous_thresholds": meta.decision_thresholds,
        "labels": list(meta.labels),
        "attached": attached,
    }


def _refitted_thresholds(
    meta: BundleMeta,
    labels: np.ndarray,
    after_prob: np.ndarray,
    applied: np.ndarray,
    new_offsets: np.ndarray,
    temperature: float,
) -> dict[str, Any]:
    """The stored rule refitted on the calibrated probabilities. A class that keeps its
    threshold keeps its calls: its old threshold, mapped through the change of calibration
    (old probability -> raw logit -> new probability)."""
    rule, target = stored_rule(meta)
    old = np.clip(np.asarray(meta.decision_thresholds, dtype=np.float64), 1e-12, 1 - 1e-12)
    old_raw_logit = meta.effective_temperature * np.log(old / (1 - old)) - applied
    mapped = probabilities(old_raw_logit + new_offsets, temperature).tolist()
    thresholds, kept = fit_thresholds(labels, after_prob, rule, target, mapped, meta.labels)
    return threshold_meta(thresholds, rule, target, len(labels), temperature, kept)


def _calibration_note(
    offsets: np.ndarray, temperature: float, images: int, prior_corrected: bool
) -> dict[str, Any]:
    """What ``model.json`` records as ``calibration``."""
    return {
        "method": (
            "prior correction log(P/N) of the training split folded into the classifier "
            "bias, then one temperature minimising the NLL on the validation split"
            if prior_corrected
            else "one temperature minimising the NLL on the validation split (the bundle "
            "records no training-split counts, so no prior correction)"
        ),
        "logit_offsets": [float(v) for v in offsets],
        "temperature": temperature,
        "split": FIT_SPLIT,
        "images": images,
    }
