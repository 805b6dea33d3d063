"""``cxr ood RUN``: give a run's bundle (an older one too) its out-of-distribution summary,
from the validation split's pooled features, and refresh its model card."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxr.errors import DataError
from cxr.model.ood import DEFAULT_FLAG_PERCENTILE, fit_ood_summary, save_ood
from cxr.run import RunFolder
from cxr.workflows.card import update_model
from cxr.workflows.evaluate import bundle_outputs

REFERENCE_SPLIT = "val"


def add_ood_summary(
    run_dir: str | Path,
    *,
    flag_percentile: float = DEFAULT_FLAG_PERCENTILE,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Fit the summary on the validation split with the bundle's current weights, write
    ``ood.safetensors``, list it in ``model.json`` and refresh the card."""
    if not 0 < flag_percentile < 100:
        raise DataError(f"the flag percentile must be between 0 and 100, got {flag_percentile}")
    run = RunFolder(run_dir).require()
    frame = run.read_split(REFERENCE_SPLIT)
    _, _, features = bundle_outputs(
        run, frame, device=device, batch_size=batch_size, workers=workers, on_batch=on_batch
    )
    summary = fit_ood_summary(features, flag_percentile=flag_percentile)
    update_model(run.root, ood=save_ood(run.root, summary))
    return {**summary.describe(), "split": REFERENCE_SPLIT, "path": str(run.root)}
