"""Out-of-distribution scores: how unlike the validation images an image's pooled features are.

The summary (``ood.safetensors`` beside the weights, listed in ``model.json`` with its SHA-256)
holds the mean and the inverse of a Ledoit-Wolf shrinkage covariance of the validation images'
1024-d global-average-pooled DenseNet features, and the sorted Mahalanobis distances of those
images. The reference distances are cross-fitted (each fold scored by a fit on the other folds):
distances of the very images a covariance was fitted on are biased small in 1024 dimensions,
and an ordinary new image of the same kind would then look unusual.

An image's score is its Mahalanobis distance, its percentile is the share of validation images
closer to the mean, and it is flagged above ``flag_percentile`` (99 by default) of the
validation distances. A flag says "unlike the images this model was checked on"; no flag does
not say the model is right about the image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from cxr.errors import ModelError
from cxr.utils import atomic_write_bytes

OOD_FILE = "ood.safetensors"
OOD_METHOD = "mahalanobis-ledoitwolf"
DEFAULT_FLAG_PERCENTILE = 99.0
DEFAULT_FOLDS = 5
# DenseNet121's 1024 features: an 8 MiB float64 precision matrix; 64 MiB covers it and a
# reference set of a million distances. Anything larger is refused before it is read.
MAX_OOD_BYTES = 64 << 20
MAX_FEATURES = 2048
MIN_REFERENCE_IMAGES = 4
_TENSORS = ("mean", "precision", "reference")


@dataclass(frozen=True)
class OodSummary:
    """Mean [D], precision [D, D], sorted cross-fitted reference distances [N]."""

    mean: np.ndarray
    precision: np.ndarray
    reference: np.ndarray
    flag_percentile: float = DEFAULT_FLAG_PERCENTILE

    @property
    def features(self) -> int:
        return int(self.mean.shape[0])

    @property
    def threshold(self) -> float:
        """The distance above which an image is flagged."""
        return float(np.percentile(self.reference, self.flag_percentile))

    def distances(self, features: np.ndarray) -> np.ndarray:
        return mahalanobis(np.asarray(features, dtype=np.float64), self.mean, self.precision)

    def score(self, features: np.ndarray) -> list[dict[str, Any]]:
        """Per image: ``distance``, ``percentile`` (0-100 among validation images) and
        ``flagged`` (above the ``flag_percentile`` of theirs)."""
        distances = self.distances(features)
        below = np.searchsorted(self.reference, distances, side="right")
        percentiles = 100.0 * below / len(self.reference)
        threshold = self.threshold
        return [
            {"distance": float(d), "percentile": float(p), "flagged": bool(d > threshold)}
            for d, p in zip(distances, percentiles)
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "method": OOD_METHOD,
            "features": self.features,
            "reference_images": int(len(self.reference)),
            "flag_percentile": self.flag_percentile,
            "flag_distance": self.threshold,
        }


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    centred = features - mean[None, :]
    squared = np.einsum("ij,jk,ik->i", centred, precision, centred)
    return np.sqrt(np.maximum(squared, 0.0))


def fit_ood_summary(
    features: np.ndarray,
    *,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    flag_percentile: float = DEFAULT_FLAG_PERCENTILE,
) -> OodSummary:
    """The summary of ``features`` [N, D]: a Ledoit-Wolf fit on all of them and reference
    distances cross-fitted over ``folds`` folds."""
    from sklearn.covariance import LedoitWolf
    from sklearn.model_selection import KFold

    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < MIN_REFERENCE_IMAGES:
        raise ModelError(
            f"an out-of-distribution summary needs at least {MIN_REFERENCE_IMAGES} validation "
            f"images, got {len(features)}"
        )
    if not np.isfinite(features).all():
        raise ModelError("the validation features are not all finite")
    reference = np.empty(len(features))
    splitter = KFold(n_splits=min(folds, len(features)), shuffle=True, random_state=seed)
    for fit_rows, held_out in splitter.split(features):
        fold = LedoitWolf().fit(features[fit_rows])
        reference[held_out] = mahalanobis(features[held_out], fold.location_, fold.precision_)
    full = LedoitWolf().fit(features)
    return OodSummary(full.location_, full.precision_, np.sort(reference), float(flag_percentile))


def save_ood(directory: str | Path, summary: OodSummary) -> dict[str, Any]:
    """Write ``ood.safetensors`` (atomically); returns its entry for ``model.json``."""
    tensors = {
        "mean": np.ascontiguousarray(summary.mean, dtype=np.float64),
        "precision": np.ascontiguousarray(summary.precision, dtype=np.float64),
        "reference": np.ascontiguousarray(summary.reference, dtype=np.float64),
    }
    # One metadata entry: safetensors writes its metadata map in no fixed order, and two
    # entries would make the same summary a file of different bytes (and digest) per process.
    data = save(tensors, metadata={"format": f"cxr-ood/1 {OOD_METHOD}"})
    atomic_write_bytes(Path(directory) / OOD_FILE, data)
    return {
        "file": OOD_FILE,
        "sha256": hashlib.sha256(data).hexdigest(),
        "method": OOD_METHOD,
        "features": summary.features,
        "reference_images": int(len(summary.reference)),
        "flag_percentile": summary.flag_percentile,
    }


def load_ood(directory: str | Path, entry: dict[str, Any]) -> OodSummary:
    """The summary ``entry`` (``model.json``'s ``ood``) names, checked: the file's size before
    it is read, its SHA-256, its tensors' names, shapes and values."""
    path = Path(directory) / entry["file"]
    try:
        size = path.stat().st_size
        if size > MAX_OOD_BYTES:
            raise ModelError(f"{path}: {size:,} bytes, over the limit of {MAX_OOD_BYTES:,}")
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: unreadable out-of-distribution summary ({exc})") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ModelError(f"{path}: SHA-256 differs from model.json's ood.sha256 (changed file)")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as exc:
        raise ModelError(f"{path}: not a safetensors file ({exc})") from None
    return _checked_summary(path, tensors, entry)


def _checked_summary(path: Path, tensors: dict[str, np.ndarray], entry) -> OodSummary:
    if sorted(tensors) != sorted(_TENSORS):
        raise ModelError(f"{path}: expected tensors {', '.join(_TENSORS)}, got {sorted(tensors)}")
    mean, precision, reference = (tensors[name].astype(np.float64) for name in _TENSORS)
    dims = mean.shape[0] if mean.ndim == 1 else -1
    if not 0 < dims <= MAX_FEATURES or dims != entry["features"]:
        raise ModelError(f"{path}: mean: expected {entry['features']} features, got {mean.shape}")
    if precision.shape != (dims, dims):
        raise ModelError(f"{path}: precision: expected ({dims}, {dims}), got {precision.shape}")
    if reference.ndim != 1 or len(reference) < MIN_REFERENCE_IMAGES:
        raise ModelError(f"{path}: reference: expected at least {MIN_REFERENCE_IMAGES} distances")
    if not all(np.isfinite(t).all() for t in (mean, precision, reference)):
        raise ModelError(f"{path}: holds values that are not finite")
    if np.any(np.diff(reference) < 0):
        raise ModelError(f"{path}: reference distances are not sorted")
    return OodSummary(mean, precision, reference, float(entry["flag_percentile"]))
