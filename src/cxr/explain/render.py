"""Drawing Grad-CAM maps over the X-ray, choosing which pathologies to explain, and the one
naming of the files an explanation writes: ``OUT/<image stem>/<Pathology>.png`` (overlay) and
``.npy`` (the map), with image stems made unique within one call."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxr.labels import PATHOLOGIES, canonical_pathology
from cxr.safety import figure_text
from cxr.utils import atomic_write_bytes, npy_bytes, path_text, printable_text, safe_name

OVERLAY_CMAP = "jet"
OVERLAY_ALPHA = 0.45
DEFAULT_TOP_K = 3
EXPLAIN_MODES = ("auto", "positive", "all")


def heatmap_rgb(
    gray: np.ndarray, heatmap: np.ndarray, *, alpha: float = OVERLAY_ALPHA, cmap: str = OVERLAY_CMAP
) -> np.ndarray:
    """The X-ray blended with the colour-mapped heatmap: ``[S, S, 3]`` uint8, RGB order."""
    from matplotlib import colormaps  # here, as below: importing cxr stays fast

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
    # Each line shortened: a label or file name of any length keeps the figure its size.
    axes.set_title("\n".join(figure_text(line, 60) for line in title.splitlines()), fontsize=10)
    scale = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=OVERLAY_CMAP)
    bar = figure.colorbar(scale, ax=axes, fraction=0.046, pad=0.04)
    bar.set_label("Grad-CAM (0 = none, 1 = strongest)", fontsize=8)
    bar.ax.tick_params(labelsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def choose_pathologies(
    probabilities: Sequence[float],
    thresholds: Sequence[float],
    *,
    pathologies: Sequence[str] | None = None,
    mode: str = "auto",
    top_k: int = DEFAULT_TOP_K,
    labels: Sequence[str] = PATHOLOGIES,
) -> tuple[list[int], str]:
    """Class indices to explain and why: the ``pathologies`` named, ``all``, the ones called
    ``positive`` (possibly none), or ``auto``: the positives, else the ``top_k`` most
    probable."""
    labels = list(labels)
    if pathologies:
        return [labels.index(canonical_pathology(name)) for name in pathologies], "named"
    if mode not in EXPLAIN_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(EXPLAIN_MODES)}")
    if mode == "all":
        return list(range(len(labels))), "all"
    probs = np.asarray(probabilities, dtype=np.float64)
    positive = [i for i in range(len(labels)) if probs[i] >= thresholds[i]]
    if positive or mode == "positive":
        return sorted(positive, key=lambda i: -probs[i]), "positive"
    return [int(i) for i in np.argsort(-probs, kind="stable")[:top_k]], f"top {top_k}"


def call_name(probability: float, threshold: float) -> str:
    return "positive" if probability >= threshold else "negative"


def overlay_title(image: str, pathology: str, probability: float, threshold: float) -> str:
    """The title every overlay carries: image, pathology, probability and the call."""
    call = call_name(probability, threshold)
    return f"{image}: {pathology}, p = {probability:.2f} ({call})"


def unique_stems(paths: Sequence[str | os.PathLike]) -> list[str]:
    """A file-name-safe stem per path; repeats get ``-2``, ``-3``, ... in input order.

    :func:`~cxr.utils.safe_name` keeps letters, digits and ``._-``: bytes that are not UTF-8
    (lone surrogates in a ``str`` path) and control characters become ``_``, so a folder name
    can always be created and written as text.
    """
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = safe_name(Path(path).stem) or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


class ExplanationWriter:
    """Writes the explanations of a list of images under ``out``: for image ``i`` and a
    pathology, ``out/<stem i>/<Pathology>.png`` (overlay) and ``.npy`` (``[S, S]`` float32 map
    in [0, 1], aligned with the model's crop), each written atomically."""

    def __init__(self, out: str | os.PathLike, images: Sequence[str | os.PathLike]):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.images = [str(image) for image in images]
        self.folders = [self.out / stem for stem in unique_stems(images)]

    def write(
        self,
        index: int,
        crop: np.ndarray,
        heatmap: np.ndarray,
        pathology: str,
        probability: float,
        threshold: float,
    ) -> dict[str, object]:
        folder = self.folders[index]
        folder.mkdir(parents=True, exist_ok=True)
        # A title is drawn: no control characters (no glyph) and no lone surrogates.
        name = printable_text(Path(self.images[index]).name)
        title = overlay_title(name, pathology, probability, threshold)
        png, npy = folder / f"{pathology}.png", folder / f"{pathology}.npy"
        atomic_write_bytes(png, overlay_png(crop, heatmap, title))
        atomic_write_bytes(npy, npy_bytes(np.asarray(heatmap, dtype=np.float32)))
        return {
            "pathology": pathology,
            "probability": float(probability),
            "call": call_name(probability, threshold),
            # Results are text: the output folder's name may hold bytes that are not UTF-8.
            "png": path_text(png),
            "npy": path_text(npy),
        }
