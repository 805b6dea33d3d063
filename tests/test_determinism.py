"""The same seed, data and CPU give the identical split, weights and metrics."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cxr.cli import app
from cxr.data.layouts.nih import load_nih
from cxr.data.split import split_by_patients
from cxr.labels import PATHOLOGIES
from cxr.workflows.evaluate import evaluate_run
from cxr.workflows.train import train_run


def test_the_same_seed_gives_the_identical_split(synth_data):
    table = load_nih(synth_data).table
    first = split_by_patients(table, val_fraction=0.25, test_fraction=0.25, seed=7).frames()
    again = split_by_patients(table.copy(), val_fraction=0.25, test_fraction=0.25, seed=7).frames()
    for name in ("train", "val", "test"):
        pd.testing.assert_frame_equal(first[name], again[name], check_exact=True)
    other = split_by_patients(table, val_fraction=0.25, test_fraction=0.25, seed=8).frames()
    assert any(
        set(first[name]["Image Index"]) != set(other[name]["Image Index"])
        for name in ("train", "val", "test")
    ), "the seed must matter"


def test_cxr_data_split_writes_identical_files(synth_data, tmp_path):
    runner = CliRunner()
    for out in ("a", "b"):
        result = runner.invoke(
            app, ["data", "split", str(synth_data), "--out", str(tmp_path / out), "--seed", "3"]
        )
        assert result.exit_code == 0, result.output
    for name in ("train.csv", "val.csv", "test.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.slow
def test_two_runs_give_identical_weights_and_metrics(tmp_path, make_run):
    runs = [make_run(tmp_path / name, max_epochs=1) for name in ("a", "b")]
    for run in runs:
        state = train_run(run)
        assert state.epoch == 1
    weights = [load_file(str(run / "model.safetensors")) for run in runs]
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 100
    for key, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][key]), key
    meta = [json.loads((run / "model.json").read_text()) for run in runs]
    assert meta[0]["thresholds"] == meta[1]["thresholds"]

    results = [evaluate_run(run, "test", device="cpu", workers=0) for run in runs]
    metrics = [json.loads((run / "metrics.json").read_text())["test"] for run in runs]
    for result, stored in zip(results, metrics):
        assert stored["auroc_mean"] == result["auroc_mean"]
    assert metrics[0]["per_class"].keys() == set(PATHOLOGIES)
    for name in PATHOLOGIES:
        assert metrics[0]["per_class"][name] == metrics[1]["per_class"][name], name
    assert metrics[0]["auroc_mean"] == metrics[1]["auroc_mean"]
    predictions = [pd.read_csv(run / "predictions-test.csv") for run in runs]
    pd.testing.assert_frame_equal(predictions[0], predictions[1], check_exact=True)
    # The log (losses, AUROC per epoch) is the same apart from wall-clock columns.
    logs = [pd.read_csv(run / "log.csv") for run in runs]
    timing = ["images_per_s", "seconds"]
    assert "val_auroc_Hernia" in logs[0].columns
    pd.testing.assert_frame_equal(
        logs[0].drop(columns=timing), logs[1].drop(columns=timing), check_exact=True
    )


@pytest.mark.slow
def test_a_different_seed_gives_different_weights(tmp_path, make_run):
    """The check above is not vacuous: the seed reaches the initial weights."""
    runs = [make_run(tmp_path / f"seed{seed}", max_epochs=1, seed=seed) for seed in (0, 1)]
    for run in runs:
        train_run(run)
    weights = [load_file(str(run / "model.safetensors")) for run in runs]
    assert any(not torch.equal(tensor, weights[1][key]) for key, tensor in weights[0].items())
