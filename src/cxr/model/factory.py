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
from cxr.model.bundle import BUNDLE_META, classifier_key, load_bundle
from cxr.model.network import imagenet_weights_path, load_imagenet_backbone, load_weights_file
from cxr.model.registry import DEFAULT_ARCHITECTURE, architecture_of, build

SCRATCH = ("none", "scratch", "")


def create_model(
    weights: str = "imagenet",
    labels: Sequence[str] = PATHOLOGIES,
    *,
    arch: str = DEFAULT_ARCHITECTURE,
    image_size: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The model to train for ``labels``, and a note of where its starting weights came from.

    DenseNet121 (the default) keeps its own path: torchvision's ImageNet file. A timm
    architecture's ImageNet weights come from timm's local cache only (never downloaded here).
    """
    if arch != DEFAULT_ARCHITECTURE:
        return _create_timm(weights, labels, arch, image_size)
    model = build(arch, len(labels))
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


def _create_timm(
    weights: str, labels: Sequence[str], arch: str, image_size: int | None
) -> tuple[nn.Module, dict[str, Any]]:
    if weights in SCRATCH:
        model = build(arch, len(labels), image_size=image_size)
        return model, {"init": "random", "architecture": arch}
    if weights == "imagenet":
        model = build(arch, len(labels), pretrained=True, image_size=image_size)
        return model, {"init": "imagenet", "source": "timm", "architecture": arch}
    path = Path(weights)
    if not path.exists():
        raise ModelError(
            f"{path}: weights not found (use imagenet, none, a weights file, a bundle or a run)"
        )
    model = build(arch, len(labels), image_size=image_size)
    if path.is_dir() or path.suffix == ".safetensors" or path.name == BUNDLE_META:
        return _from_bundle(model, path, labels)
    state = load_weights_file(path)
    head = classifier_key(model) + "."
    backbone = {k: v for k, v in state.items() if not k.startswith(head)}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    if unexpected or [k for k in missing if not k.startswith(head)]:
        raise ModelError(
            f"{path}: weights do not fit {arch} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model, {"init": "file", "file": str(path), "architecture": arch}


def _from_bundle(
    model: nn.Module, path: Path, labels: Sequence[str]
) -> tuple[nn.Module, dict[str, Any]]:
    """The bundle's backbone; each new label's classifier row is the bundle's row for the
    same finding (same name, else the NIH / CheXpert map when one output answers it), and a
    fresh row otherwise."""
    bundle = load_bundle(path)
    source = bundle.model
    arch = architecture_of(model)
    if bundle.meta.architecture != arch.name or bundle.meta.channels != 3:
        raise ModelError(
            f"{path}: a {bundle.meta.architecture} bundle reading {bundle.meta.channels} "
            f"channel(s) cannot start a {arch.name} run on 3-channel images (pass --arch "
            f"{bundle.meta.architecture}, or start from imagenet)"
        )
    if arch.family == "densenet":
        model.features.load_state_dict(source.features.state_dict())
    else:
        head = classifier_key(model) + "."
        state = {k: v for k, v in source.state_dict().items() if not k.startswith(head)}
        model.load_state_dict(state, strict=False)
    new_head, old_head = arch.classifier(model), arch.classifier(source)
    mapping = default_label_map(bundle.labels, labels)
    kept: dict[str, str] = {}
    with torch.no_grad():
        for row, label in enumerate(labels):
            sources = mapping.get(label, ())
            if len(sources) != 1:
                continue
            old = bundle.labels.index(sources[0])
            new_head.weight[row] = old_head.weight[old]
            new_head.bias[row] = old_head.bias[old]
            kept[label] = sources[0]
    note = {
        "init": "bundle",
        "file": str(path),
        "kept": kept,
        "new": [label for label in labels if label not in kept],
        "bundle_labels": list(bundle.labels),
    }
    return model, note
