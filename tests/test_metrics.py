"""The report's metrics against scikit-learn and hand-computed values; the patient bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from cxr.metrics import (
    auroc,
    average_precision,
    bootstrap_auroc,
    expected_calibration_error,
    percentile_interval,
    reliability_bins,
    resample_counts,
    threshold_metrics,
    weighted_auroc,
)


def _data(seed: int, n: int = 400, prevalence: float = 0.2, decimals: int | None = 2):
    rng = np.random.default_rng(seed)
    truth = (rng.random(n) < prevalence).astype(int)
    scores = np.clip(rng.normal(0.4 + 0.2 * truth, 0.2), 0, 1)
    if decimals is not None:  # rounding makes ties between positives and negatives
        scores = np.round(scores, decimals)
    return truth, scores


# ---------------------------------------------------------------------------- AUROC


def test_auroc_by_hand_with_a_tie():
    # Pairs (positive, negative): 0.4 > 0.1 (1), 0.4 = 0.4 (1/2), 0.8 > both (2): 3.5 / 4.
    truth = np.array([0, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.4, 0.8])
    assert auroc(truth, scores) == pytest.approx(0.875, abs=1e-15)
    assert auroc(truth, -scores) == pytest.approx(0.125, abs=1e-15)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_scikit_learn(seed):
    truth, scores = _data(seed)
    assert auroc(truth, scores) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    truth, scores = _data(seed, decimals=None)
    assert auroc(truth, scores) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_weighted_auroc_equals_scikit_learn_with_sample_weights(seed):
    truth, scores = _data(seed)
    rng = np.random.default_rng(100 + seed)
    weights = rng.integers(0, 4, size=(6, len(truth)))
    result = weighted_auroc(truth, scores, weights)
    for row, value in zip(weights, result):
        expected = roc_auc_score(truth, scores, sample_weight=row)
        assert value == pytest.approx(expected, abs=1e-12)
        # Integer weights are repetitions: the same as the AUROC of the repeated data set.
        repeated = np.repeat(np.arange(len(truth)), row)
        assert value == pytest.approx(roc_auc_score(truth[repeated], scores[repeated]), abs=1e-12)


def test_auroc_is_undefined_without_both_labels():
    assert auroc(np.zeros(5), np.linspace(0, 1, 5)) is None
    assert auroc(np.ones(5), np.linspace(0, 1, 5)) is None
    weights = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    result = weighted_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4]), weights)
    assert np.isnan(result[0]) and np.isnan(result[1]) and result[2] == 1.0


# ---------------------------------------------------------------------------- AUPRC


def test_average_precision_by_hand():
    # Descending: 0.9 (+), 0.8 (-), 0.7 (+), 0.1 (-): AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    truth = np.array([1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    assert average_precision(truth, scores) == pytest.approx(5 / 6, abs=1e-15)
    assert average_precision(np.zeros(4), scores) is None


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_equals_scikit_learn(seed):
    for decimals in (1, 2, None):
        truth, scores = _data(seed, decimals=decimals)
        expected = average_precision_score(truth, scores)
        assert average_precision(truth, scores) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------- at a threshold


def test_threshold_metrics_by_hand():
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.6, 0.2, 0.7, 0.5, 0.3, 0.1, 0.5])
    m = threshold_metrics(truth, scores, 0.5)  # calls: 1 1 0 1 1 0 0 1
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 3, 1, 2)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 5)
    assert m["ppv"] == pytest.approx(2 / 5)
    assert m["npv"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 3 + 1))
    assert m["accuracy"] == pytest.approx(4 / 8)
    nothing_called = threshold_metrics(truth, scores, 0.95)
    assert nothing_called["ppv"] is None and nothing_called["sensitivity"] == 0.0
    no_positives = threshold_metrics(np.zeros(3), np.array([0.1, 0.6, 0.9]), 0.5)
    assert no_positives["sensitivity"] is None and no_positives["specificity"] == pytest.approx(
        1 / 3
    )


@pytest.mark.parametrize("seed", range(5))
def test_threshold_metrics_equal_scikit_learn(seed):
    truth, scores = _data(seed)
    threshold = 0.5
    calls = (scores >= threshold).astype(int)
    m = threshold_metrics(truth, scores, threshold)
    tn, fp, fn, tp = confusion_matrix(truth, calls).ravel()
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (tp, fp, fn, tn)
    assert m["sensitivity"] == pytest.approx(recall_score(truth, calls))
    assert m["specificity"] == pytest.approx(recall_score(1 - truth, 1 - calls))
    assert m["ppv"] == pytest.approx(precision_score(truth, calls))
    assert m["npv"] == pytest.approx(precision_score(1 - truth, 1 - calls))
    assert m["f1"] == pytest.approx(f1_score(truth, calls))
    assert m["accuracy"] == pytest.approx(accuracy_score(truth, calls))


# ---------------------------------------------------------------------------- calibration


def test_reliability_bins_and_ece_by_hand():
    truth = np.array([0, 0, 1, 1, 1])
    prob = np.array([0.05, 0.15, 0.15, 0.85, 0.95])
    bins = reliability_bins(truth, prob, bins=2)  # [0, 0.5], (0.5, 1]
    assert bins["count"] == [3, 2]
    assert bins["mean_prob"] == pytest.approx([0.35 / 3, 0.9])
    assert bins["observed"] == pytest.approx([1 / 3, 1.0])
    # ECE = 3/5 * |1/3 - 0.35/3| + 2/5 * |1 - 0.9|
    expected = 3 / 5 * abs(1 / 3 - 0.35 / 3) + 2 / 5 * 0.1
    assert expected_calibration_error(truth, prob, bins=2) == pytest.approx(expected, abs=1e-15)
    assert expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0
    empty = reliability_bins(truth, prob, bins=10)
    assert empty["mean_prob"][4] is None and empty["count"][4] == 0


@pytest.mark.parametrize("seed", range(3))
def test_reliability_bins_equal_scikit_learn_calibration_curve(seed):
    truth, prob = _data(seed, decimals=None)
    observed, predicted = calibration_curve(truth, prob, n_bins=10, strategy="uniform")
    bins = reliability_bins(truth, prob, bins=10)
    filled = [i for i, n in enumerate(bins["count"]) if n]
    assert [bins["observed"][i] for i in filled] == pytest.approx(observed, abs=1e-12)
    assert [bins["mean_prob"][i] for i in filled] == pytest.approx(predicted, abs=1e-12)


# ---------------------------------------------------------------------------- bootstrap


def test_resample_counts_draw_patients_with_all_their_images():
    patients = np.array(["a", "a", "a", "b", "c", "c"])
    counts = resample_counts(patients, len(patients), resamples=200, seed=0)
    assert counts.shape == (200, 6)
    # Images of one patient always come together, as often as the patient was drawn...
    assert (counts[:, 0] == counts[:, 1]).all() and (counts[:, 1] == counts[:, 2]).all()
    assert (counts[:, 4] == counts[:, 5]).all()
    # ... and each resample draws as many patients as there are (3).
    assert (counts[:, [0, 3, 4]].sum(axis=1) == 3).all()
    assert (resample_counts(patients, 6, 50, seed=1) == resample_counts(patients, 6, 50, 1)).all()
    per_image = resample_counts(None, 6, 200, seed=0)
    assert (per_image.sum(axis=1) == 6).all()
    assert (per_image[:, 0] != per_image[:, 1]).any()


def test_bootstrap_matches_scikit_learn_on_each_resampled_data_set():
    rng = np.random.default_rng(3)
    patients = rng.integers(0, 40, size=150).astype(str)
    y_true = (rng.random((150, 3)) < [0.2, 0.4, 0.1]).astype(int)
    y_prob = np.round(rng.random((150, 3)) + 0.3 * y_true, 2)
    boot = bootstrap_auroc(y_true, y_prob, patients, resamples=30, seed=7)
    counts = resample_counts(patients, 150, 30, seed=7)
    for r in range(30):
        rows = np.repeat(np.arange(150), counts[r].astype(int))
        expected = []
        for c in range(3):
            truth = y_true[rows, c]
            value = roc_auc_score(truth, y_prob[rows, c]) if 0 < truth.sum() < len(truth) else None
            if value is None:
                assert np.isnan(boot.per_class[r, c])
            else:
                assert boot.per_class[r, c] == pytest.approx(value, abs=1e-12)
                expected.append(value)
        assert boot.mean[r] == pytest.approx(np.mean(expected), abs=1e-12)


def test_patient_bootstrap_differs_from_image_bootstrap_on_clustered_data():
    """20 patients with 10 identical images each: the data hold 20 independent observations.

    The patient-level interval is that of the 20 patients alone (exactly: the same draws give
    the same weights up to a factor 10); resampling the 200 images pretends there are 200
    observations and gives a much narrower interval.
    """
    rng = np.random.default_rng(0)
    patient_truth = np.array([1] * 8 + [0] * 12)
    patient_score = rng.normal(0.5 + 0.15 * patient_truth, 0.2)
    ids = np.array([f"p{i:02d}" for i in range(20)])
    repeat = 10
    truth = np.repeat(patient_truth, repeat)[:, None]
    scores = np.repeat(patient_score, repeat)[:, None]
    groups = np.repeat(ids, repeat)

    by_patient = bootstrap_auroc(truth, scores, groups, resamples=1000, seed=0)
    by_image = bootstrap_auroc(truth, scores, None, resamples=1000, seed=0)
    alone = bootstrap_auroc(patient_truth[:, None], patient_score[:, None], ids, seed=0)

    patient_ci = percentile_interval(by_patient.per_class[:, 0])
    image_ci = percentile_interval(by_image.per_class[:, 0])
    assert by_patient.unit == "patient" and by_image.unit == "image"
    assert patient_ci == pytest.approx(percentile_interval(alone.per_class[:, 0]), abs=1e-12)
    point = auroc(truth[:, 0], scores[:, 0])
    assert point == pytest.approx(roc_auc_score(patient_truth, patient_score), abs=1e-12)
    assert patient_ci[0] <= point <= patient_ci[1]
    assert image_ci[0] <= point <= image_ci[1]
    patient_width, image_width = patient_ci[1] - patient_ci[0], image_ci[1] - image_ci[0]
    # sqrt(10) narrower in theory; at least twice as narrow with 1,000 resamples.
    assert image_width < patient_width / 2


def test_bootstrap_is_seeded_and_mean_skips_undefined_classes():
    rng = np.random.default_rng(5)
    y_true = (rng.random((60, 3)) < [0.3, 0.5, 0.0]).astype(int)  # class 3 has no positives
    y_prob = rng.random((60, 3))
    groups = rng.integers(0, 20, 60)
    first = bootstrap_auroc(y_true, y_prob, groups, resamples=100, seed=1)
    again = bootstrap_auroc(y_true, y_prob, groups, resamples=100, seed=1)
    other = bootstrap_auroc(y_true, y_prob, groups, resamples=100, seed=2)
    np.testing.assert_array_equal(first.per_class, again.per_class)
    assert not np.allclose(np.nan_to_num(first.mean), np.nan_to_num(other.mean))
    assert np.isnan(first.per_class[:, 2]).all()
    both = np.isfinite(first.per_class[:, :2]).all(axis=1)
    np.testing.assert_allclose(first.mean[both], first.per_class[both, :2].mean(axis=1))
    assert percentile_interval(first.per_class[:, 2]) == (None, None)
