"""The network: DenseNet121 + global average pooling + one dense layer, and loading
ImageNet weights into its feature extractor (torchvision's file, downloaded or local)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn
from torchvision.models import DenseNet121_Weights, densenet121

from cxr.errors import ModelError
from cxr.labels import PATHOLOGIES

ARCHITECTURE = "densenet121"
FEATURE_STRIDE = 32  # input pixels per cell of DenseNet121's final feature map
IMAGENET_WEIGHTS = DenseNet121_Weights.IMAGENET1K_V1
# torchvision's published DenseNet files (and CheXNet's checkpoints, saved with torchvision
# 0.2) use the old key names 'norm.1', 'conv.2', ...; torchvision renames them in a private
# helper, so the same rename is done here for local and imported files.
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(.+)$")


def imagenet_weights_path() -> Path:
    """Where torchvision caches the ImageNet file (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(IMAGENET_WEIGHTS.url)


def build_model(num_classes: int = len(PATHOLOGIES), *, channels: int = 3) -> nn.Module:
    """DenseNet121 whose classifier is one Linear layer on the globally pooled features.

    torchvision's DenseNet already ends in ReLU -> adaptive average pool -> flatten ->
    ``classifier``; the model returns logits and a sigmoid gives the 14 probabilities.
    ``channels`` 1 replaces the first convolution by a one-channel one, as torchxrayvision's
    DenseNet has it (same key names, so its weights load as they are).
    """
    model = densenet121(weights=None)
    model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    if channels != 3:
        first = model.features.conv0
        model.features.conv0 = nn.Conv2d(
            channels, first.out_channels, first.kernel_size, first.stride, first.padding, bias=False
        )
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
    state = load_weights_file(path)
    state = {rename_old_densenet_key(k): v for k, v in state.items()}
    features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ModelError(f"{path}: not a DenseNet121 state dict (no 'features.*' weights)")
    try:
        model.features.load_state_dict(features)
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit DenseNet121 ({exc})") from None


def rename_old_densenet_key(key: str) -> str:
    """``...denselayer1.norm.1.weight`` -> ``...denselayer1.norm1.weight``; others unchanged."""
    match = _OLD_DENSENET_KEY.match(key)
    return f"{match.group(1)}{match.group(2)}.{match.group(3)}" if match else key


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
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


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
