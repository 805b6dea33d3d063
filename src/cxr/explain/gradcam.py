"""Grad-CAM: images and class indices in, heatmaps (and the logits of the same pass) out.

Grad-CAM (Selvaraju et al. 2017) here is the gradient of one class's logit with respect to
DenseNet121's final feature map, the ``ReLU(features(x))`` tensor that the global average pool
reads (1024 x S/32 x S/32), averaged per channel into weights; the weighted channel sum,
ReLU'd, is the map. captum's ``LayerGradCam`` computes it, attached to an identity layer on
that tensor. Choices that guard against the known pitfalls:

- **Layer.** ``model.features`` ends in BatchNorm (``norm5``); torchvision applies the final
  ReLU in ``forward`` (in place, not as a module), so hooking ``features`` would give the
  pre-ReLU map. The map used here is the post-ReLU one the classifier actually sees; for a
  GAP + linear head its Grad-CAM equals CAM (Zhou et al. 2016), ``ReLU(sum_k w_ck A_k)``,
  which the tests check.
- **Speed.** The backbone runs once per batch under ``no_grad``; only the head (pool +
  linear) is differentiated, once per (image, class) pair in one batched captum call. Running
  captum on the whole model would repeat the backbone's forward for every class (measured in
  ``benchmarks/gradcam_speed.py``).
- **Eval mode.** The model is put in eval mode for the call (BatchNorm with batch statistics
  would couple the images and update the running statistics) and its mode is restored after.
- **Magnitudes.** Negative evidence is cut by the ReLU *before* normalising (never ``abs``);
  each map is min-max scaled to [0, 1] after bilinear upsampling, so 1 is the strongest
  evidence; a flat map (no spatial evidence) becomes all zeros, never NaN. Overlays use
  matplotlib's colormaps in RGB order (OpenCV's ``applyColorMap`` returns BGR, which shows
  hot regions as blue when mixed up; see :mod:`cxr.explain.render`).
- **Other architectures.** The map and the head come from the model's entry in
  :mod:`cxr.model.registry`: a timm CNN's last-stage output and timm's own head, a ViT's final
  patch tokens reshaped to their grid (stride 16) with the mean-pool head; the DenseNet path
  above is that registry's ``densenet`` family, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxr.errors import ModelError
from cxr.model.network import unwrap
from cxr.model.registry import (
    DEFAULT_ARCHITECTURE,
    Architecture,
    architecture_of,
    get_architecture,
)

SHIFT_CHOICES = (1, 2, 4, 8)  # shift-and-stitch densities that keep the geometry whole pixels
_FLAT = 1e-12  # a map whose range is below this (relative to its peak) has no spatial evidence


class _Head(nn.Module):
    """The model's head on its feature map: identity (hooked) -> the architecture's pool and
    classifier (DenseNet: GAP -> ``classifier``)."""

    def __init__(self, net: nn.Module, arch: Architecture | None = None):
        super().__init__()
        self.feature_map = nn.Identity()
        if arch is None:  # a DenseNet head given by its classifier alone
            arch, classifier = get_architecture(DEFAULT_ARCHITECTURE), net
            net = nn.Module()
            net.classifier = classifier
        self.net = net
        self.arch = arch

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.arch.head(self.net, self.feature_map(feature_map))


def _plain(model: nn.Module) -> tuple[nn.Module, Architecture]:
    net = unwrap(model)
    arch = architecture_of(net)
    if arch.family == "densenet" and not (
        isinstance(getattr(net, "features", None), nn.Module)
        and isinstance(getattr(net, "classifier", None), nn.Module)
    ):
        raise ModelError(
            f"Grad-CAM needs a DenseNet-style model with .features and .classifier; "
            f"got {type(net).__name__}"
        )
    return net, arch


def gradcam_with_logits(
    model: nn.Module, images: torch.Tensor, class_indices: Sequence[int], *, shifts: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps ``[B, K, S, S]`` (float32, [0, 1]) and the logits ``[B, classes]``.

    ``model`` is DenseNet-shaped (``features`` -> ReLU -> global average pool ->
    ``classifier``), as :func:`cxr.model.build_model` makes it; the logits are the model's own
    output for ``images``, from the same forward pass. ``shifts`` > 1 samples the map
    ``shifts`` times more densely per axis by shift-and-stitch (see :func:`_stitched_cams`).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, S, S], got shape {tuple(images.shape)}")
    if shifts not in SHIFT_CHOICES:
        raise ValueError(f"shifts must be one of {SHIFT_CHOICES}, not {shifts!r}")
    classes = [int(c) for c in class_indices]
    net, arch = _plain(model)
    if shifts > 1 and arch.family == "timm-vit":
        raise ValueError(
            "shift-and-stitch needs a convolutional network; a ViT's patch grid is fixed"
        )
    batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    was_training = net.training
    net.eval()
    try:
        # inference_mode(False): callers may hold the model inside torch.inference_mode().
        with torch.inference_mode(False):
            device = next(net.parameters()).device
            pixels = images.detach().to(device).clone()
            head = _Head(net, arch)
            with torch.no_grad():
                feature_map = arch.feature_map(net, pixels)
                logits = head(feature_map).float()
            if not classes or batch == 0:
                empty = np.zeros((batch, len(classes), height, width), dtype=np.float32)
                return empty, logits.cpu().numpy()
            for index in classes:
                if not 0 <= index < logits.shape[1]:
                    raise ValueError(f"class index {index} outside 0..{logits.shape[1] - 1}")
            if shifts == 1:
                cam = _raw_cams(head, feature_map, classes)
                cam = F.interpolate(cam, (height, width), mode="bilinear", align_corners=False)
            else:
                cam = _stitched_cams(net, head, pixels, feature_map, classes, shifts)
            maps = _normalise(cam)
            return maps.cpu().numpy().astype(np.float32), logits.cpu().numpy()
    finally:
        net.train(was_training)


def _raw_cams(head: _Head, feature_map: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """captum's Grad-CAM, ReLU'd, at the feature map's resolution: ``[B, K, h, w]``."""
    from captum.attr import LayerGradCam  # here: captum takes seconds to import

    batch = feature_map.shape[0]
    # One row per (image, class) pair, so one captum call covers every map.
    repeated = feature_map.repeat_interleave(len(classes), dim=0)
    cam = LayerGradCam(head, head.feature_map).attribute(
        repeated, target=classes * batch, relu_attributions=True
    )
    return cam.detach().float().reshape(batch, len(classes), *cam.shape[-2:])


def _stitched_cams(
    net: nn.Module,
    head: _Head,
    pixels: torch.Tensor,
    unshifted: torch.Tensor,
    classes: list[int],
    shifts: int,
) -> torch.Tensor:
    """Grad-CAM sampled every ``32 / shifts`` input pixels instead of every 32, ``[B, K, S, S]``.

    The final feature map has one cell per 32 x 32 pixels, so a plain Grad-CAM's maximum can
    only sit on a cell centre. Shift-and-stitch (Long et al. 2015, "Fully Convolutional
    Networks", section 3.2) runs the backbone once per sub-cell offset, here by cropping
    ``m * 32 / shifts`` pixels off the top and/or left (cropping, not padding: a padded band
    is an input the model never saw, and it lit up maps at the image's edge), and interleaves
    the cells of the ``shifts ** 2`` maps into one map ``shifts`` times denser per axis. Each
    pass's map is multiplied by its cell count, which makes it the class activation map
    ``ReLU(sum_k w_ck A_k)`` for this GAP + linear head, so passes with one cell fewer stay on
    the same scale. No library implements this for Grad-CAM, hence here. Cost: ``shifts ** 2``
    backbone passes, the first of which (``unshifted``, the ReLU'd feature map of ``pixels``)
    the caller already ran.
    """
    batch, _, height, width = pixels.shape
    stride = head.arch.stride
    step = stride // shifts
    fine = None
    for row_shift in range(shifts):
        for col_shift in range(shifts):
            top, left = row_shift * step, col_shift * step
            if top == left == 0:
                feature_map = unshifted
            else:
                with torch.no_grad():
                    feature_map = head.arch.feature_map(net, pixels[..., top:, left:])
            cam = _raw_cams(head, feature_map, classes)
            cam = cam * (cam.shape[-2] * cam.shape[-1])
            if fine is None:  # the unshifted pass has the most cells: it sets the grid
                size_h = (cam.shape[-2] - 1) * shifts + 1
                size_w = (cam.shape[-1] - 1) * shifts + 1
                fine = cam.new_zeros(batch, len(classes), size_h, size_w)
            # Cell k of the pass cropped by m steps is centred on input pixel
            # 32 k + 16 + m * step: fine sample k * shifts + m, every `step` pixels from 16.
            rows = fine[..., row_shift::shifts, :].shape[-2]
            cols = fine[..., col_shift::shifts].shape[-1]
            fine[..., row_shift::shifts, col_shift::shifts] = cam[..., :rows, :cols]
    vertical = _linear_weights(height, fine.shape[-2], step, stride).to(fine)
    horizontal = _linear_weights(width, fine.shape[-1], step, stride).to(fine)
    return torch.einsum("yi,bkij,xj->bkyx", vertical, fine, horizontal)


def _linear_weights(pixels: int, samples: int, step: int, stride: int = 32) -> torch.Tensor:
    """``[pixels, samples]``: linear interpolation from samples at ``16 + i * step`` to pixel
    centres, held constant beyond the outermost samples (as bilinear upsampling does)."""
    position = (torch.arange(pixels, dtype=torch.float64) + 0.5 - stride / 2) / step
    position = position.clamp(0, samples - 1)
    lower = position.floor().long().clamp(max=samples - 1)
    upper = (lower + 1).clamp(max=samples - 1)
    fraction = (position - lower).float()
    weights = torch.zeros(pixels, samples)
    weights[torch.arange(pixels), lower] += 1 - fraction
    weights[torch.arange(pixels), upper] += fraction
    return weights


def gradcam(
    model: nn.Module, images: torch.Tensor, class_indices: Sequence[int], *, shifts: int = 1
) -> np.ndarray:
    """Grad-CAM for each image and class: ``[B, len(class_indices), S, S]`` float32 in [0, 1].

    The model is evaluated in eval mode (its previous mode is restored afterwards); flat maps
    are all zeros; no parameter's ``.grad`` is touched.
    """
    return gradcam_with_logits(model, images, class_indices, shifts=shifts)[0]


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each ``[S, S]`` map to [0, 1]; flat or non-finite maps become zeros."""
    maps = torch.nan_to_num(maps.clamp_min(0), nan=0.0, posinf=0.0, neginf=0.0)
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    span = high - low
    flat = span <= _FLAT * high.clamp_min(1e-30)
    scaled = (maps - low) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, torch.zeros_like(scaled), scaled).clamp_(0.0, 1.0)
