"""What is fitted on the validation split after training and stored in the bundle: the
calibration (temperature) and the per-class decision thresholds.

**Calibration** has two steps, each a strictly increasing map of every class's logit, so
that every AUROC (a ranking statistic) is unchanged:

1. *Prior correction.* The method's loss weights positives by the negative fraction and
   negatives by the positive fraction of the training split, which moves the optimum's odds
   by ``N / P``: a class at 5 % prevalence comes out near 0.5. Adding ``log(P / N)`` (the
   training split's positives P and negatives N, stored in ``model.json``) to the logit undoes
   this exactly; nothing is fitted. The offsets are folded into the classifier's bias in
   ``model.safetensors`` (recorded as ``calibration.logit_offsets``), so that every consumer
   of the bundle -- ``cxr evaluate``, ``cxr predict``, the service, the ONNX export -- applies
   them without knowing about them; recalibrating replaces them rather than adding twice.
2. *Temperature scaling* (Guo et al. 2017): probabilities become ``sigmoid(logit / T)`` with
   one ``T > 0`` minimising the binary cross-entropy (NLL) of the validation labels over all
   images and classes, stored as ``temperature``. One temperature for the 14 classes, not one
   per class: the bundle, ``cxr predict``, the service and Grad-CAM read a scalar
   ``temperature``; rare classes (Hernia is about 0.2 % of images) have a handful of
   validation positives, on which a per-class temperature would be fitted to noise; and the
   per-class part of the miscalibration, the prior shift, is removed exactly by step 1.
   Temperature scaling alone cannot move a class's base rate: on a model trained with the
   weighted loss it only pushes every probability towards 0.5.

**Thresholds** are refitted on the validation split's (calibrated) probabilities with one of
:data:`cxr.evaluate.THRESHOLD_RULES`; the rule is stored with them (``threshold_rule``, a
sentence starting with the rule's name, and ``threshold_fit``, its parameters). Calibrating
refits the thresholds with the stored rule: the rules cut at validation scores, and
calibration moves every score monotonically, so the calls stay what they were.

Library code: returns values or raises :mod:`cxr.errors`; never prints.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.errors import ConfigError, DataError
from cxr.evaluate import THRESHOLD_RULES, choose_thresholds, sigmoid
from cxr.labels import PATHOLOGIES
from cxr.metrics import expected_calibration_error

TEMPERATURE_BOUNDS = (0.01, 100.0)
DEFAULT_TARGET_SENSITIVITY = 0.9
FIT_SPLIT = "val"


# ---------------------------------------------------------------------------- temperature


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits / T)`` over every image and class."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(labels, dtype=np.float64)
    # -[y log s(z) + (1 - y) log(1 - s(z))] = softplus(z) - y z, computed without overflow.
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` in :data:`TEMPERATURE_BOUNDS` minimising :func:`nll` on these logits.

    The NLL is convex in ``1 / T``, so a bounded scalar search on ``log T`` finds its minimum.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if logits.shape != labels.shape or not logits.size:
        raise DataError(f"cannot fit a temperature: logits {logits.shape}, labels {labels.shape}")
    if not np.isfinite(logits).all():
        raise DataError("cannot fit a temperature: non-finite logits")
    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_t: nll(logits, labels, math.exp(log_t)),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-6},
    )
    fitted = float(math.exp(result.x))
    # The bounded search never evaluates T = 1 exactly; keep 1 if it is at least as good.
    return fitted if nll(logits, labels, fitted) < nll(logits, labels, 1.0) else 1.0


def mean_ece(labels: np.ndarray, probabilities: np.ndarray) -> float | None:
    """Expected calibration error averaged over the classes present in ``labels``' columns."""
    values = [
        expected_calibration_error(labels[:, c], probabilities[:, c])
        for c in range(labels.shape[1])
    ]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# ---------------------------------------------------------------------------- thresholds


def describe_rule(rule: str, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY) -> str:
    """The sentence stored as ``threshold_rule``: it starts with the rule's name."""
    if rule == "youden":
        return "youden (Youden's J on the validation split)"
    if rule == "sensitivity":
        return (
            f"sensitivity {target_sensitivity:g} (the highest threshold reaching sensitivity "
            f"{target_sensitivity:g} on the validation split)"
        )
    if rule == "f1":
        return "f1 (maximum F1 on the validation split)"
    raise ConfigError(f"unknown threshold rule {rule!r}; choose from {', '.join(THRESHOLD_RULES)}")


def stored_rule(meta: dict[str, Any]) -> tuple[str, float]:
    """The bundle's threshold rule and target sensitivity (Youden's J if it names none)."""
    fit = meta.get("threshold_fit") or {}
    if fit.get("rule") in THRESHOLD_RULES:
        return fit["rule"], float(fit.get("target_sensitivity", DEFAULT_TARGET_SENSITIVITY))
    words = str(meta.get("threshold_rule") or "").split()
    rule = words[0] if words and words[0] in THRESHOLD_RULES else "youden"
    target = DEFAULT_TARGET_SENSITIVITY
    if rule == "sensitivity" and len(words) > 1:
        with contextlib.suppress(ValueError):
            target = float(words[1])
    return rule, target


def validate_rule(rule: str, target_sensitivity: float) -> None:
    if rule not in THRESHOLD_RULES:
        raise ConfigError(
            f"unknown threshold rule {rule!r}; choose from {', '.join(THRESHOLD_RULES)}"
        )
    if not 0.0 < target_sensitivity <= 1.0:
        raise ConfigError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")


def threshold_meta(
    thresholds: list[float],
    rule: str,
    target_sensitivity: float,
    images: int,
    temperature: float,
    kept: list[str] | None = None,
) -> dict[str, Any]:
    """The ``model.json`` entries that record a threshold fit."""
    fit: dict[str, Any] = {"rule": rule, "split": FIT_SPLIT, "images": int(images)}
    if rule == "sensitivity":
        fit["target_sensitivity"] = float(target_sensitivity)
    fit["temperature"] = float(temperature)
    fit["not_fitted"] = list(kept or [])  # no positives or no negatives in val: kept
    return {
        "thresholds": [float(t) for t in thresholds],
        "threshold_rule": describe_rule(rule, target_sensitivity),
        "threshold_fit": fit,
    }


def fit_thresholds(
    labels: np.ndarray,
    prob: np.ndarray,
    rule: str,
    target_sensitivity: float,
    previous: list[float],
) -> tuple[list[float], list[str]]:
    """The rule's thresholds per class, and the classes that keep ``previous``.

    A class whose validation labels are all positive or all negative has nothing to fit a
    threshold on; it keeps the one it had (for a new calibration, mapped through it by the
    caller) rather than a default that would silently change its calls.
    """
    fitted = choose_thresholds(labels, prob, rule, target_sensitivity)
    kept = []
    for c, name in enumerate(PATHOLOGIES[: labels.shape[1]]):
        if labels[:, c].min() == labels[:, c].max():
            fitted[c] = float(previous[c])
            kept.append(name)
    return fitted, kept


# ---------------------------------------------------------------------------- on a run


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    """The bundle's ``model.json`` (without loading the weights)."""
    import json

    from cxr.errors import ModelError
    from cxr.model import resolve_bundle

    path = resolve_bundle(run_dir)[1]
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable bundle description ({exc})") from None


def _thresholds(meta: dict[str, Any]) -> list[float]:
    values = meta.get("thresholds")
    count = len(meta.get("labels", PATHOLOGIES))
    return [float(v) for v in values] if values else [0.5] * count


def _bundle_mtime(run_dir: Path) -> float:
    from cxr.model import BUNDLE_META, BUNDLE_WEIGHTS

    return max((run_dir / name).stat().st_mtime_ns for name in (BUNDLE_META, BUNDLE_WEIGHTS))


def predictions_are_fresh(run_dir: str | Path, split: str) -> bool:
    """Whether ``predictions-<split>.csv`` and its metrics were written by the current bundle.

    Fresh means newer than both bundle files: a new temperature, new thresholds or new
    weights all rewrite one of them.
    """
    from cxr.run import RunFolder

    run = RunFolder(run_dir)
    path = run.predictions(split)
    if not path.exists() or split not in run.read_metrics():
        return False
    return path.stat().st_mtime_ns > _bundle_mtime(run.root)


def ensure_predictions(
    run_dir: str | Path,
    split: str,
    *,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """The split's predictions table, re-running :func:`cxr.evaluate.evaluate_run` if it is
    missing or older than the bundle."""
    from cxr.data.nih import IMAGE_COLUMN, PATIENT_COLUMN
    from cxr.evaluate import evaluate_run
    from cxr.run import RunFolder

    run = RunFolder(run_dir).require()
    if not predictions_are_fresh(run.root, split):
        evaluate_run(
            run.root,
            split,
            device=device,
            batch_size=batch_size,
            workers=workers,
            on_batch=on_batch,
        )
    return pd.read_csv(run.predictions(split), dtype={IMAGE_COLUMN: str, PATIENT_COLUMN: str})


def prediction_arrays(predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities), each ``[N, 14]``, from a predictions table."""
    labels = predictions[[f"true_{n}" for n in PATHOLOGIES]].to_numpy(dtype=np.float64)
    prob = predictions[[f"prob_{n}" for n in PATHOLOGIES]].to_numpy(dtype=np.float64)
    return labels, prob


def refit_thresholds(
    run_dir: str | Path,
    rule: str = "youden",
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    *,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Choose per-class thresholds on the validation predictions with ``rule``; store them."""
    from cxr.model import update_bundle_meta

    validate_rule(rule, target_sensitivity)
    run_dir = Path(run_dir)
    predictions = ensure_predictions(
        run_dir, FIT_SPLIT, device=device, batch_size=batch_size, workers=workers, on_batch=on_batch
    )
    labels, prob = prediction_arrays(predictions)
    meta = read_meta(run_dir)
    temperature = float(meta.get("temperature", 1.0) or 1.0)
    before = _thresholds(meta)
    thresholds, kept = fit_thresholds(labels, prob, rule, target_sensitivity, before)
    changes = threshold_meta(thresholds, rule, target_sensitivity, len(labels), temperature, kept)
    update_bundle_meta(run_dir, **changes)
    return {**changes, "previous_thresholds": before, "labels": list(PATHOLOGIES)}


def split_logits(
    run_dir: str | Path,
    split: str = FIT_SPLIT,
    *,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits), each ``[N, 14]`` in the split table's order, from the run's bundle.

    The raw logits (temperature 1): calibration needs them, not probabilities.
    """
    import torch

    from cxr.data.dataset import Preprocess, XrayDataset
    from cxr.data.nih import PATH_COLUMN, label_matrix
    from cxr.evaluate import predict_logits
    from cxr.model import load_bundle
    from cxr.run import RunFolder

    run = RunFolder(run_dir).require()
    frame = run.read_split(split)
    if frame.empty:
        raise DataError(f"split {split!r} of {run.root} has no images")
    name = "cuda" if device == "auto" and torch.cuda.is_available() else device
    device_obj = torch.device("cpu" if name == "auto" else name)
    bundle = load_bundle(run.root, device=device_obj)
    labels = label_matrix(frame)
    dataset = XrayDataset(
        frame[PATH_COLUMN].tolist(), labels, Preprocess(bundle.image_size, bundle.normalization)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    indices, logits = predict_logits(bundle.model, loader, device_obj, on_batch=on_batch)
    return labels.astype(np.float64), logits[np.argsort(indices, kind="stable")].astype(np.float64)


def prior_offsets(meta: dict[str, Any]) -> list[float] | None:
    """Per class ``log(P / N)`` of the training split (from ``model.json``'s
    ``training_data``): the logit shift that undoes the class-weighted loss; 0 for a class
    without positives or negatives. ``None`` if the bundle does not record the counts."""
    data = meta.get("training_data") or {}
    positives, images = data.get("train_positives"), data.get("train_images")
    if not positives or not images:
        return None
    offsets = []
    for name in meta.get("labels", PATHOLOGIES):
        count = int(positives.get(name, 0))
        offsets.append(math.log(count / (images - count)) if 0 < count < images else 0.0)
    return offsets


def _shift_classifier_bias(run_dir: Path, shift: np.ndarray) -> None:
    """Add ``shift`` to the classifier's bias in ``model.safetensors`` (atomically)."""
    import torch
    from safetensors.torch import load_file, save

    from cxr.errors import ModelError
    from cxr.model import BUNDLE_WEIGHTS
    from cxr.utils import atomic_write_bytes

    path = run_dir / BUNDLE_WEIGHTS
    state = load_file(str(path), device="cpu")
    bias = state.get("classifier.bias")
    if bias is None or bias.shape != (len(shift),):
        raise ModelError(f"{path}: no classifier bias of {len(shift)} outputs to calibrate")
    state["classifier.bias"] = (bias.double() + torch.from_numpy(shift)).to(bias.dtype)
    atomic_write_bytes(path, save(state, metadata={"format": "cxr"}))


def calibrate_run(
    run_dir: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Prior correction + temperature scaling fitted on the validation split, stored in the
    bundle; then the thresholds refitted on the calibrated validation probabilities with the
    bundle's stored rule."""
    from cxr.model import update_bundle_meta

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    labels, logits = split_logits(
        run_dir, FIT_SPLIT, device=device, batch_size=batch_size, workers=workers, on_batch=on_batch
    )
    classes = labels.shape[1]
    previous = float(meta.get("temperature", 1.0) or 1.0)
    applied = np.asarray(
        (meta.get("calibration") or {}).get("logit_offsets") or [0.0] * classes, dtype=np.float64
    )
    offsets = prior_offsets(meta)
    new_offsets = np.asarray(offsets if offsets is not None else [0.0] * classes)
    raw = logits - applied[None, :]  # what the uncalibrated model outputs
    shifted = raw + new_offsets[None, :]
    temperature = fit_temperature(shifted, labels)
    rule, target = stored_rule(meta)
    before_prob, after_prob = sigmoid(logits, previous), sigmoid(shifted, temperature)
    # A class that keeps its threshold keeps its calls: its old threshold, mapped through the
    # change of calibration (old probability -> raw logit -> new probability).
    old = np.clip(np.asarray(_thresholds(meta), dtype=np.float64), 1e-12, 1 - 1e-12)
    old_raw_logit = previous * np.log(old / (1 - old)) - applied
    mapped = sigmoid(old_raw_logit + new_offsets, temperature).tolist()
    thresholds, kept = fit_thresholds(labels, after_prob, rule, target, mapped)
    changes = threshold_meta(thresholds, rule, target, len(labels), temperature, kept)
    _shift_classifier_bias(run_dir, new_offsets - applied)
    update_bundle_meta(
        run_dir,
        temperature=temperature,
        calibration={
            "method": (
                "prior correction log(P/N) of the training split folded into the classifier "
                "bias, then one temperature minimising the NLL on the validation split"
                if offsets is not None
                else "one temperature minimising the NLL on the validation split (the bundle "
                "records no training-split counts, so no prior correction)"
            ),
            "logit_offsets": [float(v) for v in new_offsets],
            "temperature": temperature,
            "split": FIT_SPLIT,
            "images": len(labels),
        },
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
        "val_ece_before": mean_ece(labels, before_prob),
        "val_ece_after": mean_ece(labels, after_prob),
        "threshold_rule": changes["threshold_rule"],
        "thresholds": changes["thresholds"],
        "previous_thresholds": _thresholds(meta),
    }
