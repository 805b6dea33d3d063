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

LOCALIZE_SPLITS = ("test", "val", "train", "all")


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

    Defaults: the box file of the run's data folder (``run.json``), and the run's **test**
    split: only images the model never trained on are scored. ``split`` may also be ``val``,
    ``train`` or ``all`` (every boxed image found below ``image_root`` or the run's data
    folder; ``None`` means the same). The result records the split, how many images were
    scored and how many of them the run trained on, with ``warnings`` saying what that means.
    """
    split = "all" if split is None else split
    if split not in LOCALIZE_SPLITS:
        raise DataError(f"split must be one of {', '.join(LOCALIZE_SPLITS)}, not {split!r}")
    bundle = load_bundle(run_dir, device=resolve_device(device))
    folder = resolve_bundle(run_dir)[1].parent
    run = RunFolder(folder)
    data_dir = run.load_info().get("data")
    if boxes_csv is None:
        if not data_dir:
            raise DataError(f"{folder}: no data folder recorded in run.json; pass the box file")
        boxes_csv = default_boxes_file(data_dir)
    only, images = _split_images(run, split, image_root, data_dir)
    result = localize(
        bundle, boxes_csv, images, thresholds=thresholds, tolerance=tolerance,
        batch_size=batch_size, shifts=shifts, only=only, on_batch=on_batch,
    )  # fmt: skip
    scored = {finding["image"] for finding in result["findings"]}
    trained = _training_images(run) & scored
    result.update(
        model=str(folder),
        split=split,
        images_trained_on=len(trained),
        warnings=_warnings(split, len(scored), len(trained), result["images_with_boxes"]),
    )
    target = Path(out) if out else folder / LOCALIZATION_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(result, indent=2) + "\n")
    result["path"] = str(target)
    return result


def _split_images(
    run: RunFolder, split: str, image_root, data_dir
) -> tuple[list[str] | None, dict[str, str] | Path]:
    """(the image names to score, or None for all; the images: names -> paths, or a folder)."""
    only = None
    if split != "all":
        if not run.split_file(split).exists():
            raise DataError(
                f"{run.root}: no split {split!r} (no {run.split_file(split)}); pass --split all "
                "to score every boxed image found"
            )
        frame = run.read_split(split)
        only = frame["Image Index"].tolist()
        if image_root is None and "path" in frame.columns:
            return only, dict(zip(frame["Image Index"], frame["path"]))
    root = image_root or data_dir
    if root is None:
        raise DataError(f"{run.root}: no image folder known; pass one")
    return only, Path(root)


def _training_images(run: RunFolder) -> set[str]:
    """The images of the run's train and val splits (none for a bare bundle)."""
    names: set[str] = set()
    for name in ("train", "val"):
        if run.split_file(name).exists():
            names.update(run.read_split(name)["Image Index"].astype(str))
    return names


def _warnings(split: str, scored: int, trained: int, with_boxes: int) -> list[str]:
    warnings = []
    if trained:
        warnings.append(
            f"{trained:,} of the {scored:,} scored image(s) are in the run's train or val "
            "split: the model saw them while training, so these scores overstate it. Score "
            "--split test; on NIH, split with `cxr data split --official`, which puts every "
            "boxed image in the test set"
        )
    elif split == "test" and scored < with_boxes:
        warnings.append(
            f"only {scored:,} of the {with_boxes:,} boxed image(s) are in the run's test "
            "split; on NIH, `cxr data split --official` puts every boxed image in the test set"
        )
    return warnings
