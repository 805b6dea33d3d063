"""``cxr localize`` over a run folder: Grad-CAM scored against the boxes of the run's data,
written to ``localization.json``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cxr.errors import DataError
from cxr.explain.localize import (
    DEFAULT_THRESHOLDS,
    DEFAULT_TOLERANCE_PX,
    LOCALIZATION_NAME,
    default_boxes_file,
    localize,
)
from cxr.model.bundle import load_bundle, resolve_bundle
from cxr.run import RunFolder
from cxr.runtime import resolve_device
from cxr.utils import atomic_write_text


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
    device: str = "auto",
    out: str | os.PathLike | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """:func:`localize` for a run folder (or bundle); writes ``localization.json`` beside it.

    Defaults: the box file of the run's data folder (``run.json``), images from the split
    table's ``path`` column when ``split`` names one of the run's splits (only that split's
    images are scored), otherwise found below ``image_root`` or the run's data folder.
    ``split=None`` scores every image found.
    """
    bundle = load_bundle(run_dir, device=resolve_device(device))
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
