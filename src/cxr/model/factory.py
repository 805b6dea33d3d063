"""The model a run starts from: ImageNet weights, random weights, a weights file or a
trained cxr bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from cxr.errors import ModelError
from cxr.model.bundle import BUNDLE_META, load_bundle
from cxr.model.network import build_model, imagenet_weights_path, load_imagenet_backbone

SCRATCH = ("none", "scratch", "")


def create_model(weights: str = "imagenet") -> tuple[nn.Module, dict[str, Any]]:
    """The model to train, and a note of where its starting weights came from."""
    model = build_model()
    if weights in SCRATCH:
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
