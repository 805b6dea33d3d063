"""The architectures cxr can build, train, explain and export: name -> :class:`Architecture`.

Adding one is one entry in :data:`ARCHITECTURES`. Every architecture is seen by the rest of
cxr through the same four steps, so predict, Grad-CAM, the out-of-distribution score and the
ONNX export need no per-model code:

``feature_map(x)`` ``[N, C, h, w]``  ->  ``pool(map)`` ``[N, C']``  ->  ``classify(pooled)``
``[N, classes]``; ``classifier`` is the final linear layer (what fine-tuning re-maps).

- **DenseNet121** (torchvision; cxr's default since its first version, and the network of
  torchxrayvision's and CheXNet's checkpoints): the map is ``ReLU(features(x))``, the tensor
  the global average pool reads, 1024 x S/32 x S/32.
- **timm CNNs** (ResNet, EfficientNet, ConvNeXt): the map is ``forward_features(x)``, the last
  stage's output, and the head is timm's own ``forward_head`` (pool, ConvNeXt's norm, fc).
- **timm ViTs**: the map is the final patch tokens reshaped to their grid (S/16 x S/16),
  prefix (class) tokens left out. cxr builds ViTs with ``global_pool="avg"`` (mean of the
  patch tokens, then timm's ``fc_norm``): with the class-token head the logits would read a
  token that has no place on the image, and Grad-CAM on the patch grid would only see the
  evidence that reaches it through the last attention layer. With the mean pool the head reads
  the grid directly, as a CNN's does.

timm is imported only when a timm architecture is built (``pip install "cxr[timm]"``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cxr.errors import ModelError

DEFAULT_ARCHITECTURE = "densenet121"
TIMM_EXTRA = 'pip install "cxr[timm]"'


@dataclass(frozen=True)
class Architecture:
    """One buildable network and how cxr reads it.

    ``family``: ``densenet`` (torchvision), ``timm-cnn`` or ``timm-vit``; ``stride``: input
    pixels per cell of the Grad-CAM map; ``timm_name``: the name given to
    ``timm.create_model``; ``timm_args``: keyword arguments cxr always passes it.
    ``onnx_note``: what the ONNX export of this family needs to know (see docs).
    """

    name: str
    family: str
    stride: int
    timm_name: str | None = None
    timm_args: dict[str, Any] = field(default_factory=dict)
    onnx_note: str = ""

    # -- building -------------------------------------------------------------------------

    def build(
        self,
        num_classes: int,
        channels: int = 3,
        *,
        pretrained: bool = False,
        image_size: int | None = None,
    ) -> nn.Module:
        """A fresh model with ``num_classes`` outputs reading ``channels``-channel images;
        ``pretrained``: timm's ImageNet weights from its local cache (never downloaded);
        ``image_size``: the input size a ViT's position embedding is made for."""
        if self.family == "densenet":
            from cxr.model.network import build_model

            return build_model(num_classes, channels=channels)
        extra = dict(self.timm_args)
        if self.family == "timm-vit" and image_size is not None:
            extra["img_size"] = image_size
        try:
            with _offline():
                return import_timm().create_model(
                    self.timm_name,
                    pretrained=pretrained,
                    num_classes=num_classes,
                    in_chans=channels,
                    **extra,
                )
        except ModelError:
            raise
        except Exception as exc:
            if not pretrained:
                raise ModelError(f"timm could not build {self.timm_name}: {exc}") from None
            raise ModelError(
                f"ImageNet weights for {self.name} are not in the local timm / Hugging Face "
                f"cache ({_hf_cache()}): {exc.__class__.__name__}: {str(exc)[:200]}. "
                f'Download them once where there is internet (python -c "import timm; '
                f"timm.create_model('{self.timm_name}', pretrained=True)\") or pass "
                "--weights none to train from scratch."
            ) from None

    # -- reading --------------------------------------------------------------------------

    def feature_map(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The spatial map Grad-CAM differentiates: ``[N, C, h, w]``."""
        if self.family == "densenet":
            return F.relu(model.features(images))
        maps = model.forward_features(images)
        if self.family == "timm-vit":
            prefix = int(getattr(model, "num_prefix_tokens", 0))
            tokens = maps[:, prefix:]
            # The grid from the input's size (static: ONNX tracing keeps it a number).
            patch = self.stride
            rows, cols = images.shape[-2] // patch, images.shape[-1] // patch
            return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, cols)
        return maps

    def pool(self, model: nn.Module, maps: torch.Tensor) -> torch.Tensor:
        """The pooled features ``[N, C']`` the final linear layer reads."""
        if self.family == "densenet":
            return torch.flatten(F.adaptive_avg_pool2d(maps, 1), 1)
        return model.forward_head(self._timm_input(model, maps), pre_logits=True)

    def classify(self, model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(model)(pooled)

    def head(self, model: nn.Module, maps: torch.Tensor) -> torch.Tensor:
        """Logits from the feature map: the part Grad-CAM differentiates."""
        return self.classify(model, self.pool(model, maps))

    def classifier(self, model: nn.Module) -> nn.Linear:
        if self.family == "densenet":
            return model.classifier
        return model.get_classifier()

    def backbone_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Everything but the final linear layer (what ``--freeze-backbone`` freezes)."""
        head = {id(p) for p in self.classifier(model).parameters()}
        return [p for p in model.parameters() if id(p) not in head]

    def _timm_input(self, model: nn.Module, maps: torch.Tensor) -> torch.Tensor:
        if self.family != "timm-vit":
            return maps
        # Back to tokens; the prefix tokens are zeros, which the mean pool leaves out.
        tokens = maps.flatten(2).transpose(1, 2)
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        if prefix:
            tokens = torch.cat(
                [tokens.new_zeros(tokens.shape[0], prefix, tokens.shape[2]), tokens], 1
            )
        return tokens


_CNN_NOTE = "plain convolutional graph; exported with the TorchScript exporter at opset 17"
_VIT_NOTE = (
    "fixed input size: the position embedding is sized for the bundle's image_size, so the "
    "ONNX file takes [N, C, S, S] at that S only (the batch axis stays dynamic)"
)


def _timm_cnn(name: str, **args: Any) -> Architecture:
    return Architecture(name, "timm-cnn", 32, timm_name=name, timm_args=args, onnx_note=_CNN_NOTE)


def _timm_vit(name: str, patch: int, **args: Any) -> Architecture:
    args = {"global_pool": "avg", **args}
    return Architecture(
        name, "timm-vit", patch, timm_name=name, timm_args=args, onnx_note=_VIT_NOTE
    )


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("densenet121", "densenet", 32, onnx_note=_CNN_NOTE),
        _timm_cnn("resnet18"),
        _timm_cnn("resnet50"),
        _timm_cnn("efficientnet_b0"),
        _timm_cnn("convnext_tiny"),
        _timm_vit("vit_tiny_patch16_224", 16),
        _timm_vit("vit_small_patch16_224", 16),
    )
}


def get_architecture(name: str) -> Architecture:
    """The registry entry for ``name``; :class:`ModelError` lists the known ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ModelError(
            f"unknown architecture {name!r} (known: {', '.join(ARCHITECTURES)})"
        ) from None


def architecture_of(model: nn.Module) -> Architecture:
    """The registry entry a built model belongs to (recorded on it by :func:`build`)."""
    from cxr.model.network import unwrap

    name = getattr(unwrap(model), "cxr_architecture", DEFAULT_ARCHITECTURE)
    return get_architecture(name)


def build(
    name: str,
    num_classes: int,
    channels: int = 3,
    *,
    pretrained: bool = False,
    image_size: int | None = None,
) -> nn.Module:
    """A fresh model of architecture ``name``, tagged with its name for :func:`architecture_of`."""
    arch = get_architecture(name)
    model = arch.build(num_classes, channels, pretrained=pretrained, image_size=image_size)
    model.cxr_architecture = name
    return model


def freeze_backbone(model: nn.Module) -> None:
    """Only the final linear layer learns (linear probing)."""
    from cxr.model.network import unwrap

    net = unwrap(model)
    for parameter in architecture_of(net).backbone_parameters(net):
        parameter.requires_grad_(False)


def import_timm():
    try:
        import timm
    except ImportError:
        raise ModelError(f"this architecture needs timm: {TIMM_EXTRA}") from None
    return timm


def _hf_cache() -> str:
    from pathlib import Path

    home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    return os.environ.get("HF_HUB_CACHE", str(Path(home) / "hub"))


class _offline:
    """Hugging Face Hub in offline mode for the call: weights come from the cache or not at all."""

    def __enter__(self) -> None:
        self.saved = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"
        # huggingface_hub reads the variable once, when first imported.
        self.constants = sys.modules.get("huggingface_hub.constants")
        if self.constants is not None:
            self.saved_constant = self.constants.HF_HUB_OFFLINE
            self.constants.HF_HUB_OFFLINE = True

    def __exit__(self, *exc: object) -> None:
        if self.saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = self.saved
        if self.constants is not None:
            self.constants.HF_HUB_OFFLINE = self.saved_constant


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The globally pooled features ``[N, C]`` that the classifier reads."""
    from cxr.model.network import unwrap

    model = unwrap(model)
    arch = architecture_of(model)
    return arch.pool(model, arch.feature_map(model, images))


class WithFeatures(nn.Module):
    """The model answering (logits, pooled features) from one forward pass: what the ONNX
    export and the out-of-distribution score need."""

    def __init__(self, model: nn.Module):
        from cxr.model.network import unwrap

        super().__init__()
        self.model = unwrap(model)
        self.arch = architecture_of(self.model)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.arch.pool(self.model, self.arch.feature_map(self.model, images))
        return self.arch.classify(self.model, features), features
