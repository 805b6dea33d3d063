"""Scoring Grad-CAM against bounding boxes: NIH's box file, the pointing game and IoU.

Box files are NIH's ``BBox_List_2017.csv``: a 9-field header over 6-field rows
(``Image Index,Finding Label,x,y,w,h``) in pixels of the stored image, ``Infiltrate`` meaning
Infiltration. Boxes are mapped through the same resize + centre crop the model saw
(:func:`cxr.data.transforms.map_box`), using each image's actual size.
"""

from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxr.data.layouts.nih import index_images
from cxr.data.transforms import map_box, prepare_image
from cxr.errors import DataError
from cxr.explain.gradcam import gradcam_with_logits
from cxr.labels import PATHOLOGIES, canonical_pathology
from cxr.metrics import probabilities
from cxr.model.bundle import Bundle
from cxr.model.registry import get_architecture

DEFAULT_THRESHOLDS = (0.25, 0.5, 0.75)
# Half a cell of DenseNet121's final feature map (stride 32): the finest place plain Grad-CAM
# from that layer can point to. Its maximum is always at a cell centre, so at 128 px (4x4
# cells) a box that holds no cell centre cannot be hit exactly however good the model is,
# unless the map is sampled more densely (``shifts``).
DEFAULT_TOLERANCE_PX = 16.0

LOCALIZATION_NAME = "localization.json"
BOX_COLUMNS = ("image", "pathology", "x", "y", "w", "h")


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


def localize(
    bundle: Bundle,
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
    source = None if isinstance(boxes, pd.DataFrame) else str(boxes)
    table = boxes if isinstance(boxes, pd.DataFrame) else read_boxes(boxes)
    if only is not None:
        table = table[table["image"].isin(set(only))]
    names = list(dict.fromkeys(table["image"]))
    found = _found_images(names, images, source)
    present = [name for name in names if name in found]
    grouped = {name: group for name, group in table.groupby("image", sort=False)}
    findings: list[dict[str, Any]] = []
    outside = 0
    for start in range(0, len(present), max(1, int(batch_size))):
        batch = present[start : start + max(1, int(batch_size))]
        scored, skipped = _score_batch(
            bundle, [(name, found[name], grouped[name]) for name in batch], thresholds,
            tolerance, shifts,
        )  # fmt: skip
        findings += scored
        outside += skipped
        if on_batch:
            on_batch(len(batch))
    return {
        "boxes_file": source,
        "image_size": bundle.image_size,
        "feature_map": bundle.image_size // get_architecture(bundle.meta.architecture).stride,
        "shifts": shifts,
        "sample_spacing_px": get_architecture(bundle.meta.architecture).stride / shifts,
        "thresholds": [float(t) for t in thresholds],
        "tolerance_px": float(tolerance),
        "images_with_boxes": len(names),
        "images_scored": len(present),
        "images_not_found": len(names) - len(present),
        "findings_outside_crop": outside,
        **summarise_scores(findings, thresholds),
        "findings": findings,
    }


def _found_images(
    names: Sequence[str], images: dict[str, str | os.PathLike] | str | os.PathLike, source
) -> dict[str, Path]:
    """Image name -> path for the images given (a mapping or a folder searched below)."""
    if isinstance(images, dict):
        found = {name: Path(path) for name, path in images.items()}
    else:
        root = Path(images)
        if not root.is_dir():
            raise DataError(f"{root}: no such image folder")
        found = index_images(root)
    if not any(name in found for name in names):
        where = "the given images" if isinstance(images, dict) else str(images)
        raise DataError(
            f"none of the {len(names):,} image(s) with boxes{' in ' + source if source else ''} "
            f"was found in {where}"
        )
    return found


def _score_batch(
    bundle: Bundle,
    batch: Sequence[tuple[str, Path, pd.DataFrame]],
    thresholds: Sequence[float],
    tolerance: float,
    shifts: int,
) -> tuple[list[dict[str, Any]], int]:
    """The findings of a few images (name, path, their boxes), and how many findings' boxes
    fell wholly outside the model's crop."""
    labels = bundle.labels
    preprocess = bundle.preprocess
    prepared = [prepare_image(path, preprocess) for _, path, _ in batch]
    needed = sorted({labels.index(p) for *_, rows in batch for p in rows["pathology"].unique()})
    device = next(bundle.model.parameters()).device
    images = torch.stack([p.tensor for p in prepared]).to(device)
    maps, logits = gradcam_with_logits(bundle.model, images, needed, shifts=shifts)
    probs_all = probabilities(logits, bundle.temperature)
    findings, outside = [], 0
    for (name, _, rows_all), item, maps_i, probs in zip(batch, prepared, maps, probs_all):
        height, width = item.original_size
        for pathology, rows in rows_all.groupby("pathology", sort=False):
            original = rows[["x", "y", "w", "h"]].to_numpy(dtype=np.float64).tolist()
            mapped = [map_box(b, height, width, preprocess) for b in original]
            mapped = [b for b in mapped if b[2] > 0 and b[3] > 0]
            if not mapped:
                outside += 1
                continue
            index = labels.index(pathology)
            score = score_heatmap(maps_i[needed.index(index)], mapped, thresholds, tolerance)
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
    return findings, outside


def default_boxes_file(data_dir: str | os.PathLike) -> Path:
    """``BBox_List_2017.csv`` (or ``.csv.gz``) in a data folder or its ``metadata/``."""
    data_dir = Path(data_dir)
    for folder in (data_dir, data_dir / "metadata"):
        for name in ("BBox_List_2017.csv", "BBox_List_2017.csv.gz"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"{data_dir}: no BBox_List_2017.csv (or .csv.gz) here; pass the box file")
