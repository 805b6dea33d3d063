"""DenseNet121 + global average pooling + one dense layer to 14 outputs; weights and bundles."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import DenseNet121_Weights, densenet121

from cxr.errors import ModelError
from cxr.labels import PATHOLOGIES
from cxr.utils import atomic_write_bytes, atomic_write_text

ARCHITECTURE = "densenet121"
BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_META = "model.json"
IMAGENET_WEIGHTS = DenseNet121_Weights.IMAGENET1K_V1
# torchvision's published DenseNet files use the old key names 'norm.1', 'conv.2', ...
# torchvision renames them in a private helper, so the same rename is done here for local files.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def imagenet_weights_path() -> Path:
    """Where torchvision caches the ImageNet file (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(IMAGENET_WEIGHTS.url)


def build_model(num_classes: int = len(PATHOLOGIES)) -> nn.Module:
    """DenseNet121 whose classifier is one Linear layer on the globally pooled features.

    torchvision's DenseNet already ends in ReLU -> adaptive average pool -> flatten ->
    ``classifier``; the model returns logits and a sigmoid gives the 14 probabilities.
    """
    model = densenet121(weights=None)
    model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    return model


def load_imagenet_backbone(model: nn.Module, path: str | Path | None = None) -> None:
    """Put ImageNet weights into the feature extractor; the new classifier stays fresh."""
    path = Path(path) if path else imagenet_weights_path()
    if not path.exists():
        if os.environ.get("CXR_OFFLINE"):
            reason = "CXR_OFFLINE is set"
        else:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(IMAGENET_WEIGHTS.url, str(path), progress=False)
                reason = ""
            except Exception as exc:  # offline: URLError, timeouts, proxies, disk
                reason = f"download failed: {exc}"
        if reason:
            raise ModelError(
                f"ImageNet weights for DenseNet121 are not at {path} ({reason}). "
                f"Download {IMAGENET_WEIGHTS.url} to that path (or set TORCH_HOME), pass "
                "--weights /path/to/densenet121-a639ec97.pth, or pass --weights none to "
                "train from scratch."
            )
    state = _torch_load(path)
    state = {(_rename_old_key(k)): v for k, v in state.items()}
    features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ModelError(f"{path}: not a DenseNet121 state dict (no 'features.*' weights)")
    try:
        model.features.load_state_dict(features)
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit DenseNet121 ({exc})") from None


def _rename_old_key(key: str) -> str:
    match = _OLD_DENSENET_KEY.match(key)
    return match.group(1) + match.group(2) if match else key


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """Load a tensor file without unpickling code (``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{path}: refused to load; it is not a plain weights file ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a cxr checkpoint.pt
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict of tensors")
    return state


def create_model(weights: str = "imagenet") -> tuple[nn.Module, dict[str, Any]]:
    """The model to train, and a note of where its starting weights came from."""
    model = build_model()
    if weights in ("none", "scratch", ""):
        return model, {"init": "random"}
    if weights == "imagenet":
        load_imagenet_backbone(model)
        return model, {"init": "imagenet", "file": str(imagenet_weights_path())}
    path = Path(weights)
    if not path.exists():
        raise ModelError(f"{path}: weights file not found (use imagenet, none, or a file path)")
    if path.is_dir() or path.suffix == ".safetensors" or path.name == BUNDLE_META:
        bundle = load_bundle(path)
        return bundle.model, {"init": "bundle", "file": str(path)}
    load_imagenet_backbone(model, path)
    return model, {"init": "file", "file": str(path)}


@dataclass
class Bundle:
    """A trained model and everything needed to use it on new images."""

    model: nn.Module
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return list(self.meta.get("labels", PATHOLOGIES))

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def normalization(self) -> str:
        return str(self.meta.get("normalization", "imagenet"))

    @property
    def thresholds(self) -> list[float]:
        values = self.meta.get("thresholds")
        return [float(v) for v in values] if values else [0.5] * len(self.labels)

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature", 1.0))


def bundle_meta(
    *,
    image_size: int,
    normalization: str,
    thresholds: list[float] | None = None,
    threshold_rule: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    meta = {
        "format": "cxr-bundle/1",
        "architecture": ARCHITECTURE,
        "labels": list(PATHOLOGIES),
        "image_size": int(image_size),
        "normalization": normalization,
        "output": "sigmoid",
        "thresholds": thresholds,
        "threshold_rule": threshold_rule,
        "temperature": 1.0,
    }
    meta.update(extra)
    return meta


def save_bundle(directory: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (each atomically) into ``directory``."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    atomic_write_bytes(directory / BUNDLE_WEIGHTS, save(state, metadata={"format": "cxr"}))
    atomic_write_text(directory / BUNDLE_META, json.dumps(meta, indent=2) + "\n")
    return directory / BUNDLE_META


def update_bundle_meta(directory: str | Path, **changes: Any) -> dict[str, Any]:
    path = resolve_bundle(directory)[1]
    meta = json.loads(path.read_text())
    meta.update(changes)
    atomic_write_text(path, json.dumps(meta, indent=2) + "\n")
    return meta


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


def load_bundle(path: str | Path, *, device: str | torch.device = "cpu") -> Bundle:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, meta_path = resolve_bundle(path)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{meta_path}: unreadable bundle description ({exc})") from None
    if meta.get("architecture") != ARCHITECTURE:
        raise ModelError(f"{meta_path}: architecture {meta.get('architecture')!r} is not supported")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: unreadable safetensors file ({exc})") from None
    model = build_model(num_classes=len(meta.get("labels", PATHOLOGIES)))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{weights}: weights do not fit the model ({exc})") from None
    model.to(device).eval()
    return Bundle(model=model, meta=meta)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
