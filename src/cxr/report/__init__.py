"""The evaluation report: one self-contained ``report.html`` and its figures as PNG files.

One job per module: :mod:`~cxr.report.numbers` computes every number (written to
``metrics.json`` first), :mod:`~cxr.report.figures` draws the figures,
:mod:`~cxr.report.html` renders the page from the Jinja2 template in ``templates/``, and
:mod:`~cxr.report.build` runs them over a run folder (:func:`build_report`).
"""

from cxr.report.build import DEFAULT_GALLERY, build_report, report_paths
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
    "build_report",
    "data_origin",
    "gallery_cases",
    "gallery_images",
    "pr_figure",
    "reliability_figure",
    "render_html",
    "report_metrics",
    "report_paths",
    "roc_figure",
    "scores_figure",
    "training_figure",
]
