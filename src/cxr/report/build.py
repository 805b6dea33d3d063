"""``build_report``: the report of one split of a run folder, from predictions to the page.

Order of work, so that every number on the page can be found in ``metrics.json``:

1. the split's predictions are (re)computed with :func:`cxr.evaluate.evaluate_run` if they are
   missing or older than the bundle (new temperature or thresholds);
2. :func:`cxr.report.numbers.report_metrics` and its neighbours compute every number the page
   shows and the dict is written to ``metrics.json`` under ``[split]["report"]``;
3. the figures are drawn (:mod:`cxr.report.figures`) and the page is rendered from the stored
   dict alone (:mod:`cxr.report.html`); images are embedded as base64 ``data:`` URIs and also
   written as PNG files beside the page, so it opens offline and nothing on it refers to the
   network.

Library code: returns values or raises :mod:`cxr.errors`; never prints.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr import __version__
from cxr.errors import DataError
from cxr.metrics import DEFAULT_RESAMPLES
from cxr.model.bundle import BundleMeta, read_bundle_meta
from cxr.report.figures import (
    gallery_images,
    pr_figure,
    reliability_figure,
    roc_figure,
    scores_figure,
    training_figure,
)
from cxr.report.html import render_html
from cxr.report.numbers import (
    BASELINES_NOTE,
    REPORT_KEY,
    _baselines,
    _split_summary,
    _training_summary,
    data_origin,
    external_side_by_side,
    gallery_cases,
    ood_numbers,
    report_metrics,
)
from cxr.report.subgroups import SUBGROUP_FIGURE, subgroup_figure, subgroup_numbers
from cxr.run import RunFolder
from cxr.utils import atomic_write_bytes, atomic_write_text
from cxr.workflows.evaluate import ensure_predictions, prediction_arrays

DEFAULT_GALLERY = 3


def report_paths(run_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(report.html, figure folder) for a split: ``report.html`` + ``figures/`` for test."""
    run_dir = Path(run_dir)
    if split == "test":
        return run_dir / "report.html", run_dir / "figures"
    return run_dir / f"report-{split}.html", run_dir / f"figures-{split}"


def build_report(
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
) -> dict[str, Any]:
    """Compute the report's numbers into ``metrics.json``, draw the figures, write the page.

    Returns ``{"html": path, "figures": [paths], "report": the dict written to metrics.json}``.
    """
    if split not in ("train", "val", "test"):
        raise DataError(f"report: split must be train, val or test, got {split!r}")
    run = RunFolder(run_dir).require()
    on_stage(f"predictions for the {split} split")
    predictions = ensure_predictions(
        run.root, split, device=device, batch_size=batch_size, workers=workers, on_batch=on_batch
    )
    meta = read_bundle_meta(run.root)
    y_true, y_prob = prediction_arrays(predictions, meta.labels)
    thresholds = meta.decision_thresholds
    on_stage(f"metrics with a patient-level bootstrap ({resamples:,} resamples)")
    numbers = report_metrics(
        y_true,
        y_prob,
        predictions["Patient ID"].astype(str).tolist(),
        thresholds,
        resamples=resamples,
        seed=seed,
        labels=meta.labels,
    )
    report = _report(run, split, predictions, meta, numbers)
    on_stage("subgroups")
    report["subgroups"] = subgroup_numbers(
        run, split, predictions, meta, y_true, y_prob, resamples=resamples, seed=seed
    )
    on_stage("figures")
    figures = _figures(run, report, y_true, y_prob)
    cases = gallery_cases(predictions, gallery, meta.labels)
    if gallery > 0:
        on_stage("Grad-CAM gallery")
        figures.update(gallery_images(run.root, run.read_split(split), cases, device=device))
    report["gallery"] = cases
    written = _write(run, split, report, figures)
    if split == "test":
        from cxr.workflows.card import refresh_card  # the card quotes the report's intervals

        refresh_card(run.root)
    return written


def _report(
    run: RunFolder, split: str, predictions: pd.DataFrame, meta: BundleMeta, numbers: dict
) -> dict[str, Any]:
    """The report dict around the split's numbers: what was evaluated, data and training."""
    origin = data_origin(run.root)
    info = run.load_info()
    return {
        "split": split,
        "run": str(run.root.resolve()),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cxr_version": __version__,
        "predictions": run.predictions(split).name,
        "model_epoch": meta.epoch,
        "threshold_rule": meta.threshold_rule,
        "threshold_fit": meta.threshold_fit,
        "temperature": meta.effective_temperature,
        "calibration": meta.calibration,
        **numbers,
        "data": {
            **origin,
            "source": info.get("data"),
            "split_method": info.get("split"),
            "splits": _split_summary(run),
        },
        "external": external_side_by_side(run.read_metrics().get("external"), numbers),
        "ood": ood_numbers(predictions, run.read_metrics().get(split) or {}),
        "baselines": _baselines(origin),
        "baselines_note": BASELINES_NOTE if origin["chestxray14"] else None,
        "training": _training_summary(run, meta),
        "config": json.loads(run.config.read_text()),
    }


def _figures(
    run: RunFolder, report: dict, y_true: np.ndarray, y_prob: np.ndarray
) -> dict[str, bytes]:
    """The curves, calibration and score figures, and the training curves if there is a log."""
    figures: dict[str, bytes] = {
        "roc.png": roc_figure(y_true, y_prob, report),
        "precision-recall.png": pr_figure(y_true, y_prob, report),
        "reliability.png": reliability_figure(report),
        "scores.png": scores_figure(y_true, y_prob, report),
    }
    if report["subgroups"]["groupings"]:
        figures[SUBGROUP_FIGURE] = subgroup_figure(report["subgroups"])
    if run.log_csv.exists():
        log = pd.read_csv(run.log_csv)
        if len(log):
            figures["training.png"] = training_figure(log, report["training"]["best_epoch"])
    return figures


def _write(run: RunFolder, split: str, report: dict, figures: dict[str, bytes]) -> dict[str, Any]:
    """Numbers into metrics.json first, then the figure files and the page rendered from the
    stored dict; the result that :func:`build_report` returns."""
    html_path, figure_dir = report_paths(run.root, split)
    report["figures"] = {name: f"{figure_dir.name}/{name}" for name in figures}

    # Numbers first: the page is rendered from what metrics.json holds.
    metrics = run.read_metrics()
    metrics.setdefault(split, {})[REPORT_KEY] = report
    run.write_json(run.metrics, metrics)
    stored = json.loads(run.metrics.read_text())[split][REPORT_KEY]

    figure_dir.mkdir(parents=True, exist_ok=True)
    for old in figure_dir.glob("*.png"):
        if old.name not in figures:
            old.unlink()
    for name, data in figures.items():
        atomic_write_bytes(figure_dir / name, data)
    atomic_write_text(html_path, render_html(stored, figures))
    return {
        "html": html_path,
        "figures": [figure_dir / name for name in figures],
        "metrics": run.metrics,
        "report": stored,
    }
