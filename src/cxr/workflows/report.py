"""``cxr report`` as a step of a run: fresh predictions, the numbers in ``metrics.json`` (and
so the model card, which quotes their intervals), then the page (:mod:`cxr.report`).

Order of work, so that every number on the page can be found in ``metrics.json``:

1. the split's predictions are (re)computed with :func:`cxr.workflows.evaluate.evaluate_run`
   if they are missing or older than the bundle (new temperature or thresholds);
2. :func:`cxr.report.report_contents` computes every number the page shows, and the dict is
   written to ``metrics.json`` under ``[split]["report"]``
   (:func:`cxr.workflows.card.write_metrics`, which rewrites the card);
3. :func:`cxr.report.write_report` writes the figures and the page rendered from that dict.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxr.metrics import DEFAULT_RESAMPLES
from cxr.report import DEFAULT_GALLERY, REPORT_KEY, report_contents, write_report
from cxr.report.build import check_split
from cxr.run import RunFolder
from cxr.workflows.card import write_metrics
from cxr.workflows.evaluate import ensure_predictions
from cxr.workflows.labelled import LabelledSet


def report_run(
    run_dir: str | Path,
    split: str = "test",
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    gallery: int = DEFAULT_GALLERY,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    on_stage: Callable[[str], None] = lambda stage: None,
    on_batch: Callable[[int], None] | None = None,
    labelled: LabelledSet | None = None,
) -> dict[str, Any]:
    """Compute the report's numbers into ``metrics.json``, draw the figures, write the page.

    Returns ``{"html": path, "figures": [paths], "metrics": metrics.json's path,
    "report": the dict written to metrics.json, "attached": what ``labelled`` became}``.
    With ``labelled`` (an imported bundle), that set becomes the ``split`` first.
    """
    check_split(split)
    run = RunFolder(run_dir).require()
    attached = labelled.attach(run.root, split) if labelled else None
    on_stage(f"predictions for the {split} split")
    predictions = ensure_predictions(
        run.root, split, device=device, batch_size=batch_size, workers=workers, on_batch=on_batch
    )
    contents = report_contents(
        run.root, split, predictions, resamples=resamples, seed=seed, gallery=gallery,
        device=device, on_stage=on_stage,
    )  # fmt: skip
    metrics = run.read_metrics()
    metrics.setdefault(split, {})[REPORT_KEY] = contents.report
    write_metrics(run.root, metrics)  # numbers first: the page shows what metrics.json holds
    return {**write_report(run.root, contents), "metrics": run.metrics, "attached": attached}
