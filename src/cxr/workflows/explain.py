"""``cxr explain``: probabilities, calls and Grad-CAM overlays + maps for image files."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cxr.data.transforms import PreparedImage, prepare_image
from cxr.explain.gradcam import gradcam_with_logits
from cxr.explain.render import (
    DEFAULT_TOP_K,
    EXPLAIN_MODES,
    ExplanationWriter,
    choose_pathologies,
)
from cxr.labels import canonical_pathology
from cxr.metrics import probabilities
from cxr.model.bundle import Bundle
from cxr.model.registry import get_architecture
from cxr.utils import atomic_write_text, path_text

EXPLANATIONS_NAME = "explanations.json"


def explain_images(
    bundle: Bundle,
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    pathologies: Sequence[str] | None = None,
    mode: str = "auto",
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = 8,
    shifts: int = 1,
    on_image: Callable[[dict], None] | None = None,
) -> list[dict[str, Any]]:
    """Probabilities, calls and Grad-CAM overlays (``.png``) + maps (``.npy``) per image.

    Writes ``out_dir/<image stem>/<Pathology>.png`` and ``.npy``
    (:class:`~cxr.explain.render.ExplanationWriter`) and ``out_dir/explanations.json``;
    returns one dict per image in input order. ``pathologies`` names the classes to explain;
    otherwise ``mode`` chooses them (:func:`~cxr.explain.render.choose_pathologies`).
    ``shifts`` > 1 samples the maps more densely (shift-and-stitch).
    """
    if pathologies:
        [canonical_pathology(name) for name in pathologies]  # fail before any work
    if mode not in EXPLAIN_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(EXPLAIN_MODES)}")
    preprocess = bundle.preprocess
    writer = ExplanationWriter(out_dir, paths)
    device = next(bundle.model.parameters()).device
    every = list(range(len(bundle.labels)))
    results: list[dict[str, Any]] = []
    size = max(1, int(batch_size))
    for start in range(0, len(paths), size):
        prepared = [prepare_image(path, preprocess) for path in paths[start : start + size]]
        images = torch.stack([p.tensor for p in prepared]).to(device)
        # The classes each image needs are known only after the forward pass; the backbone
        # runs once (under no_grad) and the head's gradients for all classes are cheap.
        maps, logits = gradcam_with_logits(bundle.model, images, every, shifts=shifts)
        for offset, (item, maps_i, probs) in enumerate(
            zip(prepared, maps, probabilities(logits, bundle.temperature))
        ):
            chosen, reason = choose_pathologies(
                probs, bundle.thresholds, pathologies=pathologies, mode=mode, top_k=top_k,
                labels=bundle.labels,
            )  # fmt: skip
            explained = [
                writer.write(
                    start + offset, item.gray_crop, maps_i[c], bundle.labels[c], probs[c],
                    bundle.thresholds[c],
                )
                for c in chosen
            ]  # fmt: skip
            record = _record(bundle, item, writer.folders[start + offset], probs, explained)
            results.append({**record, "selection": reason, "explained": explained})
            if on_image:
                on_image(results[-1])
    summary = {
        "model_image_size": bundle.image_size,
        "shifts": shifts,
        "sample_spacing_px": get_architecture(bundle.meta.architecture).stride / shifts,
        "images": results,
    }
    atomic_write_text(writer.out / EXPLANATIONS_NAME, json.dumps(summary, indent=2) + "\n")
    return results


def _record(bundle: Bundle, item: PreparedImage, folder: Path, probs, explained) -> dict:
    labels, thresholds = bundle.labels, bundle.thresholds
    return {
        # As text that always encodes (see cxr.utils.path_text): explanations.json and the
        # CLI's tables show names that are not UTF-8 as \xNN, like cxr predict's outputs.
        "image": path_text(item.path),
        "folder": path_text(folder),
        "image_size": bundle.image_size,
        "original_size": list(item.original_size),
        "crop": dict(zip(("resized_h", "resized_w", "top", "left"), item.geometry)),
        "probabilities": {n: float(p) for n, p in zip(labels, probs)},
        "thresholds": {n: float(t) for n, t in zip(labels, thresholds)},
        "positive": [n for n, p, t in zip(labels, probs, thresholds) if p >= t],
    }
