"""Temperature scaling, prior correction and threshold rules stored in the bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss, roc_auc_score
from typer.testing import CliRunner

from cxr.calibration import (
    describe_rule,
    fit_temperature,
    mean_ece,
    nll,
    prior_offsets,
    stored_rule,
)
from cxr.cli import app
from cxr.labels import PATHOLOGIES
from cxr.metrics import choose_thresholds, probabilities
from cxr.model.bundle import BundleMeta
from cxr.run import RunFolder
from cxr.workflows.calibrate import calibrate_run, refit_thresholds, split_logits
from cxr.workflows.evaluate import evaluate_run, predictions_are_fresh

PROB = [f"prob_{name}" for name in PATHOLOGIES]
TRUE = [f"true_{name}" for name in PATHOLOGIES]
CALL = [f"call_{name}" for name in PATHOLOGIES]
RUN_FILES = (
    "config.json", "run.json", "log.csv", "model.json", "model.safetensors", "ood.safetensors",
)  # fmt: skip


def copy_run(source: Path, target: Path) -> Path:
    """The parts of a trained run that evaluation needs (not checkpoint.pt, not outputs)."""
    target.mkdir(parents=True)
    for name in RUN_FILES:
        shutil.copy2(source / name, target / name)
    shutil.copytree(source / "split", target / "split")
    return target


def _predictions(run: Path, split: str) -> pd.DataFrame:
    return pd.read_csv(RunFolder(run).predictions(split), dtype={"Patient ID": str})


def _overconfident(seed: int, n: int = 3000, scale: float = 3.0):
    """Labels drawn from sigmoid(z) and logits ``scale * z``: the true temperature is ``scale``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.0, 1.5, size=(n, 4))
    labels = (rng.random((n, 4)) < probabilities(z)).astype(float)
    return scale * z, labels


# ---------------------------------------------------------------------------- temperature


def test_nll_equals_scikit_learn_log_loss():
    logits, labels = _overconfident(0, n=500)
    for temperature in (0.5, 1.0, 3.0):
        expected = log_loss(labels.ravel(), probabilities(logits, temperature).ravel())
        assert nll(logits, labels, temperature) == pytest.approx(expected, rel=1e-9)
    # Stable where the probabilities round to 0 or 1.
    assert np.isfinite(nll(np.array([[800.0, -800.0]]), np.array([[0.0, 1.0]])))


def test_temperature_is_recovered_and_minimises_the_nll():
    logits, labels = _overconfident(1)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    best = nll(logits, labels, temperature)
    for factor in (0.98, 1.02, 0.8, 1.25):
        assert best <= nll(logits, labels, temperature * factor)
    assert best < nll(logits, labels, 1.0)


def test_temperature_lowers_test_ece_and_keeps_every_ranking():
    val_logits, val_labels = _overconfident(2)
    test_logits, test_labels = _overconfident(3)
    temperature = fit_temperature(val_logits, val_labels)
    before, after = probabilities(test_logits), probabilities(test_logits, temperature)
    assert mean_ece(test_labels, after) < mean_ece(test_labels, before) / 2
    for c in range(test_labels.shape[1]):
        np.testing.assert_array_equal(np.argsort(before[:, c]), np.argsort(after[:, c]))
        assert roc_auc_score(test_labels[:, c], after[:, c]) == roc_auc_score(
            test_labels[:, c], before[:, c]
        )


def test_a_calibrated_model_keeps_temperature_one():
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 2, size=(20000, 2))
    labels = (rng.random(logits.shape) < probabilities(logits)).astype(float)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.05)


def test_prior_offsets_undo_the_class_weighting():
    meta = BundleMeta(
        image_size=224,
        training_data={
            "train_images": 100,
            "train_positives": {**{n: 10 for n in PATHOLOGIES}, "Hernia": 0},
        },
    )
    offsets = prior_offsets(meta)
    assert offsets[0] == pytest.approx(np.log(10 / 90))
    assert offsets[-1] == 0.0  # no positives: left alone
    assert prior_offsets(BundleMeta(image_size=224)) is None
    # At the weighted loss's optimum the odds are (N / P) times the true odds; the offset
    # brings a balanced 0.5 back to the prevalence.
    assert probabilities(np.array(offsets[0])) == pytest.approx(0.1)


# ---------------------------------------------------------------------------- rules


def test_threshold_rule_descriptions_round_trip():
    for rule, target in (("youden", 0.9), ("f1", 0.9), ("sensitivity", 0.8)):
        meta = BundleMeta(image_size=224, threshold_rule=describe_rule(rule, target))
        assert stored_rule(meta) == (rule, target)
    # What training writes.
    trained = BundleMeta(224, threshold_rule="youden (Youden's J on the validation split)")
    assert stored_rule(trained) == ("youden", 0.9)
    assert stored_rule(BundleMeta(image_size=224)) == ("youden", 0.9)
    fit = {"rule": "sensitivity", "target_sensitivity": 0.95}
    assert stored_rule(BundleMeta(image_size=224, threshold_fit=fit)) == ("sensitivity", 0.95)


# ---------------------------------------------------------------------------- on a run


@pytest.mark.slow
def test_calibrate_run_keeps_auroc_and_calls_and_lowers_test_ece(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    before = evaluate_run(run, "test", device="cpu")
    before_pred = _predictions(run, "test")
    meta_before = json.loads((run / "model.json").read_text())

    result = calibrate_run(run, device="cpu")
    meta = json.loads((run / "model.json").read_text())
    assert meta["temperature"] == pytest.approx(result["temperature"])
    assert result["temperature"] > 0 and result["prior_correction"]
    offsets = prior_offsets(BundleMeta.from_dict(meta_before))
    assert meta["calibration"]["logit_offsets"] == pytest.approx(offsets)
    assert meta["threshold_fit"]["rule"] == "youden" and meta["threshold_rule"].startswith("youden")
    assert result["val_nll_after"] < result["val_nll_before"]
    assert not predictions_are_fresh(run, "test")  # the bundle changed

    after = evaluate_run(run, "test", device="cpu")
    after_pred = _predictions(run, "test")
    for name in PATHOLOGIES:  # every AUROC unchanged
        if before["per_class"][name]["auroc"] is None:
            assert after["per_class"][name]["auroc"] is None
        else:
            assert after["per_class"][name]["auroc"] == pytest.approx(
                before["per_class"][name]["auroc"], abs=1e-12
            )
    # Thresholds were refitted on the calibrated val probabilities: the calls are the same.
    np.testing.assert_array_equal(after_pred[CALL].to_numpy(), before_pred[CALL].to_numpy())
    labels = before_pred[TRUE].to_numpy()
    ece_before = mean_ece(labels, before_pred[PROB].to_numpy())
    ece_after = mean_ece(labels, after_pred[PROB].to_numpy())
    assert ece_after < ece_before

    # The stored thresholds are the rule's on the calibrated validation probabilities.
    val_labels, val_logits = split_logits(run, "val", device="cpu")
    val_prob = probabilities(val_logits, meta["temperature"])
    fitted = choose_thresholds(val_labels, val_prob)
    not_fitted = meta["threshold_fit"]["not_fitted"]
    assert len(not_fitted) < len(PATHOLOGIES)
    for c, name in enumerate(PATHOLOGIES):
        single = val_labels[:, c].min() == val_labels[:, c].max()
        assert (name in not_fitted) == single
        if not single:
            assert meta["thresholds"][c] == pytest.approx(fitted[c], abs=1e-6)

    # Calibrating again replaces the correction instead of adding it twice.
    again = calibrate_run(run, device="cpu")
    assert again["temperature"] == pytest.approx(result["temperature"], rel=1e-4)
    assert again["logit_offsets"] == pytest.approx(result["logit_offsets"])
    assert again["val_nll_before"] == pytest.approx(result["val_nll_after"], rel=1e-5)


def test_threshold_rules_are_fitted_on_val_stored_and_used(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    result = refit_thresholds(run, "sensitivity", 0.8, device="cpu")
    meta = json.loads((run / "model.json").read_text())
    val = _predictions(run, "val")
    labels, prob = val[TRUE].to_numpy(), val[PROB].to_numpy()
    assert meta["threshold_fit"] == {
        "rule": "sensitivity",
        "split": "val",
        "images": len(RunFolder(run).read_split("val")),
        "target_sensitivity": 0.8,
        "temperature": 1.0,
        "not_fitted": [n for n, c in zip(PATHOLOGIES, labels.T) if c.min() == c.max()],
    }
    assert meta["threshold_rule"].startswith("sensitivity 0.8")
    assert meta["thresholds"] == result["thresholds"]
    assert meta["thresholds"] == pytest.approx(choose_thresholds(labels, prob, "sensitivity", 0.8))
    # The target is reached on val for every class with both labels there (at least one).
    both_labels = [c for c in range(len(PATHOLOGIES)) if 0 < labels[:, c].sum() < len(labels)]
    assert both_labels
    for c in both_labels:
        assert (prob[labels[:, c] == 1, c] >= meta["thresholds"][c]).mean() >= 0.8

    # evaluate uses the stored thresholds.
    evaluate_run(run, "test", device="cpu")
    test = _predictions(run, "test")
    calls = test[PROB].to_numpy() >= np.array(meta["thresholds"])[None, :]
    np.testing.assert_array_equal(test[CALL].to_numpy(), calls.astype(int))

    # The val predictions are reused while fresh; F1 then differs from the sensitivity rule.
    assert not predictions_are_fresh(run, "val")  # model.json was rewritten after them
    refit_thresholds(run, "f1", device="cpu")
    f1 = json.loads((run / "model.json").read_text())
    assert f1["threshold_fit"]["rule"] == "f1"
    assert f1["thresholds"] == pytest.approx(choose_thresholds(labels, prob, "f1"))


def test_cli_thresholds_and_calibrate(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    runner = CliRunner()
    bad = runner.invoke(app, ["thresholds", str(run), "--rule", "best"])
    assert bad.exit_code == 2
    assert "unknown threshold rule 'best'" in bad.output
    ok = runner.invoke(
        app, ["thresholds", str(run), "--rule", "f1", "--device", "cpu", "--workers", "0"]
    )
    assert ok.exit_code == 0, ok.output
    assert "thresholds: f1 (maximum F1 on the validation split)" in " ".join(ok.output.split())
    calibrated = runner.invoke(app, ["calibrate", str(run), "--device", "cpu", "--workers", "0"])
    assert calibrated.exit_code == 0, calibrated.output
    text = " ".join(calibrated.output.split())
    assert "temperature" in text and "thresholds refitted on the calibrated validation" in text
    meta = json.loads((run / "model.json").read_text())
    assert meta["threshold_fit"]["rule"] == "f1"  # calibration kept the stored rule
    assert meta["temperature"] != 1.0
