"""The report's subgroup section: its numbers (those ``cxr evaluate`` stored, or computed
here for a split evaluated without them) and its figure, mean AUROC and underdiagnosis per
subgroup with their intervals."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cxr.data.schema import IMAGE_COLUMN
from cxr.errors import DataError
from cxr.model.bundle import BundleMeta
from cxr.report.figures import _figure, _png
from cxr.run import RunFolder
from cxr.safety import figure_text
from cxr.subgroups import subgroup_analysis

SUBGROUP_FIGURE = "subgroups.png"


def subgroup_numbers(
    run: RunFolder,
    split: str,
    predictions: pd.DataFrame,
    meta: BundleMeta,
    y_true: np.ndarray,
    y_prob: np.ndarray,
    *,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """The split's subgroup analysis: the one ``cxr evaluate`` wrote beside these predictions
    (both are rewritten together), else computed from the split table and the predictions."""
    stored = run.read_metrics().get(split, {}).get("subgroups")
    if stored is not None:
        return stored
    frame = run.read_split(split)
    rows = pd.Index(frame[IMAGE_COLUMN].astype(str)).get_indexer(
        predictions[IMAGE_COLUMN].astype(str)
    )
    if (rows < 0).any():
        missing = predictions[IMAGE_COLUMN].astype(str)[rows < 0].iloc[0]
        raise DataError(f"{run.predictions(split)}: image {missing!r} is not in the {split} split")
    frame = frame.iloc[rows].reset_index(drop=True)
    return subgroup_analysis(
        frame, y_true, y_prob, meta.decision_thresholds, meta.labels,
        resamples=resamples, seed=seed,
    )  # fmt: skip


def _rows(subgroups: dict) -> list[tuple[str, dict | None]]:
    """(label, group) per line of the figure, a heading line (group None) per grouping."""
    rows: list[tuple[str, dict | None]] = []
    for grouping in subgroups["groupings"]:
        rows.append((figure_text(grouping["title"]), None))
        rows.extend((f"{figure_text(g['name'])} ({g['images']:,})", g) for g in grouping["groups"])
    return rows


def _panel(ax, rows, value, interval, rest, flagged, xlabel: str) -> None:
    """One column of the forest plot: value and interval per subgroup (red where flagged),
    the rest of its grouping as an open circle, "too few" where there is no value."""
    for y, (_, group) in enumerate(rows):
        if group is None:
            continue
        v = value(group)
        if v is None:
            ax.text(0.02, y, "too few", transform=ax.get_yaxis_transform(), va="center",
                    fontsize=7.5, color="0.45")  # fmt: skip
            continue
        low, high = interval(group)
        colour = "C3" if flagged(group) else "C0"
        if low is not None:
            ax.plot([low, high], [y, y], color=colour, lw=1.6)
        ax.plot(v, y, "o", color=colour, ms=5)
        if rest(group) is not None:
            ax.plot(rest(group), y, "o", mfc="none", mec="0.35", ms=6)
    ax.set_xlabel(xlabel, fontsize=8.5)
    ax.grid(axis="x", color="0.9", lw=0.6)
    ax.tick_params(labelsize=7.5)


def _test(group: dict, metric: str) -> dict:
    return group["vs_rest"].get(metric) or {}


def subgroup_figure(subgroups: dict) -> bytes:
    """Mean AUROC and underdiagnosis rate per subgroup, with their intervals."""
    from matplotlib.ticker import PercentFormatter  # here: importing cxr stays fast

    rows = _rows(subgroups)
    figure = _figure(11.5, 1.1 + 0.24 * len(rows))
    auroc_ax, under_ax = figure.subplots(1, 2, sharey=True)
    _panel(
        auroc_ax, rows, lambda g: g["auroc_mean"], lambda g: g["auroc_mean_ci"],
        lambda g: _test(g, "auroc_mean").get("rest"),
        lambda g: _test(g, "auroc_mean").get("flagged", False),
        "mean AUROC (classes estimable in the subgroup and its rest)",
    )  # fmt: skip
    _panel(
        under_ax, rows, lambda g: g["underdiagnosis"]["rate"], lambda g: g["underdiagnosis"]["ci"],
        lambda g: _test(g, "underdiagnosis").get("rest"),
        lambda g: _test(g, "underdiagnosis").get("flagged", False),
        'underdiagnosis: share of images with a finding called "no finding"',
    )  # fmt: skip
    under_ax.set_xlim(left=0.0)  # a rate; all-zero rates would otherwise centre on 0
    under_ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    auroc_ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    for tick, (_, group) in zip(auroc_ax.get_yticklabels(), rows):
        if group is None:
            tick.set_fontweight("bold")
    auroc_ax.set_ylim(len(rows) - 0.5, -0.5)
    confidence = subgroups["bootstrap"]["confidence"]
    test = subgroups["test"]
    figure.suptitle(
        f"Per subgroup (images), with {confidence:.0%} patient-bootstrap intervals; open circle: "
        f"the rest of the grouping; red: gap flagged (Holm-adjusted p < {test['alpha']:g}, "
        f"{test['comparisons']} comparisons)",
        fontsize=9.5,
    )
    return _png(figure)
