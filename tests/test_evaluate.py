"""AUROC, decision thresholds and ``evaluate_run`` on a tiny trained run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxr.data.datasets import label_matrix
from cxr.data.schema import IMAGE_COLUMN, PATIENT_COLUMN
from cxr.labels import PATHOLOGIES
from cxr.metrics import (
    DEFAULT_THRESHOLD,
    THRESHOLD_RULES,
    apply_thresholds,
    auroc_per_class,
    choose_threshold,
    choose_thresholds,
    classification_metrics,
    mean_defined,
)
from cxr.run import RunFolder
from cxr.workflows.evaluate import evaluate_run

PROB = [f"prob_{name}" for name in PATHOLOGIES]
TRUE = [f"true_{name}" for name in PATHOLOGIES]
CALL = [f"call_{name}" for name in PATHOLOGIES]


# ---------------------------------------------------------------------------- AUROC


def test_auroc_per_class_equals_scikit_learn():
    rng = np.random.default_rng(0)
    truth = (rng.random((300, 6)) < np.linspace(0.05, 0.6, 6)).astype(np.float32)
    prob = np.clip(0.3 * truth + rng.random((300, 6)) * 0.8, 0, 1)
    scores = auroc_per_class(truth, prob)
    assert len(scores) == 6
    for column, score in enumerate(scores):
        expected = roc_auc_score(truth[:, column], prob[:, column])
        assert score == pytest.approx(expected, abs=1e-12)
        assert 0.5 < score < 1.0  # the signal added above is found


def test_auroc_of_a_perfect_and_a_reversed_ranking():
    truth = np.array([[0, 0], [0, 0], [1, 1], [1, 1]])
    prob = np.array([[0.1, 0.9], [0.2, 0.8], [0.7, 0.3], [0.8, 0.2]])
    assert auroc_per_class(truth, prob) == [1.0, 0.0]


def test_auroc_is_undefined_for_a_class_without_positives_or_negatives():
    truth = np.array([[0, 1, 0], [0, 1, 1], [0, 1, 0], [0, 1, 1]])
    prob = np.array([[0.1, 0.5, 0.2], [0.4, 0.6, 0.9], [0.3, 0.2, 0.1], [0.2, 0.9, 0.8]])
    scores = auroc_per_class(truth, prob)
    assert scores[0] is None  # no positives
    assert scores[1] is None  # no negatives
    assert scores[2] == 1.0
    assert mean_defined(scores) == 1.0


def test_mean_defined_ignores_undefined_values():
    assert mean_defined([0.5, None, 0.7, math.nan]) == pytest.approx(0.6)
    assert mean_defined([None, None]) is None
    assert mean_defined([]) is None


# ---------------------------------------------------------------------------- thresholds


def test_youden_threshold_is_the_hand_picked_cut():
    # negatives 0.1 0.2 0.3 0.65, positives 0.5 0.6 0.7 0.9. At >= 0.5: sensitivity 1,
    # specificity 3/4, J = 0.75; every other cut has a lower J (>= 0.7: 0.5, >= 0.65: 0.25).
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    prob = np.array([0.1, 0.2, 0.3, 0.65, 0.5, 0.6, 0.7, 0.9])
    assert choose_threshold(truth, prob, "youden") == pytest.approx(0.5)


def test_youden_threshold_maximises_j_over_all_cuts():
    rng = np.random.default_rng(1)
    truth = (rng.random(200) < 0.3).astype(int)
    prob = np.clip(rng.normal(0.4 + 0.2 * truth, 0.15), 0, 1)
    cut = choose_threshold(truth, prob, "youden")

    def youden(t):
        call = prob >= t
        return call[truth == 1].mean() - call[truth == 0].mean()

    best = max(youden(t) for t in np.unique(prob))
    assert youden(cut) == pytest.approx(best, abs=1e-12)


def test_sensitivity_rule_picks_the_highest_cut_reaching_the_target():
    # positives 0.9 0.8 0.7 0.6 0.5; a 60% target is first reached at >= 0.7 (3 of 5).
    # 0.7 lies on a straight stretch of the ROC curve, which drop_intermediate would skip.
    truth = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    prob = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1, 0.2, 0.3, 0.4, 0.55])
    assert choose_threshold(truth, prob, "sensitivity", 0.6) == pytest.approx(0.7)
    assert choose_threshold(truth, prob, "sensitivity", 0.8) == pytest.approx(0.6)
    assert choose_threshold(truth, prob, "sensitivity", 1.0) == pytest.approx(0.5)
    rng = np.random.default_rng(2)
    truth = (rng.random(300) < 0.2).astype(int)
    prob = rng.random(300)
    for target in (0.5, 0.8, 0.9, 0.95):
        cut = choose_threshold(truth, prob, "sensitivity", target)
        positives = prob[truth == 1]
        assert (positives >= cut).mean() >= target
        higher = np.unique(prob[prob > cut])
        if len(higher):  # the next cut up misses the target
            assert (positives >= higher[0]).mean() < target


def test_f1_threshold_is_the_hand_picked_cut():
    # negatives 0.1 0.2 0.3 0.6, positives 0.4 0.8: F1 at >= 0.8 is 2/3, at >= 0.6 1/2,
    # at >= 0.4 (precision 2/3, recall 1) 0.8, at >= 0.3 2/3.
    truth = np.array([0, 0, 0, 0, 1, 1])
    prob = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.8])
    assert choose_threshold(truth, prob, "f1") == pytest.approx(0.4)


@pytest.mark.parametrize("rule", THRESHOLD_RULES)
def test_single_class_truth_keeps_the_default_threshold(rule):
    prob = np.array([0.1, 0.7, 0.9])
    assert choose_threshold(np.zeros(3), prob, rule) == DEFAULT_THRESHOLD == 0.5
    assert choose_threshold(np.ones(3), prob, rule) == 0.5


def test_unknown_threshold_rule_is_refused():
    with pytest.raises(ValueError, match="unknown threshold rule 'best'"):
        choose_threshold(np.array([0, 1]), np.array([0.2, 0.8]), "best")


def test_calls_and_confusion_counts_at_the_thresholds():
    truth = np.array([[1, 0], [1, 0], [0, 1], [0, 0]])
    prob = np.array([[0.9, 0.1], [0.4, 0.6], [0.5, 0.7], [0.2, 0.2]])
    thresholds = [0.5, 0.65]
    assert apply_thresholds(prob, thresholds).tolist() == [[1, 0], [0, 0], [1, 1], [0, 0]]
    metrics = classification_metrics(truth, prob, thresholds)
    first = metrics[PATHOLOGIES[0]]
    assert (first["tp"], first["fp"], first["fn"], first["tn"]) == (1, 1, 1, 1)
    assert first["sensitivity"] == 0.5 and first["specificity"] == 0.5
    second = metrics[PATHOLOGIES[1]]
    assert (second["tp"], second["fp"], second["fn"], second["tn"]) == (1, 0, 0, 3)
    assert second["auroc"] == 1.0 and second["threshold"] == 0.65


# ---------------------------------------------------------------------------- evaluate_run


def _read_predictions(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={IMAGE_COLUMN: str, PATIENT_COLUMN: str})


def test_evaluate_run_writes_predictions_and_sklearn_auroc(trained_run: Path):
    run = RunFolder(trained_run)
    meta = json.loads((trained_run / "model.json").read_text())
    result = evaluate_run(trained_run, "test", device="cpu")

    predictions = _read_predictions(run.predictions("test"))
    ood = ["ood_distance", "ood_percentile", "ood_flag"]  # the bundle has an OOD summary
    assert list(predictions.columns) == [IMAGE_COLUMN, PATIENT_COLUMN, *PROB, *TRUE, *CALL, *ood]
    test_frame = run.read_split("test")
    assert predictions[IMAGE_COLUMN].tolist() == test_frame[IMAGE_COLUMN].tolist()
    assert predictions[PATIENT_COLUMN].tolist() == test_frame[PATIENT_COLUMN].astype(str).tolist()
    truth = predictions[TRUE].to_numpy()
    prob = predictions[PROB].to_numpy()
    assert (truth == label_matrix(test_frame)).all()
    assert ((prob > 0) & (prob < 1)).all()
    calls = predictions[CALL].to_numpy()
    assert (calls == (prob >= np.array(meta["thresholds"])[None, :])).all()

    metrics = json.loads(run.metrics.read_text())["test"]
    assert metrics["images"] == len(test_frame) == result["images"]
    assert metrics["model_epoch"] == meta["epoch"]
    defined = []
    for column, name in enumerate(PATHOLOGIES):
        recorded = metrics["per_class"][name]["auroc"]
        if truth[:, column].min() == truth[:, column].max():
            assert recorded is None
            assert name in metrics["auroc_undefined"]
        else:
            expected = roc_auc_score(truth[:, column], prob[:, column])
            assert recorded == pytest.approx(expected, abs=1e-12)
            defined.append(expected)
        assert metrics["per_class"][name]["positives"] == int(truth[:, column].sum())
    assert len(defined) >= 5  # the test split has both classes for most pathologies
    assert metrics["auroc_mean"] == pytest.approx(np.mean(defined), abs=1e-12)


def test_thresholds_are_chosen_on_val_and_kept_by_evaluation(trained_run: Path):
    run = RunFolder(trained_run)
    meta_before = (trained_run / "model.json").read_text()
    meta = json.loads(meta_before)
    assert meta["threshold_rule"].startswith("youden")

    # The training loop predicts val with batches of 2 x batch_size; the same batches here.
    evaluate_run(trained_run, "val", device="cpu", batch_size=16)
    predictions = _read_predictions(run.predictions("val"))
    truth = predictions[TRUE].to_numpy()
    prob = predictions[PROB].to_numpy()
    assert (truth == label_matrix(run.read_split("val"))).all()
    recomputed = choose_thresholds(truth, prob, "youden")
    assert meta["thresholds"] == pytest.approx(recomputed, abs=1e-6)
    single_class = [c for c in range(len(PATHOLOGIES)) if truth[:, c].min() == truth[:, c].max()]
    assert len(single_class) < len(PATHOLOGIES)  # some classes have both labels in val
    assert all(meta["thresholds"][c] == 0.5 for c in single_class)
    # Not chosen on test: the test split's own thresholds differ.
    test_result = evaluate_run(trained_run, "test", device="cpu")
    test_pred = _read_predictions(run.predictions("test"))
    on_test = choose_thresholds(test_pred[TRUE].to_numpy(), test_pred[PROB].to_numpy())
    assert on_test != pytest.approx(meta["thresholds"], abs=1e-6)

    # Evaluation refreshes the model card only: nothing that shapes a prediction changes.
    after = json.loads((trained_run / "model.json").read_text())
    assert {k: v for k, v in after.items() if k != "card"} == {
        k: v for k, v in json.loads(meta_before).items() if k != "card"
    }
    stored = [test_result["per_class"][name]["threshold"] for name in PATHOLOGIES]
    assert stored == pytest.approx(meta["thresholds"], abs=1e-12)
    both = json.loads(run.metrics.read_text())
    assert set(both) >= {"val", "test"}


def test_evaluating_another_table_refuses_the_runs_training_patients(trained_run, tmp_path):
    from typer.testing import CliRunner

    from cxr.cli import app
    from cxr.errors import LeakageError
    from cxr.run import RunFolder

    run = RunFolder(trained_run)
    test = run.read_split("test")
    fresh = tmp_path / "fresh.csv"
    test.to_csv(fresh, index=False)
    result = evaluate_run(trained_run, str(fresh), device="cpu")
    assert result["split"].startswith("split-fresh-") and result["images"] == len(test)

    train = run.read_split("train")
    mixed = tmp_path / "mixed.csv"
    pd.concat([test, train.iloc[:3]]).to_csv(mixed, index=False)
    patients = sorted(set(train.iloc[:3][PATIENT_COLUMN].astype(str)))
    with pytest.raises(LeakageError) as info:
        evaluate_run(trained_run, str(mixed), device="cpu")
    assert info.value.shared == {"train": patients}
    outcome = CliRunner().invoke(app, ["evaluate", str(trained_run), "--split", str(mixed)])
    assert outcome.exit_code == 3 and "leakage:" in outcome.output
    assert f"{len(patients)} in train (first: {', '.join(patients)})" in outcome.output
    assert not (trained_run / "predictions-mixed.csv").exists()
