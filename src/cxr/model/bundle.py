"""The model bundle: ``model.safetensors`` (weights) + ``model.json`` (:class:`BundleMeta`).

A bundle is everything needed to use a trained model on new images. Its description is one
typed object whose defaults live here and nowhere else; every consumer (evaluate, calibrate,
predict, the ONNX export, the service, the report) reads it through :func:`read_bundle_meta`
or :func:`load_bundle`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from cxr.errors import ModelError
from cxr.labels import PATHOLOGIES
from cxr.model.network import ARCHITECTURE, build_model, unwrap
from cxr.utils import atomic_write_bytes, atomic_write_text

BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_META = "model.json"
BUNDLE_FORMAT = "cxr-bundle/1"
DEFAULT_THRESHOLD = 0.5
# Written only when set: a bundle gains them as it is trained, calibrated and thresholded.
_OPTIONAL = (
    "epoch",
    "val_loss",
    "val_auroc_mean",
    "training_data",
    "calibration",
    "threshold_fit",
)


@dataclass
class BundleMeta:
    """What ``model.json`` holds: the labels and their order, the input the model expects,
    the decision thresholds and the calibration, and how the model was trained."""

    image_size: int
    normalization: str = "imagenet"
    labels: list[str] = field(default_factory=lambda: list(PATHOLOGIES))
    thresholds: list[float] | None = None  # None: DEFAULT_THRESHOLD for every label
    threshold_rule: str | None = None
    temperature: float = 1.0
    format: str = BUNDLE_FORMAT
    architecture: str = ARCHITECTURE
    output: str = "sigmoid"
    epoch: int | None = None
    val_loss: float | None = None
    val_auroc_mean: float | None = None
    training_data: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    threshold_fit: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of newer versions, kept

    @property
    def decision_thresholds(self) -> list[float]:
        """One threshold per label: the stored ones, else the default."""
        if self.thresholds:
            return [float(v) for v in self.thresholds]
        return [DEFAULT_THRESHOLD] * len(self.labels)

    @property
    def effective_temperature(self) -> float:
        return float(self.temperature or 1.0)

    def to_dict(self) -> dict[str, Any]:
        values = {
            "format": self.format,
            "architecture": self.architecture,
            "labels": list(self.labels),
            "image_size": int(self.image_size),
            "normalization": self.normalization,
            "output": self.output,
            "thresholds": self.thresholds,
            "threshold_rule": self.threshold_rule,
            "temperature": self.temperature,
        }
        values.update({k: getattr(self, k) for k in _OPTIONAL if getattr(self, k) is not None})
        values.update(self.extra)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = BUNDLE_META) -> BundleMeta:
        if not isinstance(values, dict):
            raise ModelError(f"{source}: expected a JSON object describing the model")
        if "image_size" not in values:
            raise ModelError(f"{source}: no image_size")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names}
        try:
            meta = cls(**known, extra=extra)
            meta.image_size = int(meta.image_size)
            meta.temperature = float(meta.temperature if meta.temperature is not None else 1.0)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{source}: invalid model description ({exc})") from None
        return meta

    def updated(self, **changes: Any) -> BundleMeta:
        return BundleMeta.from_dict({**self.to_dict(), **changes})


@dataclass
class Bundle:
    """A trained model and its description."""

    model: nn.Module
    meta: BundleMeta

    @property
    def labels(self) -> list[str]:
        return list(self.meta.labels)

    @property
    def image_size(self) -> int:
        return self.meta.image_size

    @property
    def normalization(self) -> str:
        return self.meta.normalization

    @property
    def thresholds(self) -> list[float]:
        return self.meta.decision_thresholds

    @property
    def temperature(self) -> float:
        return self.meta.effective_temperature


def resolve_bundle(path: str | Path) -> tuple[Path, Path]:
    """Accept a run folder, a bundle folder, ``model.json`` or ``model.safetensors``."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights, meta = directory / BUNDLE_WEIGHTS, directory / BUNDLE_META
    if not path.exists():
        raise ModelError(f"{path}: no such model (expected a run folder or a bundle)")
    if not weights.exists() or not meta.exists():
        raise ModelError(
            f"{directory}: no model bundle here (need {BUNDLE_WEIGHTS} and {BUNDLE_META}; "
            "a run gets them after its first validated epoch)"
        )
    return weights, meta


def read_bundle_meta(path: str | Path) -> BundleMeta:
    """The bundle's description, without loading the weights."""
    meta_path = resolve_bundle(path)[1]
    try:
        values = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{meta_path}: unreadable bundle description ({exc})") from None
    meta = BundleMeta.from_dict(values, source=str(meta_path))
    if meta.architecture != ARCHITECTURE:
        raise ModelError(f"{meta_path}: architecture {meta.architecture!r} is not supported")
    return meta


def save_bundle(directory: str | Path, model: nn.Module, meta: BundleMeta) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (each atomically) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    atomic_write_bytes(directory / BUNDLE_WEIGHTS, save(state, metadata={"format": "cxr"}))
    write_bundle_meta(directory, meta)
    return directory / BUNDLE_META


def write_bundle_meta(directory: str | Path, meta: BundleMeta) -> None:
    atomic_write_text(Path(directory) / BUNDLE_META, json.dumps(meta.to_dict(), indent=2) + "\n")


def update_bundle_meta(directory: str | Path, **changes: Any) -> BundleMeta:
    """Change some entries of ``model.json`` (atomically); returns the new description."""
    meta = read_bundle_meta(directory).updated(**changes)
    write_bundle_meta(resolve_bundle(directory)[1].parent, meta)
    return meta


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: unreadable safetensors file ({exc})") from None


def load_bundle(path: str | Path, *, device: str | torch.device = "cpu") -> Bundle:
    """The model in eval mode on ``device``, with its description."""
    weights = resolve_bundle(path)[0]
    meta = read_bundle_meta(path)
    model = build_model(num_classes=len(meta.labels))
    try:
        model.load_state_dict(_read_weights(weights))
    except RuntimeError as exc:
        raise ModelError(f"{weights}: weights do not fit the model ({exc})") from None
    model.to(device).eval()
    return Bundle(model=model, meta=meta)


def shift_classifier_bias(directory: str | Path, shift: np.ndarray) -> None:
    """Add ``shift`` to the classifier's bias in ``model.safetensors`` (atomically)."""
    path = resolve_bundle(directory)[0]
    state = _read_weights(path)
    bias = state.get("classifier.bias")
    if bias is None or bias.shape != (len(shift),):
        raise ModelError(f"{path}: no classifier bias of {len(shift)} outputs to calibrate")
    state["classifier.bias"] = (bias.double() + torch.from_numpy(shift)).to(bias.dtype)
    atomic_write_bytes(path, save(state, metadata={"format": "cxr"}))


def weights_digest(weights: str | Path) -> str:
    """SHA-256 of a weights file, read in blocks."""
    digest = hashlib.sha256()
    with Path(weights).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
