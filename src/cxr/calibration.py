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
:data:`cxr.metrics.THRESHOLD_RULES`; the rule is stored with them (``threshold_rule``, a
sentence starting with the rule's name, and ``threshold_fit``, its parameters). Calibrating
refits the thresholds with the stored rule: the rules cut at validation scores, and
calibration moves every score monotonically, so the calls stay what they were.

Library code: returns values or raises :mod:`cxr.errors`; never prints.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from cxr.errors import ConfigError, DataError
from cxr.metrics import THRESHOLD_RULES, choose_thresholds, expected_calibration_error
from cxr.model.bundle import BundleMeta

TEMPERATURE_BOUNDS = (0.01, 100.0)


DEFAULT_TARGET_SENSITIVITY = 0.9


FIT_SPLIT = "val"


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits / T)`` over every image and class."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(labels, dtype=np.float64)
    # -[y log s(z) + (1 - y) log(1 - s(z))] = softplus(z) - y z, computed without overflow;
    # unknown labels (NaN) are left out of the mean.
    cells = np.logaddexp(0.0, z) - y * z
    return float(np.nanmean(cells)) if np.isnan(y).any() else float(np.mean(cells))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` in :data:`TEMPERATURE_BOUNDS` minimising :func:`nll` on these logits.

    The NLL is convex in ``1 / T``, so a bounded scalar search on ``log T`` finds its minimum.
    """
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


def stored_rule(meta: BundleMeta) -> tuple[str, float]:
    """The bundle's threshold rule and target sensitivity (Youden's J if it names none)."""
    fit = meta.threshold_fit or {}
    if fit.get("rule") in THRESHOLD_RULES:
        return fit["rule"], float(fit.get("target_sensitivity", DEFAULT_TARGET_SENSITIVITY))
    words = str(meta.threshold_rule or "").split()
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
    names: Sequence[str],
) -> tuple[list[float], list[str]]:
    """The rule's thresholds per class, and the classes that keep ``previous``.

    A class whose validation labels are all positive or all negative has nothing to fit a
    threshold on; it keeps the one it had (for a new calibration, mapped through it by the
    caller) rather than a default that would silently change its calls.
    """
    fitted = choose_thresholds(labels, prob, rule, target_sensitivity)
    kept = []
    for c, name in enumerate(names[: labels.shape[1]]):
        if labels[:, c].min() == labels[:, c].max():
            fitted[c] = float(previous[c])
            kept.append(name)
    return fitted, kept


def prior_offsets(meta: BundleMeta) -> list[float] | None:
    """Per class ``log(P / N)`` of the training split (from ``model.json``'s
    ``training_data``): the logit shift that undoes the class-weighted loss; 0 for a class
    without positives or negatives. ``None`` if the bundle does not record the counts."""
    data = meta.training_data or {}
    positives, images = data.get("train_positives"), data.get("train_images")
    if not positives or not images:
        return None
    offsets = []
    for name in meta.labels:
        count = int(positives.get(name, 0))
        offsets.append(math.log(count / (images - count)) if 0 < count < images else 0.0)
    return offsets
