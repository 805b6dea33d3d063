"""The report of one split of a run folder: a renderer of the run's files, from its
predictions table to the page. It computes nothing a workflow owns: the predictions are
given (or read from ``predictions-<split>.csv``), and :func:`cxr.workflows.report.report_run`
makes sure they are fresh and stores the numbers in ``metrics.json`` before the page is
written.

1. :func:`report_contents`: :func:`cxr.report.numbers.report_metrics` and its neighbours
   compute every number the page shows, and the figures are drawn (:mod:`cxr.report.figures`);
   nothing is written;
2. :func:`write_report`: the figure files and the page, rendered from the numbers alone
   (:mod:`cxr.report.html`); images are embedded as base64 ``data:`` URIs and also written as
   PNG files beside the page, so it opens offline and nothing on it refers to the network.

Library code: returns values or raises :mod:`cxr.errors`; never prints.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr import __version__
from cxr.data.schema import IMAGE_COLUMN, PATIENT_COLUMN
from cxr.errors import DataError
from cxr.metrics import DEFAULT_RESAMPLES, prediction_arrays
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
from cxr.run import RunFolder, json_text
from cxr.safety import restored_frame
from cxr.utils import atomic_write_bytes, atomic_write_text

DEFAULT_GALLERY = 3


def report_paths(run_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(report.html, figure folder) for a split: ``report.html`` + ``figures/`` for test."""
    run_dir = Path(run_dir)
    if split == "test":
        return run_dir / "report.html", run_dir / "figures"
    return run_dir / f"report-{split}.html", run_dir / f"figures-{split}"


@dataclass(frozen=True)
class ReportContents:
    """What a report shows: ``report``, every number (as ``metrics.json`` stores it, under
    ``[split]["report"]``), and ``figures``, PNG bytes by file name."""

    split: str
    report: dict[str, Any]
    figures: dict[str, bytes]


def check_split(split: str) -> None:
    if split not in ("train", "val", "test"):
        raise DataError(f"report: split must be train, val or test, got {split!r}")


def read_predictions(run_dir: str | Path, split: str) -> pd.DataFrame:
    """The split's predictions table as ``cxr evaluate`` wrote it."""
    path = RunFolder(run_dir).predictions(split)
    if not path.is_file():
        raise DataError(f"{path}: no predictions for the {split} split (cxr evaluate writes them)")
    return restored_frame(pd.read_csv(path, dtype={IMAGE_COLUMN: str, PATIENT_COLUMN: str}))


def report_contents(
    run_dir: str | Path,
    split: str = "test",
    predictions: pd.DataFrame | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    gallery: int = DEFAULT_GALLERY,
    device: str = "auto",
    on_stage: Callable[[str], None] = lambda stage: None,
) -> ReportContents:
    """The report's numbers and figures for ``split`` of the run, from ``predictions`` (by
    default the run's ``predictions-<split>.csv``, as they are). Writes nothing."""
    check_split(split)
    run = RunFolder(run_dir).require()
    if predictions is None:
        predictions = read_predictions(run.root, split)
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
    figure_dir = report_paths(run.root, split)[1]
    report["figures"] = {name: f"{figure_dir.name}/{name}" for name in figures}
    # As metrics.json stores it, so that the page shows exactly the stored numbers.
    return ReportContents(split, json.loads(json_text(report)), figures)


def write_report(run_dir: str | Path, contents: ReportContents) -> dict[str, Any]:
    """The figure files and the page rendered from ``contents.report`` alone.

    Returns ``{"html": path, "figures": [paths], "report": the numbers}``.
    """
    html_path, figure_dir = report_paths(run_dir, contents.split)
    figure_dir.mkdir(parents=True, exist_ok=True)
    for old in figure_dir.glob("*.png"):
        if old.name not in contents.figures:
            old.unlink()
    for name, data in contents.figures.items():
        atomic_write_bytes(figure_dir / name, data)
    atomic_write_text(html_path, render_html(contents.report, contents.figures))
    return {
        "html": html_path,
        "figures": [figure_dir / name for name in contents.figures],
        "report": contents.report,
    }


def build_report(
    run_dir: str | Path,
    split: str = "test",
    predictions: pd.DataFrame | None = None,
    **options: Any,
) -> dict[str, Any]:
    """:func:`report_contents` then :func:`write_report`: the page of a run's predictions as
    they are, without touching ``metrics.json`` or the model card (for that, and fresh
    predictions, :func:`cxr.workflows.report.report_run`)."""
    return write_report(run_dir, report_contents(run_dir, split, predictions, **options))


def _report(
    run: RunFolder, split: str, predictions: pd.DataFrame, meta: BundleMeta, numbers: dict
) -> dict[str, Any]:
    """The report dict around the split's numbers: what was evaluated, data and training."""
    origin = data_origin(run.root)
    info = run.load_info()
    # An imported bundle's splits are the labelled sets given with --data (workflows.labelled).
    given = run.dataset_info().get("splits") or {}
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
            "source": info.get("data")
            or "; ".join(f"{name}: {entry.get('data')}" for name, entry in given.items()),
            "split_method": info.get("split")
            or {"method": "labelled sets given with --data", "sets": given},
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
