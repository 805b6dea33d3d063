"""Grad-CAM heatmaps, overlays, NIH box mapping and localisation scores (pointing game, IoU).

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
  hot regions as blue when mixed up).

Box files are NIH's ``BBox_List_2017.csv``: a 9-field header over 6-field rows
(``Image Index,Finding Label,x,y,w,h``) in pixels of the stored image, ``Infiltrate`` meaning
Infiltration. Boxes are mapped through the same resize + centre crop the model saw
(:meth:`cxr.data.dataset.Preprocess.geometry`), using each image's actual size.

Library code: returns values or raises :mod:`cxr.errors`; never prints.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cxr.data.dataset import Preprocess
from cxr.data.images import decode_gray
from cxr.errors import DataError, ModelError
from cxr.labels import PATHOLOGIES, canonical_pathology
from cxr.utils import atomic_write_bytes, atomic_write_text, npy_bytes

DEFAULT_THRESHOLDS = (0.25, 0.5, 0.75)
DEFAULT_TOP_K = 3
# Half a cell of DenseNet121's final feature map (stride 32): the finest place plain Grad-CAM
# from that layer can point to. Its maximum is always at a cell centre, so at 128 px (4x4
# cells) a box that holds no cell centre cannot be hit exactly however good the model is,
# unless the map is sampled more densely (``shifts``).
DEFAULT_TOLERANCE_PX = 16.0
FEATURE_STRIDE = 32  # input pixels per cell of DenseNet121's final feature map
SHIFT_CHOICES = (1, 2, 4, 8)  # shift-and-stitch densities that keep the geometry whole pixels
EXPLAIN_MODES = ("positive", "all")
LOCALIZATION_NAME = "localization.json"
EXPLANATIONS_NAME = "explanations.json"
BOX_COLUMNS = ("image", "pathology", "x", "y", "w", "h")
OVERLAY_CMAP = "jet"
OVERLAY_ALPHA = 0.45
_FLAT = 1e-12  # a map whose range is below this (relative to its peak) has no spatial evidence


# ---------------------------------------------------------------------------------------------
# Grad-CAM


class _Head(nn.Module):
    """DenseNet's head on the post-ReLU feature map: identity (hooked) -> GAP -> classifier."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.feature_map = nn.Identity()
        self.classifier = classifier

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        feature_map = self.feature_map(feature_map)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(feature_map, 1), 1))


def _plain(model: nn.Module) -> nn.Module:
    from cxr.model import unwrap

    net = unwrap(model)
    if not isinstance(getattr(net, "features", None), nn.Module) or not isinstance(
        getattr(net, "classifier", None), nn.Module
    ):
        raise ModelError(
            f"Grad-CAM needs a DenseNet-style model with .features and .classifier; "
            f"got {type(net).__name__}"
        )
    return net


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
        raise ValueError(f"images must be [B, 3, S, S], got shape {tuple(images.shape)}")
    if shifts not in SHIFT_CHOICES:
        raise ValueError(f"shifts must be one of {SHIFT_CHOICES}, not {shifts!r}")
    classes = [int(c) for c in class_indices]
    net = _plain(model)
    batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    was_training = net.training
    net.eval()
    try:
        # inference_mode(False): callers may hold the model inside torch.inference_mode().
        with torch.inference_mode(False):
            device = next(net.parameters()).device
            pixels = images.detach().to(device).clone()
            head = _Head(net.classifier)
            with torch.no_grad():
                feature_map = F.relu(net.features(pixels))
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
    from captum.attr import LayerGradCam

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
    step = FEATURE_STRIDE // shifts
    fine = None
    for row_shift in range(shifts):
        for col_shift in range(shifts):
            top, left = row_shift * step, col_shift * step
            if top == left == 0:
                feature_map = unshifted
            else:
                with torch.no_grad():
                    feature_map = F.relu(net.features(pixels[..., top:, left:]))
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
    vertical = _linear_weights(height, fine.shape[-2], step).to(fine)
    horizontal = _linear_weights(width, fine.shape[-1], step).to(fine)
    return torch.einsum("yi,bkij,xj->bkyx", vertical, fine, horizontal)


def _linear_weights(pixels: int, samples: int, step: int) -> torch.Tensor:
    """``[pixels, samples]``: linear interpolation from samples at ``16 + i * step`` to pixel
    centres, held constant beyond the outermost samples (as bilinear upsampling does)."""
    position = (torch.arange(pixels, dtype=torch.float64) + 0.5 - FEATURE_STRIDE / 2) / step
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


# ---------------------------------------------------------------------------------------------
# Overlays


def heatmap_rgb(
    gray: np.ndarray, heatmap: np.ndarray, *, alpha: float = OVERLAY_ALPHA, cmap: str = OVERLAY_CMAP
) -> np.ndarray:
    """The X-ray blended with the colour-mapped heatmap: ``[S, S, 3]`` uint8, RGB order."""
    from matplotlib import colormaps

    gray = np.asarray(gray)
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if gray.shape != heatmap.shape:
        raise ValueError(f"image {gray.shape} and heatmap {heatmap.shape} differ in shape")
    colours = colormaps[cmap](np.clip(np.nan_to_num(heatmap), 0.0, 1.0))[..., :3]
    base = np.repeat((gray.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    blended = (1.0 - alpha) * base + alpha * colours
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


def overlay_png(gray_crop_uint8: np.ndarray, heatmap: np.ndarray, title: str) -> bytes:
    """A PNG: the X-ray crop with the heatmap over it, a colour bar and ``title``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    # Figure + Agg canvas, not pyplot: no global state, safe in threads (the HTTP service).
    figure = Figure(figsize=(5.0, 4.3), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(heatmap_rgb(gray_crop_uint8, heatmap))
    axes.set_axis_off()
    axes.set_title(title, fontsize=10)
    scale = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=OVERLAY_CMAP)
    bar = figure.colorbar(scale, ax=axes, fraction=0.046, pad=0.04)
    bar.set_label("Grad-CAM (0 = none, 1 = strongest)", fontsize=8)
    bar.ax.tick_params(labelsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Boxes


def read_boxes(path: str | os.PathLike) -> pd.DataFrame:
    """NIH's ``BBox_List_2017.csv`` (or ``.csv.gz``) as a table with :data:`BOX_COLUMNS`.

    The header's field count is ignored (NIH's has 9 fields over 6-field rows); labels are
    mapped to the 14 pathology names (``Infiltrate`` -> ``Infiltration``).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise DataError(f"{path}: box file not found") from None
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable box CSV ({exc})") from None
    if not rows or not rows[0] or rows[0][0].strip() != "Image Index":
        raise DataError(f"{path}: expected NIH's header 'Image Index,Finding Label,Bbox [x,...'")
    records = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not field.strip() for field in row):
            continue
        where = f"{path}, line {line}: "
        if len(row) < 6:
            raise DataError(f"{where}expected 6 fields (image, label, x, y, w, h), got {len(row)}")
        name, label = row[0].strip(), row[1].strip()
        try:
            pathology = canonical_pathology(label)
        except ValueError as exc:
            raise DataError(f"{where}{exc}") from None
        try:
            x, y, w, h = (float(value) for value in row[2:6])
        except ValueError:
            raise DataError(f"{where}box {row[2:6]} is not four numbers") from None
        if not all(np.isfinite((x, y, w, h))) or w <= 0 or h <= 0:
            raise DataError(f"{where}box {row[2:6]} needs finite values and w, h > 0")
        records.append((name, pathology, x, y, w, h))
    if not records:
        raise DataError(f"{path}: the box file has a header but no boxes")
    return pd.DataFrame.from_records(records, columns=list(BOX_COLUMNS))


def map_box(
    box: Sequence[float], orig_h: int, orig_w: int, preprocess: Preprocess
) -> tuple[float, float, float, float]:
    """``(x, y, w, h)`` in the original image's pixels -> the same box in the model's crop.

    The image is resized so its shorter side is ``image_size`` and centre-cropped
    (:meth:`Preprocess.geometry`); the mapped box is clipped to the crop, so a box wholly
    outside it comes back with zero width or height.
    """
    x, y, w, h = (float(v) for v in box)
    new_h, new_w, top, left = preprocess.geometry(int(orig_h), int(orig_w))
    sx, sy = new_w / orig_w, new_h / orig_h
    size = float(preprocess.image_size)
    x0 = min(max(x * sx - left, 0.0), size)
    y0 = min(max(y * sy - top, 0.0), size)
    x1 = min(max((x + w) * sx - left, 0.0), size)
    y1 = min(max((y + h) * sy - top, 0.0), size)
    return x0, y0, x1 - x0, y1 - y0


def box_mask(boxes: Iterable[Sequence[float]], size: int) -> np.ndarray:
    """``[size, size]`` bool: pixels whose centre lies inside any of the boxes."""
    centres = np.arange(size, dtype=np.float64) + 0.5
    mask = np.zeros((size, size), dtype=bool)
    for x, y, w, h in boxes:
        cols = (centres >= x) & (centres <= x + w)
        rows = (centres >= y) & (centres <= y + h)
        mask |= rows[:, None] & cols[None, :]
    return mask


def peak_location(heatmap: np.ndarray) -> tuple[float, float]:
    """``(x, y)`` pixel centre of the heatmap's maximum.

    Bilinear upsampling (``align_corners=False``) turns a peak in a border cell of the feature
    map into a plateau reaching the image's edge; the plateau's innermost pixel is where that
    cell's centre maps to. So among tied maxima the pixel nearest the image centre is taken,
    not the top-left one ``argmax`` would give (which would put every border peak in a corner).
    """
    heatmap = np.nan_to_num(np.asarray(heatmap, dtype=np.float64))
    peak = heatmap.max()
    rows, cols = np.nonzero(heatmap >= peak - 1e-6 * max(abs(peak), 1e-12))
    cy, cx = (heatmap.shape[0] - 1) / 2, (heatmap.shape[1] - 1) / 2
    nearest = int(np.argmin((rows - cy) ** 2 + (cols - cx) ** 2))
    return float(cols[nearest]) + 0.5, float(rows[nearest]) + 0.5


def score_heatmap(
    heatmap: np.ndarray,
    boxes: Sequence[Sequence[float]],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    tolerance: float = DEFAULT_TOLERANCE_PX,
) -> dict[str, Any]:
    """Pointing game and IoU of one heatmap against the union of one finding's boxes.

    ``hit``: the maximum (:func:`peak_location`) lies in a box. ``hit_tolerant``: it lies
    within ``tolerance`` pixels (Euclidean) of one, as in Zhang et al.'s pointing game.
    ``distance``: pixels from the maximum to the nearest box (0 inside). ``iou``: for each
    threshold ``t``, IoU of ``heatmap >= t`` with the boxes' pixels. A map that is all zeros
    points nowhere: no hit.
    """
    size = heatmap.shape[0]
    target = box_mask(boxes, size)
    x, y = peak_location(heatmap)
    distance = min(
        float(np.hypot(max(bx - x, 0.0, x - bx - bw), max(by - y, 0.0, y - by - bh)))
        for bx, by, bw, bh in boxes
    )
    evidence = bool(np.any(heatmap > 0))
    ious = {}
    for t in thresholds:
        region = heatmap >= t
        union = np.logical_or(region, target).sum()
        ious[_key(t)] = float(np.logical_and(region, target).sum() / union) if union else 0.0
    return {
        "hit": evidence and distance == 0.0,
        "hit_tolerant": evidence and distance <= tolerance,
        "distance": distance,
        "point": [x, y],
        "iou": ious,
    }


def _key(threshold: float) -> str:
    return f"{threshold:g}"


def summarise_scores(findings: Sequence[dict], thresholds: Sequence[float]) -> dict[str, Any]:
    """Hit rates and mean IoU per threshold, overall and per pathology (NIH order)."""

    def summary(items: list[dict]) -> dict[str, Any]:
        hits = sum(item["hit"] for item in items)
        tolerant = sum(item["hit_tolerant"] for item in items)
        return {
            "findings": len(items),
            "hits": int(hits),
            "pointing_hit_rate": hits / len(items) if items else None,
            "hits_tolerant": int(tolerant),
            "pointing_hit_rate_tolerant": tolerant / len(items) if items else None,
            "iou_mean": {
                _key(t): float(np.mean([i["iou"][_key(t)] for i in items])) if items else None
                for t in thresholds
            },
        }

    per_pathology = {
        name: summary([f for f in findings if f["pathology"] == name])
        for name in PATHOLOGIES
        if any(f["pathology"] == name for f in findings)
    }
    return {"overall": summary(list(findings)), "per_pathology": per_pathology}


# ---------------------------------------------------------------------------------------------
# Images -> tensors


@dataclass
class PreparedImage:
    path: str
    gray_crop: np.ndarray  # [S, S] uint8, what the model sees before normalisation
    tensor: torch.Tensor  # [3, S, S]
    original_size: tuple[int, int]  # (height, width)
    geometry: tuple[int, int, int, int]  # (resized height, resized width, crop top, left)


def prepare_image(path: str | os.PathLike, preprocess: Preprocess) -> PreparedImage:
    gray = decode_gray(path)
    crop = preprocess.crop_resized(gray)
    height, width = gray.shape
    return PreparedImage(
        path=str(path),
        gray_crop=crop,
        tensor=preprocess.to_tensor(crop),
        original_size=(height, width),
        geometry=preprocess.geometry(height, width),
    )


def _batches(items: Sequence, size: int):
    size = max(1, int(size))
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    from cxr.evaluate import sigmoid

    return sigmoid(logits, temperature)


def _device(model: nn.Module) -> torch.device:
    return next(_plain(model).parameters()).device


# ---------------------------------------------------------------------------------------------
# Explaining images


def choose_pathologies(
    probabilities: Sequence[float],
    thresholds: Sequence[float],
    *,
    pathologies: Sequence[str] | None = None,
    mode: str = "positive",
    top_k: int = DEFAULT_TOP_K,
    labels: Sequence[str] = PATHOLOGIES,
) -> tuple[list[int], str]:
    """Class indices to explain and why: named ones, all, or the positives (else the top k)."""
    labels = list(labels)
    if pathologies:
        return [labels.index(canonical_pathology(name)) for name in pathologies], "named"
    if mode == "all":
        return list(range(len(labels))), "all"
    if mode != "positive":
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(EXPLAIN_MODES)}")
    probs = np.asarray(probabilities, dtype=np.float64)
    positive = [i for i in range(len(labels)) if probs[i] >= thresholds[i]]
    if positive:
        return sorted(positive, key=lambda i: -probs[i]), "positive"
    return [int(i) for i in np.argsort(-probs, kind="stable")[:top_k]], f"top {top_k}"


def explain_images(
    bundle,
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    pathologies: Sequence[str] | None = None,
    mode: str = "positive",
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = 8,
    shifts: int = 1,
    on_image: Callable[[dict], None] | None = None,
) -> list[dict[str, Any]]:
    """Probabilities, calls and Grad-CAM overlays (``.png``) + maps (``.npy``) per image.

    Writes ``out_dir/<image stem>/<Pathology>.png`` and ``.npy`` (``[S, S]`` float32 in
    [0, 1], aligned with the model's ``S`` x ``S`` crop) and ``out_dir/explanations.json``;
    returns one dict per image in input order. ``pathologies`` names the classes to explain;
    otherwise ``mode`` is ``positive`` (the classes called positive, else the top ``top_k``)
    or ``all``. ``shifts`` > 1 samples the maps more densely (:func:`gradcam_with_logits`).
    """
    labels = bundle.labels
    thresholds = bundle.thresholds
    if pathologies:
        [canonical_pathology(name) for name in pathologies]  # fail before any work
    if mode not in EXPLAIN_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(EXPLAIN_MODES)}")
    preprocess = Preprocess(bundle.image_size, bundle.normalization)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folders = _unique_stems(paths)
    device = _device(bundle.model)
    results: list[dict[str, Any]] = []
    for batch in _batches(list(zip(paths, folders)), batch_size):
        prepared = [prepare_image(path, preprocess) for path, _ in batch]
        images = torch.stack([p.tensor for p in prepared]).to(device)
        # The classes each image needs are known only after the forward pass; the backbone
        # runs once (under no_grad) and the head's gradients for all classes are cheap.
        every = list(range(len(labels)))
        maps, logits = gradcam_with_logits(bundle.model, images, every, shifts=shifts)
        probabilities = _probabilities(logits, bundle.temperature)
        for item, (path, folder), maps_i, probs in zip(prepared, batch, maps, probabilities):
            chosen, reason = choose_pathologies(
                probs, thresholds, pathologies=pathologies, mode=mode, top_k=top_k, labels=labels
            )
            target = out_dir / folder
            target.mkdir(parents=True, exist_ok=True)
            explained = []
            for index in chosen:
                name = labels[index]
                call = "positive" if probs[index] >= thresholds[index] else "negative"
                title = f"{Path(path).name}: {name}, p = {probs[index]:.2f} ({call})"
                png, npy = target / f"{name}.png", target / f"{name}.npy"
                atomic_write_bytes(png, overlay_png(item.gray_crop, maps_i[index], title))
                atomic_write_bytes(npy, npy_bytes(maps_i[index].astype(np.float32)))
                explained.append(
                    {"pathology": name, "probability": float(probs[index]), "call": call,
                     "png": str(png), "npy": str(npy)}
                )  # fmt: skip
            record = {
                "image": str(path),
                "folder": str(target),
                "image_size": bundle.image_size,
                "original_size": list(item.original_size),
                "crop": dict(zip(("resized_h", "resized_w", "top", "left"), item.geometry)),
                "probabilities": {n: float(p) for n, p in zip(labels, probs)},
                "thresholds": {n: float(t) for n, t in zip(labels, thresholds)},
                "positive": [n for n, p, t in zip(labels, probs, thresholds) if p >= t],
                "selection": reason,
                "explained": explained,
            }
            results.append(record)
            if on_image:
                on_image(record)
    summary = {
        "model_image_size": bundle.image_size,
        "shifts": shifts,
        "sample_spacing_px": FEATURE_STRIDE / shifts,
        "images": results,
    }
    atomic_write_text(out_dir / EXPLANATIONS_NAME, json.dumps(summary, indent=2) + "\n")
    return results


def _unique_stems(paths: Sequence[str | os.PathLike]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = Path(path).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


# ---------------------------------------------------------------------------------------------
# Localisation


def localize(
    bundle,
    boxes: pd.DataFrame | str | os.PathLike,
    images: dict[str, str | os.PathLike] | str | os.PathLike,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    tolerance: float = DEFAULT_TOLERANCE_PX,
    batch_size: int = 8,
    shifts: int = 1,
    only: Iterable[str] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Score Grad-CAM against boxes for every image that has one and is found.

    ``boxes`` is a table from :func:`read_boxes` or a box file; ``images`` maps image names to
    paths, or is a folder searched recursively (NIH's ``images_*/images`` layout works).
    ``only`` restricts scoring to those image names (e.g. a test split). A finding is one
    (image, pathology) pair; several boxes of one pathology on one image count as one finding
    scored against their union. Boxes are mapped with each image's own size. ``shifts`` > 1
    scores shift-and-stitch maps, sampled every ``32 / shifts`` pixels instead of every 32.
    """
    from cxr.data.nih import index_images

    source = None if isinstance(boxes, pd.DataFrame) else str(boxes)
    table = boxes if isinstance(boxes, pd.DataFrame) else read_boxes(boxes)
    if only is not None:
        keep = set(only)
        table = table[table["image"].isin(keep)]
    if isinstance(images, dict):
        found = {name: Path(path) for name, path in images.items()}
    else:
        root = Path(images)
        if not root.is_dir():
            raise DataError(f"{root}: no such image folder")
        found = index_images(root)
    names = list(dict.fromkeys(table["image"]))
    present = [name for name in names if name in found]
    missing = len(names) - len(present)
    if not present:
        where = "the given images" if isinstance(images, dict) else str(images)
        raise DataError(
            f"none of the {len(names):,} image(s) with boxes{' in ' + source if source else ''} "
            f"was found in {where}"
        )
    labels = bundle.labels
    preprocess = Preprocess(bundle.image_size, bundle.normalization)
    device = _device(bundle.model)
    grouped = {name: group for name, group in table.groupby("image", sort=False)}
    findings: list[dict[str, Any]] = []
    outside = 0
    for batch in _batches(present, batch_size):
        prepared = [prepare_image(found[name], preprocess) for name in batch]
        needed = sorted(
            {labels.index(p) for name in batch for p in grouped[name]["pathology"].unique()}
        )
        images_t = torch.stack([p.tensor for p in prepared]).to(device)
        maps, logits = gradcam_with_logits(bundle.model, images_t, needed, shifts=shifts)
        probabilities = _probabilities(logits, bundle.temperature)
        for name, item, maps_i, probs in zip(batch, prepared, maps, probabilities):
            height, width = item.original_size
            for pathology, rows in grouped[name].groupby("pathology", sort=False):
                original = rows[["x", "y", "w", "h"]].to_numpy(dtype=np.float64).tolist()
                mapped = [map_box(b, height, width, preprocess) for b in original]
                mapped = [b for b in mapped if b[2] > 0 and b[3] > 0]
                if not mapped:
                    outside += 1
                    continue
                index = labels.index(pathology)
                heatmap = maps_i[needed.index(index)]
                score = score_heatmap(heatmap, mapped, thresholds, tolerance)
                findings.append(
                    {
                        "image": name,
                        "pathology": pathology,
                        "probability": float(probs[index]),
                        "original_size": [height, width],
                        "boxes_original": original,
                        "boxes": [list(b) for b in mapped],
                        **score,
                    }
                )
        if on_batch:
            on_batch(len(batch))
    result = {
        "boxes_file": source,
        "image_size": bundle.image_size,
        "feature_map": bundle.image_size // FEATURE_STRIDE,
        "shifts": shifts,
        "sample_spacing_px": FEATURE_STRIDE / shifts,
        "thresholds": [float(t) for t in thresholds],
        "tolerance_px": float(tolerance),
        "images_with_boxes": len(names),
        "images_scored": len(present),
        "images_not_found": missing,
        "findings_outside_crop": outside,
        **summarise_scores(findings, thresholds),
        "findings": findings,
    }
    return result


def default_boxes_file(data_dir: str | os.PathLike) -> Path:
    """``BBox_List_2017.csv`` (or ``.csv.gz``) in a data folder or its ``metadata/``."""
    data_dir = Path(data_dir)
    for folder in (data_dir, data_dir / "metadata"):
        for name in ("BBox_List_2017.csv", "BBox_List_2017.csv.gz"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"{data_dir}: no BBox_List_2017.csv (or .csv.gz) here; pass the box file")


def localize_run(
    run_dir: str | os.PathLike,
    boxes_csv: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    split: str | None = "test",
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    tolerance: float = DEFAULT_TOLERANCE_PX,
    batch_size: int = 8,
    shifts: int = 1,
    device: str = "cpu",
    out: str | os.PathLike | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """:func:`localize` for a run folder (or bundle); writes ``localization.json`` beside it.

    Defaults: the box file of the run's data folder (``run.json``), images from the split
    table's ``path`` column when ``split`` names one of the run's splits (only that split's
    images are scored), otherwise found below ``image_root`` or the run's data folder.
    ``split=None`` scores every image found.
    """
    from cxr.model import load_bundle, resolve_bundle
    from cxr.run import RunFolder

    bundle = load_bundle(run_dir, device=device)
    folder = resolve_bundle(run_dir)[1].parent
    run = RunFolder(folder)
    data_dir = run.load_info().get("data")
    if boxes_csv is None:
        if not data_dir:
            raise DataError(f"{folder}: no data folder recorded in run.json; pass the box file")
        boxes_csv = default_boxes_file(data_dir)
    only = None
    images: dict[str, str] | Path | None = None
    if split is not None:
        if not run.split_file(split).exists():
            raise DataError(f"{folder}: no split {split!r} (no {run.split_file(split)})")
        frame = run.read_split(split)
        only = frame["Image Index"].tolist()
        if image_root is None and "path" in frame.columns:
            images = dict(zip(frame["Image Index"], frame["path"]))
    if images is None:
        root = image_root or data_dir
        if root is None:
            raise DataError(f"{folder}: no image folder known; pass one")
        images = Path(root)
    result = localize(
        bundle,
        boxes_csv,
        images,
        thresholds=thresholds,
        tolerance=tolerance,
        batch_size=batch_size,
        shifts=shifts,
        only=only,
        on_batch=on_batch,
    )
    result["model"] = str(folder)
    result["split"] = split
    target = Path(out) if out else folder / LOCALIZATION_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(result, indent=2) + "\n")
    result["path"] = str(target)
    return result
