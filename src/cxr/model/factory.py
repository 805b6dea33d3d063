"""The model a run starts from: ImageNet weights, random weights, a weights file, or a
trained cxr bundle (fine-tuning: its outputs are matched to the new labels by name)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr.errors import ModelError
from cxr.labels import PATHOLOGIES, default_label_map
from cxr.model.bundle import BUNDLE_META, load_bundle
from cxr.model.network import build_model, imagenet_weights_path, load_imagenet_backbone

SCRATCH = ("none", "scratch", "")


def create_model(
    weights: str = "imagenet", labels: Sequence[str] = PATHOLOGIES
) -> tuple[nn.Module, dict[str, Any]]:
    """The model to train for ``labels``, and a note of where its starting weights came from."""
    model = build_model(len(labels))
    if weights in SCRATCH:
        return model, {"init": "random"}
    if weights == "imagenet":
        load_imagenet_backbone(model)
        return model, {"init": "imagenet", "file": str(imagenet_weights_path())}
    path = Path(weights)
    if not path.exists():
        raise ModelError(
            f"{path}: weights not found (use imagenet, none, a weights file, a bundle or a run)"
        )
    if path.is_dir() or path.suffix == ".safetensors" or path.name == BUNDLE_META:
        return _from_bundle(model, path, labels)
    load_imagenet_backbone(model, path)
    return model, {"init": "file", "file": str(path)}


def _from_bundle(
    model: nn.Module, path: Path, labels: Sequence[str]
) -> tuple[nn.Module, dict[str, Any]]:
    """The bundle's backbone; each new label's classifier row is the bundle's row for the
    same finding (same name, else the NIH / CheXpert map when one output answers it), and a
    fresh row otherwise."""
    bundle = load_bundle(path)
    source = bundle.model
    model.features.load_state_dict(source.features.state_dict())
    mapping = default_label_map(bundle.labels, labels)
    kept: dict[str, str] = {}
    with torch.no_grad():
        for row, label in enumerate(labels):
            sources = mapping.get(label, ())
            if len(sources) != 1:
                continue
            old = bundle.labels.index(sources[0])
            model.classifier.weight[row] = source.classifier.weight[old]
            model.classifier.bias[row] = source.classifier.bias[old]
            kept[label] = sources[0]
    note = {
        "init": "bundle",
        "file": str(path),
        "kept": kept,
        "new": [label for label in labels if label not in kept],
        "bundle_labels": list(bundle.labels),
    }
    return model, note
