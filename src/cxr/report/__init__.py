"""The evaluation report: one self-contained ``report.html`` and its figures as PNG files.

A renderer of a run's files: it reads the run folder (or is given the predictions table)
and writes only its page and figures. :func:`cxr.workflows.report.report_run` is the step
that makes the predictions fresh, stores the numbers in ``metrics.json`` and refreshes the
model card; nothing here imports :mod:`cxr.workflows`.

One job per module: :mod:`~cxr.report.numbers` computes every number,
:mod:`~cxr.report.figures` draws the figures, :mod:`~cxr.report.html` renders the page from
the Jinja2 template in ``templates/``, and :mod:`~cxr.report.build` runs them over a run
folder (:func:`report_contents`, :func:`write_report`, :func:`build_report`).
"""

from cxr.report.build import (
    DEFAULT_GALLERY,
    ReportContents,
    build_report,
    read_predictions,
    report_contents,
    report_paths,
    write_report,
)
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
    BASELINES,
    BASELINES_NOTE,
    NIH_MIN_WIDTH,
    REPORT_KEY,
    data_origin,
    gallery_cases,
    report_metrics,
)

__all__ = [
    "BASELINES",
    "BASELINES_NOTE",
    "DEFAULT_GALLERY",
    "NIH_MIN_WIDTH",
    "REPORT_KEY",
    "ReportContents",
    "build_report",
    "data_origin",
    "gallery_cases",
    "gallery_images",
    "pr_figure",
    "read_predictions",
    "reliability_figure",
    "render_html",
    "report_contents",
    "report_metrics",
    "report_paths",
    "roc_figure",
    "scores_figure",
    "training_figure",
    "write_report",
]
