"""The only home of cxr's metrics, vectorised with numpy: probabilities from logits, AUROC,
decision thresholds, bootstrap intervals, AUPRC, threshold metrics and calibration error.

- AUROC as the Mann-Whitney statistic on (optionally weighted) samples, ties counted half,
  so that a bootstrap resample is a weight vector (how often each image was drawn) and 1,000
  resamples x 14 classes cost a few array passes instead of 14,000 scikit-learn calls;
- confidence intervals by a **patient-level** bootstrap: patients are drawn with replacement
  and every image of a drawn patient comes along (images of one patient are correlated, so
  resampling images would understate the uncertainty);
- average precision (AUPRC, scikit-learn's step-wise definition), the threshold metrics
  (sensitivity, specificity, PPV, NPV, F1, accuracy), reliability bins and the expected
  calibration error.

A metric that is undefined (a class without positives or without negatives, a ratio with a
zero denominator) is ``None``, never NaN, so that it can be written to JSON as ``null``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from cxr.labels import PATHOLOGIES

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_BINS = 10
_CHUNK_CELLS = 4_000_000  # resamples x images per block: bounds the memory of the bootstrap
THRESHOLD_RULES = ("youden", "sensitivity", "f1")
DEFAULT_THRESHOLD = 0.5


def _none_if_nan(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _truth_and_known(truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0/1 truth as booleans, and which labels are known (not NaN)."""
    truth = np.asarray(truth)
    if truth.dtype.kind != "f":
        return truth.astype(bool), np.ones(truth.shape, dtype=bool)
    known = ~np.isnan(truth)
    return np.where(known, truth, 0.0) > 0.5, known


def known_only(truth: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """``truth`` (and the arrays beside it) without the images whose label is unknown (NaN):
    CheXpert and MIMIC leave unmentioned findings blank, and those count for nothing."""
    truth = np.asarray(truth)
    if truth.dtype.kind != "f" or not np.isnan(truth).any():
        return (truth, *(np.asarray(o) for o in others))
    keep = ~np.isnan(truth)
    return (truth[keep], *(np.asarray(o)[keep] for o in others))


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``sigmoid(logits / T)`` in float64: the model's probabilities at a temperature."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64) / temperature))


def mean_defined(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are defined (not ``None`` or NaN); ``None`` if none is."""
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(defined)) if defined else None


# ---------------------------------------------------------------------------- AUROC


def _tie_groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The order that sorts ``scores`` ascending and the start index of each run of equal ones."""
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    return order, starts


def weighted_auroc(truth: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one class under each row of ``weights`` (``[R, N]``): an ``[R]`` array.

    AUROC = sum over positive i, negative j of w_i w_j ([s_i > s_j] + [s_i = s_j] / 2),
    divided by (sum of positive weights) x (sum of negative weights): with integer weights
    that is the AUROC of the data set in which image i appears w_i times. NaN where a row has
    no positive or no negative weight. One gather and one cumulative sum per call: each
    positive's share is the negative weight below its score plus half of that tied with it.
    An unknown label (NaN) weighs nothing.
    """
    truth, known = _truth_and_known(truth)
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if not known.all():
        weights = weights * known
    order, starts = _tie_groups(scores)
    positive = truth[order]
    ends = np.r_[starts[1:], len(scores)]  # one past each tie group's end
    group = np.repeat(np.arange(len(starts)), ends - starts)  # tie group of each position
    w = weights[:, order]
    negative_cum = np.zeros((w.shape[0], w.shape[1] + 1))
    np.cumsum(np.where(positive, 0.0, w), axis=1, out=negative_cum[:, 1:])
    at = np.flatnonzero(positive)
    below = negative_cum[:, starts[group[at]]]  # negative weight strictly below
    through = negative_cum[:, ends[group[at]]]  # negative weight at or below
    pos_w = w[:, at]
    pairs = np.einsum("rk,rk->r", pos_w, below + through) * 0.5
    pos_total, neg_total = pos_w.sum(axis=1), negative_cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = pairs / (pos_total * neg_total)
    return np.where((pos_total > 0) & (neg_total > 0), auc, np.nan)


def auroc(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """The AUROC of one class (equal to scikit-learn's ``roc_auc_score``); ``None`` if undefined."""
    weights = np.ones((1, len(np.asarray(truth))))
    return _none_if_nan(weighted_auroc(truth, scores, weights)[0])


def auroc_per_class(y_true: np.ndarray, y_prob: np.ndarray) -> list[float | None]:
    """:func:`auroc` per column; ``None`` where a class lacks positives or negatives."""
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    return [auroc(y_true[:, c], y_prob[:, c]) for c in range(y_true.shape[1])]


# ---------------------------------------------------------------------------- bootstrap


def resample_counts(
    groups: Sequence | np.ndarray | None, n: int, resamples: int, seed: int
) -> np.ndarray:
    """``[R, N]`` bootstrap weights: how many times each image's group was drawn.

    ``groups`` gives each image's patient; patients are drawn with replacement (as many as
    there are) and an image counts as often as its patient was drawn. ``None`` resamples
    images instead (each image its own group).
    """
    if groups is None:
        codes, count = np.arange(n), n
    else:
        _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        count = int(codes.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    drawn = rng.multinomial(count, np.full(count, 1.0 / count), size=resamples)  # [R, groups]
    return drawn[:, codes].astype(np.float64)


@dataclass
class BootstrapResult:
    """Per-class AUROC resamples ``[R, C]`` (NaN where undefined) and the mean's ``[R]``."""

    per_class: np.ndarray
    mean: np.ndarray
    resamples: int
    unit: str  # "patient" or "image"


def bootstrap_auroc(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    groups: Sequence | np.ndarray | None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> BootstrapResult:
    """Bootstrap distribution of each class's AUROC and of their mean.

    The mean of a resample is taken over the classes whose AUROC is defined on the full
    data (as the reported mean is), skipping any of them undefined in that resample.
    """
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    n, classes = y_true.shape
    per_class = np.full((resamples, classes), np.nan)
    chunk = max(1, _CHUNK_CELLS // max(n, 1))
    # One set of draws for every class: the classes' intervals and the mean's are of the same
    # resampled data sets.
    counts_all = resample_counts(groups, n, resamples, seed)
    for start in range(0, resamples, chunk):
        counts = counts_all[start : start + chunk]
        for c in range(classes):
            per_class[start : start + chunk, c] = weighted_auroc(y_true[:, c], y_prob[:, c], counts)
    defined = [c for c in range(classes) if auroc(y_true[:, c], y_prob[:, c]) is not None]
    with np.errstate(invalid="ignore"), _quiet_nanmean():
        mean = np.nanmean(per_class[:, defined], axis=1) if defined else np.full(resamples, np.nan)
    return BootstrapResult(per_class, mean, resamples, "image" if groups is None else "patient")


class _quiet_nanmean:
    """Silence numpy's 'Mean of empty slice' for resamples where no class is defined."""

    def __enter__(self):
        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._catcher.__exit__(*exc)


def percentile_interval(
    samples: np.ndarray, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float | None, float | None]:
    """The percentile interval of the finite samples; ``(None, None)`` if there are none."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return None, None
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


# ---------------------------------------------------------------------------- AUPRC


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the precision-recall curve as scikit-learn's ``average_precision_score``:
    sum over thresholds of (recall gained) x (precision there), ties taken together."""
    truth, scores = known_only(truth, scores)
    truth = truth.astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives = int(truth.sum())
    if positives == 0:
        return None
    order, starts = _tie_groups(-scores)  # descending scores
    ends = np.r_[starts[1:], len(scores)] - 1
    true_pos = np.cumsum(truth[order])[ends]
    called = ends + 1
    precision = true_pos / called
    recall = true_pos / positives
    recall_gain = np.diff(np.r_[0.0, recall])
    return float(np.sum(recall_gain * precision))


# ---------------------------------------------------------------------------- at a threshold


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def threshold_metrics(truth: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Confusion counts and the rates at ``threshold`` (a call is a score >= threshold);
    images whose label is unknown (NaN) are left out."""
    truth, scores = known_only(truth, scores)
    truth = truth.astype(bool)
    call = np.asarray(scores, dtype=np.float64) >= threshold
    tp = int(np.sum(truth & call))
    fp = int(np.sum(~truth & call))
    fn = int(np.sum(truth & ~call))
    tn = int(np.sum(~truth & ~call))
    return {
        "threshold": float(threshold),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
    }


def classification_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    thresholds: Sequence[float],
    labels: Sequence[str] = PATHOLOGIES,
) -> dict[str, dict]:
    """Per class: AUROC, the label counts and the confusion counts at its threshold (what
    ``cxr evaluate`` stores in ``metrics.json``)."""
    aurocs = auroc_per_class(y_true, y_prob)
    per_class = {}
    for column, name in enumerate(labels[: y_true.shape[1]]):
        truth, prob = known_only(y_true[:, column], y_prob[:, column])
        truth = truth.astype(bool)
        at = threshold_metrics(truth, prob, float(thresholds[column]))
        per_class[name] = {
            "auroc": aurocs[column],
            "positives": int(truth.sum()),
            "negatives": int((~truth).sum()),
            "unknown": int(len(y_true) - len(truth)),
            **{key: at[key] for key in ("threshold", "tp", "fp", "fn", "tn")},
            "sensitivity": at["sensitivity"],
            "specificity": at["specificity"],
        }
    return per_class


# ---------------------------------------------------------------------------- thresholds


def choose_threshold(
    truth: np.ndarray, prob: np.ndarray, rule: str = "youden", target_sensitivity: float = 0.9
) -> float:
    """One class's threshold on validation data.

    - ``youden``: maximise sensitivity + specificity - 1 (Youden's J) on the ROC curve;
    - ``sensitivity``: the highest threshold whose sensitivity reaches ``target_sensitivity``;
    - ``f1``: maximise F1.
    A class without both positives and negatives keeps 0.5; unknown labels are left out.
    """
    truth, prob = known_only(truth, prob)
    prob = np.asarray(prob, dtype=np.float64)
    if not len(truth) or truth.min() == truth.max():
        return DEFAULT_THRESHOLD
    if rule == "youden":
        fpr, tpr, thresholds = roc_curve(truth, prob)
        best = int(np.argmax(tpr - fpr))
        return float(min(thresholds[best], 1.0))
    if rule == "sensitivity":
        # Every cut, not only the ROC's corners: the highest one reaching the target may lie
        # on a straight stretch of the curve, which drop_intermediate would leave out.
        fpr, tpr, thresholds = roc_curve(truth, prob, drop_intermediate=False)
        reaching = np.flatnonzero(tpr >= target_sensitivity)
        return float(min(thresholds[reaching[0]], 1.0))
    if rule == "f1":
        precision, recall, thresholds = precision_recall_curve(truth, prob)
        f1 = 2 * precision[:-1] * recall[:-1] / np.clip(precision[:-1] + recall[:-1], 1e-12, None)
        return float(thresholds[int(np.argmax(f1))])
    raise ValueError(f"unknown threshold rule {rule!r}; choose from {', '.join(THRESHOLD_RULES)}")


def choose_thresholds(
    y_true: np.ndarray, y_prob: np.ndarray, rule: str = "youden", target_sensitivity: float = 0.9
) -> list[float]:
    return [
        choose_threshold(y_true[:, c], y_prob[:, c], rule, target_sensitivity)
        for c in range(y_true.shape[1])
    ]


def apply_thresholds(y_prob: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """A positive call is a probability at or above the class's threshold."""
    return (np.asarray(y_prob) >= np.asarray(thresholds)[None, :]).astype(np.int8)


# ---------------------------------------------------------------------------- calibration


def reliability_bins(truth: np.ndarray, prob: np.ndarray, bins: int = DEFAULT_BINS) -> dict:
    """Equal-width probability bins: per bin its edges, image count, mean predicted
    probability and observed fraction of positives (``None`` for empty bins).

    A probability on an inner edge belongs to the bin below it (scikit-learn's
    ``calibration_curve`` convention); 0 and 1 belong to the first and last bins. Images
    whose label is unknown (NaN) are left out.
    """
    truth, prob = known_only(truth, prob)
    prob = np.asarray(prob, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.searchsorted(edges[1:-1], prob, side="left")
    count = np.bincount(index, minlength=bins)
    prob_sum = np.bincount(index, weights=prob, minlength=bins)
    true_sum = np.bincount(index, weights=truth, minlength=bins)
    filled = count > 0
    mean_prob = np.divide(prob_sum, count, out=np.zeros(bins), where=filled)
    observed = np.divide(true_sum, count, out=np.zeros(bins), where=filled)
    return {
        "edges": edges.tolist(),
        "count": count.astype(int).tolist(),
        "mean_prob": [float(v) if f else None for v, f in zip(mean_prob, filled)],
        "observed": [float(v) if f else None for v, f in zip(observed, filled)],
    }


def expected_calibration_error(truth: np.ndarray, prob: np.ndarray, bins: int = DEFAULT_BINS):
    """ECE: the image-weighted mean over bins of |observed fraction - mean probability|."""
    table = reliability_bins(truth, prob, bins)
    total = sum(table["count"])
    if not total:
        return None
    return float(
        sum(
            n * abs(o - p)
            for n, o, p in zip(table["count"], table["observed"], table["mean_prob"])
            if n
        )
        / total
    )


def prediction_arrays(
    predictions: pd.DataFrame, labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(truth, probabilities), each ``[N, len(labels)]``, from a predictions table
    (``true_<label>`` and ``prob_<label>`` columns)."""
    truth = predictions[[f"true_{n}" for n in labels]].to_numpy(dtype=np.float64)
    prob = predictions[[f"prob_{n}" for n in labels]].to_numpy(dtype=np.float64)
    return truth, prob
