"""DistributedDataParallel under torchrun: two CPU processes (gloo) on a tiny synthetic set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.slow  # two torchrun launches, a minute or more

TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CXR_OFFLINE": "1", "COLUMNS": "200"}
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "cxr", "train", *args]
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def label_rows(split_csv: Path, labels: list[str]) -> np.ndarray:
    """0/1 (images, classes) from a split table's own "Finding Labels" text."""
    findings = pd.read_csv(split_csv, dtype=str, keep_default_na=False)["Finding Labels"]
    return np.array([[name in text.split("|") for name in labels] for text in findings], float)


def single_process_val_metrics(run_dir: Path) -> tuple[float, float | None]:
    """Val loss and mean AUROC of the saved best bundle, evaluated in this one process
    without cxr's data pipeline, loss or metrics: the images are decoded and preprocessed
    by conftest's PIL reference, the loss written out, the AUROC scikit-learn's."""
    from conftest import reference_batch
    from sklearn.metrics import roc_auc_score

    from cxr.model.bundle import load_bundle

    meta = json.loads((run_dir / "model.json").read_text())
    assert meta["normalization"] == "imagenet"
    names = meta["labels"]
    train = label_rows(run_dir / "split" / "train.csv", names)
    val = label_rows(run_dir / "split" / "val.csv", names)
    paths = pd.read_csv(run_dir / "split" / "val.csv", dtype=str)["path"].tolist()
    model = load_bundle(run_dir).model.eval()
    with torch.no_grad():
        logits = model(reference_batch(paths, meta["image_size"])).double().numpy()

    # Weighted BCE: positives weigh the train split's negative fraction, negatives its
    # positive fraction; the mean over images and classes.
    positive_fraction = train.mean(axis=0)
    w_pos, w_neg = 1.0 - positive_fraction, positive_fraction
    log_p = -np.logaddexp(0.0, -logits)  # log sigmoid(z)
    log_not_p = -np.logaddexp(0.0, logits)  # log (1 - sigmoid(z))
    loss = -(w_pos * val * log_p + w_neg * (1.0 - val) * log_not_p).mean()

    probabilities = 1.0 / (1.0 + np.exp(-logits))
    aurocs = [
        roc_auc_score(val[:, c], probabilities[:, c])
        for c in range(len(names))
        if 0 < val[:, c].sum() < len(val)
    ]
    return float(loss), (float(np.mean(aurocs)) if aurocs else None)


@pytest.fixture
def split_dir(tmp_path, synth_data) -> Path:
    """A split with an odd-sized validation set, so the two ranks get unequal shares."""
    from cxr.data.layouts.nih import load_nih
    from cxr.data.split import split_by_patients, write_split

    table = load_nih(synth_data, require_images=False).table
    split = split_by_patients(table, val_patients=4, test_patients=2, seed=1)
    out = tmp_path / "split"
    write_split(split, out)
    assert len(split.frames()["val"]) % 2 == 1  # rank 0 validates one image more than rank 1
    return out


def test_two_process_training_matches_single_process_evaluation_and_resumes(
    tmp_path, synth_data, split_dir
):
    from cxr.engine.trainer import load_checkpoint

    run = tmp_path / "run"
    first = torchrun(
        str(synth_data),
        "--out",
        str(run),
        "--split",
        str(split_dir),
        "--weights",
        "none",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--max-epochs",
        "1",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    # Rank 0 alone reports and writes.
    assert first.stdout.count("stopped: reached max_epochs=1") == 1, first.stdout
    assert "processes: 2" in first.stdout + first.stderr
    log = pd.read_csv(run / "log.csv")
    assert log["epoch"].tolist() == [1]
    assert (run / "model.safetensors").exists()
    assert len(list((run / "tensorboard").iterdir())) == 1

    # Stop after one epoch, resume distributed to two.
    second = torchrun("--resume", str(run), "--max-epochs", "2", cwd=tmp_path)
    assert "resuming after epoch 1" in second.stdout + second.stderr
    log = pd.read_csv(run / "log.csv")
    assert log["epoch"].tolist() == [1, 2]
    assert np.isfinite(log["train_loss"]).all()
    state = load_checkpoint(run / "checkpoint.pt")["state"]
    assert state["epoch"] == 2
    assert json.loads((run / "run.json").read_text())["world_size"] == 2

    # The logged validation metrics are those of the whole validation set, computed with the
    # weights rank 0 saved: a single-process evaluation of the best bundle gives the same.
    best = log[log["best"]].iloc[-1]
    meta = json.loads((run / "model.json").read_text())
    assert meta["epoch"] == int(best["epoch"])
    loss, auroc = single_process_val_metrics(run)
    assert loss == pytest.approx(best["val_loss"], abs=1e-5)
    assert auroc is not None
    assert auroc == pytest.approx(best["val_auroc_mean"], abs=1e-5)
    assert meta["val_loss"] == pytest.approx(loss, abs=1e-5)
