"""Who does the model fail? Per-subgroup AUROC, threshold metrics and underdiagnosis, with
gaps against the rest of the test set tested and adjusted for the number of tests.

Subgroups (where the split table has the column): sex (``Patient Gender``), age band
(``age_years``: 0-19, 20-39, 40-59, 60-79, 80+), view position (``View Position``) and
follow-up band (NIH's 0-based ``Follow-up #``: the first image, the 2nd to 5th, the 6th
on); any other column of the table can be named, and each of its values is a subgroup.

Per subgroup:

- per class: AUROC with the patient-level bootstrap interval of :mod:`cxr.metrics`, and the
  sensitivity and false-positive rate at the bundle's thresholds;
- the mean AUROC over the classes that can be estimated in the subgroup *and* in the rest
  of its grouping, so that both sides of a comparison average the same classes;
- the **underdiagnosis rate** (Seyyed-Kalantari et al., Nature Medicine 2021): among the
  images with at least one finding, the share the model calls "no finding" (every call
  negative). A ``No Finding`` label, where the label set has one, is neither a finding nor
  a call.

**Too few**: a class's AUROC needs at least :data:`MIN_POSITIVES` positives and
:data:`MIN_NEGATIVES` negatives in the subgroup (the sensitivity only the positives, the
false-positive rate only the negatives); the underdiagnosis rate needs
:data:`MIN_WITH_FINDING` images with a finding. Below that the value is ``None`` and the
page says "too few". Two underdiagnosis rates are compared only where each side has at
least :data:`MIN_EVENTS` images with a finding called "no finding" and as many called
otherwise, and two mean AUROCs only where every averaged class has at least
:data:`MIN_TEST_POSITIVES` positives and as many negatives on each side (with fewer, the
bootstrap's standard error is too uncertain and the test flags noise).

**Gaps**: each subgroup's mean AUROC and underdiagnosis rate are compared with those of the
rest of its grouping (the other rows whose value is known; a grouping of two subgroups is
one comparison, not two). One patient-level bootstrap over the grouping's rows resamples
both sides together (a patient can be in several age or follow-up bands), giving the
difference's standard error; the two-sided p-value is that of the Wald statistic
difference / SE. The p-values of all comparisons are Holm-adjusted (family-wise error
:data:`FAMILY_ALPHA`), and a gap is flagged where the adjusted p-value is below it. The
number of comparisons is stored beside the flags.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cxr.data.schema import PATIENT_COLUMN, SEX_COLUMN, VIEW_COLUMN
from cxr.errors import DataError
from cxr.labels import NO_FINDING
from cxr.metrics import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    apply_thresholds,
    bootstrap_auroc,
    percentile_interval,
    resample_counts,
    weighted_auroc,
)

AGE_COLUMN_YEARS = "age_years"
FOLLOW_UP_COLUMN = "Follow-up #"
AGE_BANDS = ((0, 20, "0-19"), (20, 40, "20-39"), (40, 60, "40-59"), (60, 80, "60-79"))
AGE_TOP_BAND = (80, "80+")
# NIH numbers a patient's images from 0: 0 is the first image, 1-4 the 2nd to 5th.
FOLLOW_UP_BANDS = ((0, 1, "first image"), (1, 5, "2-5"), (5, math.inf, "6+"))
GROUPING_TITLES = {"sex": "sex", "age": "age band (years)", "view": "view position",
                   "follow_up": "follow-up (which image of the patient)"}  # fmt: skip
MIN_POSITIVES = 10
MIN_NEGATIVES = 10
MIN_WITH_FINDING = 10
# Comparing underdiagnosis rates needs this many images called "no finding" and as many
# called otherwise (of those with a finding) on each side: with fewer, a side's bootstrap
# spread is near zero (0 of 40 missed resamples to 0 every time) and the test flags noise.
MIN_EVENTS = 10
# Comparing mean AUROCs needs this many positives and negatives of every averaged class on
# each side. With fewer, the bootstrap standard error of an AUROC is itself too uncertain
# and the Wald test flags noise: on `cxr demo`'s data (no effect planted) one age band of 79
# images whose mean rested on 2 classes of 10-20 positives was flagged at Holm p = 0.012.
MIN_TEST_POSITIVES = 30
FAMILY_ALPHA = 0.05
MAX_GROUPS = 20  # a named column with more values is refused: bin it into a new column first
_CHUNK_CELLS = 4_000_000  # resamples x images per block of the difference bootstrap
METHOD_NOTE = (
    "Each subgroup against the rest of its grouping: difference of mean AUROC and of "
    "underdiagnosis rate; standard error from a patient-level bootstrap of the grouping's "
    "rows (both sides resampled together); two-sided Wald p-value; Holm adjustment over all "
    "comparisons; flagged where the adjusted p-value < alpha."
)


@dataclass(frozen=True)
class Grouping:
    """One way of cutting the test set: each row's subgroup (``codes``, -1 where unknown)."""

    key: str
    column: str
    names: tuple[str, ...]
    codes: np.ndarray

    @property
    def known(self) -> np.ndarray:
        return self.codes >= 0


# ---------------------------------------------------------------------------- groupings


def _banded(values: pd.Series, bands) -> tuple[tuple[str, ...], np.ndarray]:
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    codes = np.full(len(numbers), -1)
    for index, (low, high, _) in enumerate(bands):
        codes[(numbers >= low) & (numbers < high)] = index
    # Bands nobody falls in are left out; the others keep their order.
    present = [i for i in range(len(bands)) if (codes == i).any()]
    recode = np.full(len(bands) + 1, -1)
    recode[present] = np.arange(len(present))
    return tuple(bands[i][2] for i in present), recode[codes]


def _categories(values: pd.Series, column: str) -> tuple[tuple[str, ...], np.ndarray]:
    text = values.astype("string").str.strip().fillna("")
    names = tuple(sorted(v for v in text.unique() if v not in ("", "nan", "<NA>")))
    if len(names) > MAX_GROUPS:
        raise DataError(
            f"column {column!r} has {len(names):,} distinct values; subgroups need at most "
            f"{MAX_GROUPS}: put its bands in a new column of the table and name that one"
        )
    lookup = {name: i for i, name in enumerate(names)}
    return names, np.array([lookup.get(v, -1) for v in text], dtype=np.int64)


def build_groupings(frame: pd.DataFrame, columns: Sequence[str] = ()) -> list[Grouping]:
    """Sex, age band, view and follow-up band where ``frame`` has their columns, then one
    grouping per named column (each of its values a subgroup)."""
    found: list[Grouping] = []
    if SEX_COLUMN in frame.columns:
        found.append(Grouping("sex", SEX_COLUMN, *_categories(frame[SEX_COLUMN], SEX_COLUMN)))
    if AGE_COLUMN_YEARS in frame.columns:
        bands = (*AGE_BANDS, (AGE_TOP_BAND[0], math.inf, AGE_TOP_BAND[1]))
        found.append(Grouping("age", AGE_COLUMN_YEARS, *_banded(frame[AGE_COLUMN_YEARS], bands)))
    if VIEW_COLUMN in frame.columns:
        views = frame[VIEW_COLUMN].astype("string").str.upper()
        found.append(Grouping("view", VIEW_COLUMN, *_categories(views, VIEW_COLUMN)))
    if FOLLOW_UP_COLUMN in frame.columns:
        banded = _banded(frame[FOLLOW_UP_COLUMN], FOLLOW_UP_BANDS)
        found.append(Grouping("follow_up", FOLLOW_UP_COLUMN, *banded))
    taken = {g.column for g in found}
    for column in dict.fromkeys(columns):
        if column in taken:
            continue
        if column not in frame.columns:
            shown = ", ".join(repr(c) for c in list(frame.columns)[:40])
            raise DataError(f"subgroup column {column!r} is not in the split table ({shown})")
        found.append(Grouping(column, column, *_categories(frame[column], column)))
    return [g for g in found if g.names]


# ---------------------------------------------------------------------------- one subgroup


@dataclass
class _Data:
    """The split's arrays, and the per-image underdiagnosis terms."""

    truth: np.ndarray
    prob: np.ndarray
    calls: np.ndarray
    patients: np.ndarray
    labels: list[str]
    with_finding: np.ndarray  # at least one known positive finding
    missed: np.ndarray  # ... and every finding's call negative


def _data(y_true, y_prob, thresholds, labels, patients) -> _Data:
    truth = np.asarray(y_true, dtype=np.float64)
    prob = np.asarray(y_prob, dtype=np.float64)
    calls = apply_thresholds(prob, thresholds).astype(bool)
    findings = [c for c, name in enumerate(labels) if name != NO_FINDING]
    with_finding = (truth[:, findings] == 1).any(axis=1)
    missed = with_finding & ~calls[:, findings].any(axis=1)
    return _Data(truth, prob, calls, np.asarray(patients).astype(str), list(labels),
                 with_finding, missed)  # fmt: skip


def _counts(truth: np.ndarray) -> tuple[int, int]:
    return int((truth == 1).sum()), int((truth == 0).sum())


def estimable(truth: np.ndarray) -> bool:
    positives, negatives = _counts(truth)
    return positives >= MIN_POSITIVES and negatives >= MIN_NEGATIVES


def testable(truth: np.ndarray) -> bool:
    positives, negatives = _counts(truth)
    return positives >= MIN_TEST_POSITIVES and negatives >= MIN_TEST_POSITIVES


def _rate(numerator: int, denominator: int, enough: bool) -> float | None:
    return numerator / denominator if enough and denominator else None


def _class_entry(truth, prob, calls, samples, confidence) -> dict[str, Any]:
    """One class in one subgroup: counts, AUROC + interval, sensitivity, false-positive rate."""
    positives, negatives = _counts(truth)
    positive, negative = truth == 1, truth == 0
    ok = positives >= MIN_POSITIVES and negatives >= MIN_NEGATIVES
    value = float(weighted_auroc(truth, prob, np.ones((1, len(truth))))[0]) if ok else None
    low, high = percentile_interval(samples, confidence) if ok else (None, None)
    return {
        "positives": positives,
        "negatives": negatives,
        "estimable": ok,
        "auroc": value,
        "auroc_ci": [low, high],
        "sensitivity": _rate(int((positive & calls).sum()), positives,
                             positives >= MIN_POSITIVES),
        "fpr": _rate(int((negative & calls).sum()), negatives, negatives >= MIN_NEGATIVES),
    }  # fmt: skip


def _underdiagnosis(data: _Data, rows: np.ndarray, counts: np.ndarray, confidence) -> dict:
    """The subgroup's underdiagnosis rate, with an interval from its bootstrap weights."""
    with_finding, missed = data.with_finding[rows], data.missed[rows]
    total = int(with_finding.sum())
    ok = total >= MIN_WITH_FINDING
    low, high = None, None
    if ok:
        with np.errstate(invalid="ignore", divide="ignore"):
            samples = (counts @ missed) / (counts @ with_finding)
        low, high = percentile_interval(samples, confidence)
    return {
        "with_finding": total,
        "called_no_finding": int(missed.sum()),
        "rate": _rate(int(missed.sum()), total, ok),
        "ci": [low, high],
    }


def _group_entry(data: _Data, rows: np.ndarray, classes: list[int], settings: dict) -> dict:
    """Counts, per-class numbers, mean AUROC over ``classes`` and underdiagnosis of one
    subgroup, from a patient-level bootstrap of its own rows."""
    truth, prob, calls = data.truth[rows], data.prob[rows], data.calls[rows]
    patients = data.patients[rows]
    resamples, seed, confidence = settings["resamples"], settings["seed"], settings["confidence"]
    boot = bootstrap_auroc(truth, prob, patients, resamples=resamples, seed=seed)
    per_class = {
        name: _class_entry(truth[:, c], prob[:, c], calls[:, c], boot.per_class[:, c], confidence)
        for c, name in enumerate(data.labels)
    }
    mean, interval = None, [None, None]
    if classes:
        mean = float(np.mean([per_class[data.labels[c]]["auroc"] for c in classes]))
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            samples = np.nanmean(boot.per_class[:, classes], axis=1)
        interval = list(percentile_interval(samples, confidence))
    counts = resample_counts(patients, len(patients), resamples, seed)
    return {
        "images": int(rows.sum()),
        "patients": int(len(set(patients))),
        "auroc_mean": mean,
        "auroc_mean_ci": interval,
        "auroc_mean_classes": [data.labels[c] for c in classes],
        "underdiagnosis": _underdiagnosis(data, rows, counts, confidence),
        "per_class": per_class,
    }


# ---------------------------------------------------------------------------- comparisons


def _mean_auroc_samples(data: _Data, rows: np.ndarray, classes, counts) -> np.ndarray:
    """``[R]`` mean AUROC over ``classes`` of the images ``rows`` under bootstrap weights."""
    per_class = np.stack(
        [weighted_auroc(data.truth[rows, c], data.prob[rows, c], counts[:, rows]) for c in classes],
        axis=1,
    )
    # A class can lack positives in a resample of a small subgroup: NaN, left out of the mean.
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(per_class, axis=1)


def _side_samples(data, grouping_rows, in_group, classes, counts) -> dict[str, np.ndarray]:
    """Bootstrap samples ``[2, R]`` (the subgroup, the rest) of the mean AUROC and of the
    underdiagnosis rate; ``counts`` weigh the grouping's rows, ``in_group`` marks the
    subgroup among them. Both sides come from the same resamples."""
    sides = (in_group, ~in_group)
    out: dict[str, list[np.ndarray]] = {"auroc_mean": [], "underdiagnosis": []}
    chunk = max(1, _CHUNK_CELLS // max(len(in_group), 1))
    with_finding = data.with_finding[grouping_rows].astype(np.float64)
    missed = data.missed[grouping_rows].astype(np.float64)
    sub = _Data(data.truth[grouping_rows], data.prob[grouping_rows], data.calls[grouping_rows],
                data.patients[grouping_rows], data.labels, with_finding, missed)  # fmt: skip
    for start in range(0, len(counts), chunk):
        block = counts[start : start + chunk]
        if classes:
            out["auroc_mean"].append(
                np.stack([_mean_auroc_samples(sub, side, classes, block) for side in sides])
            )
        with np.errstate(invalid="ignore", divide="ignore"):
            rates = [
                (block[:, side] @ missed[side]) / (block[:, side] @ with_finding[side])
                for side in sides
            ]
        out["underdiagnosis"].append(np.stack(rates))
    return {
        key: np.concatenate(parts, axis=1) if parts else np.empty((2, 0))
        for key, parts in out.items()
    }


def _wald(group: float, rest: float, samples: np.ndarray, confidence: float) -> dict[str, Any]:
    """The difference (subgroup - rest), its bootstrap percentile interval and standard
    error, and the two-sided p-value of difference / SE under a normal reference.

    Measured on simulated data without a gap (4 classes, 50 patients in the subgroup), it
    rejects about 5-7 % of comparisons at p < 0.05; with one class of 15-30 positives about
    8-13 %: the bootstrap SE of an AUROC from few positives varies with the AUROC itself
    (a logit scale was tried and made this worse).
    """
    finite = np.isfinite(samples).all(axis=0)
    differences = samples[0, finite] - samples[1, finite]
    se = float(np.std(differences, ddof=1)) if len(differences) > 1 else math.nan
    difference = group - rest
    if se > 0:
        p = math.erfc(abs(difference / se) / math.sqrt(2.0))
    else:
        p = 1.0 if difference == 0 else 0.0
    low, high = percentile_interval(differences, confidence)
    return {"rest": rest, "difference": difference, "ci": [low, high],
            "se": se if se == se else None, "p": p, "p_adjusted": None,
            "flagged": False}  # fmt: skip


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): the i-th smallest becomes
    max over j <= i of min(1, (m - j + 1) p_(j))."""
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[index])))
        adjusted[index] = running
    return adjusted.tolist()


def _full_mean_auroc(data: _Data, rows: np.ndarray, classes: list[int]) -> float:
    ones = np.ones((1, int(rows.sum())))
    return float(
        np.mean([weighted_auroc(data.truth[rows, c], data.prob[rows, c], ones)[0] for c in classes])
    )


def _tests(data, grouping: Grouping, rows, entry, classes, counts, confidence) -> dict:
    """The subgroup against the rest of its grouping, where both sides can be estimated."""
    known = grouping.known
    rest = known & ~rows
    samples = _side_samples(data, known, rows[known], classes, counts)
    tests = {}
    if classes and all(testable(data.truth[side, c]) for c in classes for side in (rows, rest)):
        rest_mean = _full_mean_auroc(data, rest, classes)
        tests["auroc_mean"] = _wald(
            entry["auroc_mean"], rest_mean, samples["auroc_mean"], confidence
        )
    under = entry["underdiagnosis"]
    sides = [(under["called_no_finding"], under["with_finding"]),
             (int(data.missed[rest].sum()), int(data.with_finding[rest].sum()))]  # fmt: skip
    if all(MIN_EVENTS <= missed <= total - MIN_EVENTS for missed, total in sides):
        rest_rate = sides[1][0] / sides[1][1]
        tests["underdiagnosis"] = _wald(
            under["rate"], rest_rate, samples["underdiagnosis"], confidence
        )
    return tests


def _grouping_entry(data: _Data, grouping: Grouping, settings: dict) -> dict[str, Any]:
    """Every subgroup of one grouping, and its comparisons with the rest (the second of two
    subgroups is filled in by :func:`_mirror_pair` once the p-values are adjusted)."""
    known = grouping.known
    counts = resample_counts(
        data.patients[known], int(known.sum()), settings["resamples"], settings["seed"]
    )
    groups = []
    for index, name in enumerate(grouping.names):
        rows = grouping.codes == index
        rest = known & ~rows
        classes = [
            c
            for c in range(len(data.labels))
            if estimable(data.truth[rows, c]) and estimable(data.truth[rest, c])
        ]
        entry = {"name": name, **_group_entry(data, rows, classes, settings), "vs_rest": {}}
        if not (len(grouping.names) == 2 and index == 1):
            entry["vs_rest"] = _tests(
                data, grouping, rows, entry, classes, counts, settings["confidence"]
            )
        groups.append(entry)
    return {
        "key": grouping.key,
        "title": GROUPING_TITLES.get(grouping.key, f"column {grouping.column!r}"),
        "column": grouping.column,
        "unknown": int((~known).sum()),
        "groups": groups,
    }


def _mirror_pair(grouping: dict) -> None:
    """In a grouping of two, the second subgroup's comparison is the first's, seen from it."""
    groups = grouping["groups"]
    if len(groups) != 2:
        return
    first, second = groups
    for metric, test in first["vs_rest"].items():
        low, high = test["ci"]
        own = first["auroc_mean"] if metric == "auroc_mean" else first["underdiagnosis"]["rate"]
        second["vs_rest"][metric] = {
            **test,
            "rest": own,
            "difference": -test["difference"],
            "ci": [None if high is None else -high, None if low is None else -low],
            "mirror": True,
        }


def subgroup_analysis(
    frame: pd.DataFrame,
    y_true: np.ndarray,
    y_prob: np.ndarray,
    thresholds: Sequence[float],
    labels: Sequence[str],
    *,
    columns: Sequence[str] = (),
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    alpha: float = FAMILY_ALPHA,
) -> dict[str, Any]:
    """Every subgroup's numbers and the flagged gaps, as written to ``metrics.json``.

    ``frame`` is the split table (rows in the order of ``y_true`` / ``y_prob``), ``columns``
    names further subgroup columns; see the module docstring for the rules.
    """
    if len(frame) != len(y_true):
        raise DataError(f"subgroups: {len(frame):,} table rows for {len(y_true):,} predictions")
    data = _data(y_true, y_prob, thresholds, labels, frame[PATIENT_COLUMN])
    settings = {"resamples": resamples, "seed": seed, "confidence": confidence}
    groupings = [_grouping_entry(data, g, settings) for g in build_groupings(frame, columns)]
    tests = [t for g in groupings for e in g["groups"] for t in e["vs_rest"].values()]
    for test, adjusted in zip(tests, holm_adjust([t["p"] for t in tests])):
        test["p_adjusted"], test["flagged"] = adjusted, adjusted < alpha
    for grouping in groupings:
        _mirror_pair(grouping)
    return {
        "labels": list(labels),
        "finding_labels": [name for name in labels if name != NO_FINDING],
        "rules": {"min_positives": MIN_POSITIVES, "min_negatives": MIN_NEGATIVES,
                  "min_with_finding": MIN_WITH_FINDING, "min_events": MIN_EVENTS,
                  "min_test_positives": MIN_TEST_POSITIVES},
        "bootstrap": {"unit": "patient", "resamples": resamples, "seed": seed,
                      "confidence": confidence, "method": "percentile"},
        "test": {"method": METHOD_NOTE, "adjustment": "holm", "alpha": alpha,
                 "comparisons": len(tests)},
        "groupings": groupings,
        "flags": flagged_gaps(groupings),
    }  # fmt: skip


def flagged_gaps(groupings: list[dict]) -> list[dict[str, Any]]:
    """One line per flagged comparison, from the subgroup's side (both sides of a pair)."""
    flags = []
    for grouping in groupings:
        for group in grouping["groups"]:
            for metric, test in group["vs_rest"].items():
                if test["flagged"]:
                    flags.append({
                        "grouping": grouping["key"], "group": group["name"], "metric": metric,
                        "difference": test["difference"], "p_adjusted": test["p_adjusted"],
                    })  # fmt: skip
    return flags
