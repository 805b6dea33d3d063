"""Beyond NIH, end to end through the CLI as a user runs it (issue 15): split, train from
scratch and fine-tuned, evaluate, report, predict and external validation on the CheXpert and
MIMIC layouts and on a generic table of real NIH PNGs; an NIH model scored against the
radiologists' google2019 labels.

References: the raw tables read with pandas, probabilities from ``cxr predict``'s own path
(:func:`cxr.engine.inference.predict_files`) and scikit-learn's AUROC.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from support.media import untrained_bundle
from typer.testing import CliRunner

from cxr.cli import app
from cxr.labels import CHEXPERT_LABELS

pytestmark = pytest.mark.slow

TINY = ["--image-size", "32", "--max-epochs", "1", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--lr", "0.05"]  # fmt: skip


def cli(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def predicted(run: Path, files: list[str]) -> np.ndarray:
    """``cxr predict``'s probabilities for ``files`` (PyTorch backend, as evaluate runs)."""
    from cxr.engine.inference import load_predictor, predict_files

    predictor = load_predictor(run, backend="torch", device="cpu")
    result = predict_files(predictor, [Path(f) for f in files], workers=0)
    assert not result.errors
    return result.probabilities


def truth_of(table: pd.DataFrame, label: str) -> np.ndarray:
    """1 / 0 from a raw CheXpert-style column; uncertain and blank as NaN (never scored)."""
    values = pd.to_numeric(table[label], errors="coerce").to_numpy(dtype=float, copy=True)
    values[values == -1] = np.nan
    return values


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chexpert") / "data"
    cli("data", "synth", "--out", out, "--layout", "chexpert", "--patients", 40,
        "--image-size", 64, "--seed", 3)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def chexpert_runs(chexpert, tmp_path_factory, trained_run) -> dict[str, Path]:
    """One CheXpert-layout split, a run from scratch and one fine-tuned from an NIH run."""
    work = tmp_path_factory.mktemp("chexpert-runs")
    cli("data", "split", chexpert, "--out", work / "split", "--val-fraction", 0.2,
        "--test-fraction", 0.3)  # fmt: skip
    runs = {}
    for name, weights in (("scratch", "none"), ("tuned", trained_run)):
        runs[name] = work / name
        cli("train", chexpert, "--split", work / "split", "--out", runs[name], "--weights",
            weights, "--uncertain", "ones", *TINY)  # fmt: skip
    return runs


def test_chexpert_layout_trains_from_scratch_and_fine_tuned(chexpert_runs, trained_run):
    for name, run in chexpert_runs.items():
        meta = json.loads((run / "model.json").read_text())
        assert meta["labels"] == list(CHEXPERT_LABELS), name
        info = json.loads((run / "run.json").read_text())
        assert info["dataset"]["layout"] == "chexpert"
        assert json.loads((run / "config.json").read_text())["uncertain"] == "ones"
    init = json.loads((chexpert_runs["tuned"] / "run.json").read_text())["init"]
    assert init["init"] == "bundle" and init["file"] == str(trained_run)
    assert init["kept"]["Pleural Effusion"] == "Effusion" and "Fracture" in init["new"]


def test_chexpert_evaluate_and_report_score_known_labels_only(chexpert_runs):
    run = chexpert_runs["tuned"]
    cli("evaluate", run, "--workers", 0, "--device", "cpu")
    test = pd.read_csv(run / "split" / "test.csv", dtype=str, keep_default_na=False)
    probs = predicted(run, test["path"].tolist())
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    checked = 0
    for column, label in enumerate(CHEXPERT_LABELS):
        truth = truth_of(test, label)
        known = ~np.isnan(truth)
        value = metrics["per_class"][label]["auroc"]
        if len(set(truth[known])) < 2:
            assert value is None, label
            continue
        assert value == pytest.approx(roc_auc_score(truth[known], probs[known, column]), abs=1e-4)
        checked += 1
    assert checked >= 3
    out = cli("report", run, "--workers", 0, "--device", "cpu", "--resamples", 50)
    assert "report.html" in out
    html = (run / "report.html").read_text()
    assert "Pleural Effusion" in html and "Support Devices" in html


@pytest.fixture(scope="module")
def mimic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mimic") / "data"
    cli("data", "synth", "--out", out, "--layout", "mimic", "--patients", 40, "--image-size", 64,
        "--seed", 5)  # fmt: skip
    return out


def test_mimic_layout_end_to_end_on_its_official_split(mimic, tmp_path):
    cli("data", "split", mimic, "--official", "--out", tmp_path / "split")
    split = pd.read_csv(mimic / "mimic-cxr-2.0.0-split.csv.gz", dtype=str).set_index("dicom_id")
    test = pd.read_csv(tmp_path / "split" / "test.csv", dtype=str)
    assert set(split.loc[test["Image Index"].map(lambda p: Path(p).stem), "split"]) == {"test"}
    cli("train", mimic, "--split", tmp_path / "split", "--out", tmp_path / "run", "--weights",
        "none", *TINY)  # fmt: skip
    out = cli("evaluate", tmp_path / "run", "--workers", 0, "--device", "cpu")
    assert "Pleural Effusion" in out and "mean" in out


def test_a_chexpert_model_validated_on_mimic(chexpert_runs, mimic):
    run = chexpert_runs["scratch"]
    cli("evaluate", run, "--data", mimic, "--split", "all", "--name", "mimic", "--workers", 0,
        "--device", "cpu")  # fmt: skip
    result = json.loads((run / "metrics.json").read_text())["external"]["mimic"]
    assert result["layout"] == "mimic" and result["dropped"] == []
    table = pd.read_csv(run / "external" / "mimic" / "predictions.csv", dtype=str)
    meta = pd.read_csv(mimic / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str)
    frontal = meta[meta["ViewPosition"].isin(["PA", "AP"])]
    assert len(table) <= len(frontal) and len(table) == result["images"]
    files = [str(mimic / name) for name in table["Image Index"]]
    probs = predicted(run, files)
    labels = pd.read_csv(mimic / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str)
    studies = table["Image Index"].str.extract(r"/s(\d+)/")[0]
    by_study = labels.set_index("study_id").loc[studies].reset_index()
    for column, label in enumerate(CHEXPERT_LABELS):
        truth = truth_of(by_study, label)
        known = ~np.isnan(truth)
        value = result["per_class"][label]["auroc"]
        if len(set(truth[known])) == 2:
            expected = roc_auc_score(truth[known], probs[known, column])
            assert value == pytest.approx(expected, abs=1e-4), label


def test_an_nih_model_validated_on_chexpert_through_the_name_map(trained_run, chexpert, tmp_path):
    # A copy: the shared trained run must not gain an external result or a report.
    trained_run = Path(shutil.copytree(trained_run, tmp_path / "nih-run"))
    cli("evaluate", trained_run, "--data", chexpert, "--split", "test", "--name", "chexpert",
        "--workers", 0, "--device", "cpu")  # fmt: skip
    result = json.loads((trained_run / "metrics.json").read_text())["external"]["chexpert"]
    assert result["label_map"]["Pleural Effusion"] == ["Effusion"]
    assert result["label_map"]["Lung Lesion"] == ["Mass", "Nodule"]
    assert {"No Finding", "Fracture", "Support Devices", "Lung Opacity"} <= set(result["dropped"])
    valid = pd.read_csv(chexpert / "CheXpert-v1.0-small" / "valid.csv", dtype=str)
    valid = valid[valid["Frontal/Lateral"] == "Frontal"].reset_index(drop=True)
    assert result["images"] == len(valid)
    probs = predicted(trained_run, [str(chexpert / p) for p in valid["Path"]])
    from cxr.labels import PATHOLOGIES

    lesion = probs[:, [PATHOLOGIES.index("Mass"), PATHOLOGIES.index("Nodule")]].max(axis=1)
    truth = truth_of(valid, "Lung Lesion")
    known = ~np.isnan(truth)
    if len(set(truth[known])) == 2:
        expected = roc_auc_score(truth[known], lesion[known])
        assert result["per_class"]["Lung Lesion"]["auroc"] == pytest.approx(expected, abs=1e-4)
    report = cli("report", trained_run, "--workers", 0, "--device", "cpu", "--resamples", 50)
    assert "report.html" in report
    assert "External validation" in (trained_run / "report.html").read_text()


def test_generic_table_of_real_nih_pngs_end_to_end(tmp_path, sample_csv, sample_images):
    nih = pd.read_csv(sample_csv).head(60)
    rows = []
    for _, row in nih.iterrows():
        relative = Path("hospital") / f"p{row['Patient ID']}" / f"{row['Image Index'][9:12]}.png"
        (tmp_path / "data" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / relative).symlink_to(sample_images / row["Image Index"])
        found = row["Finding Labels"].split("|")
        rows.append({"image": str(relative), "patient": f"P{row['Patient ID']}",
                     "Effusion": int("Effusion" in found),
                     "Infiltration": int("Infiltration" in found)})  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "labels.csv", index=False)
    table = ["--image-col", "image", "--patient-col", "patient"]
    stats = json.loads(cli("data", "stats", tmp_path / "data" / "labels.csv", *table, "--json"))
    assert stats["images"] == 60 and stats["labels"]["Effusion"]["positive"] == sum(
        r["Effusion"] for r in rows
    )
    cli("data", "split", tmp_path / "data" / "labels.csv", *table, "--out", tmp_path / "split")
    cli("train", tmp_path / "data" / "labels.csv", *table, "--split", tmp_path / "split",
        "--out", tmp_path / "run", "--weights", "none", *TINY)  # fmt: skip
    cli("evaluate", tmp_path / "run", "--workers", 0, "--device", "cpu")
    assert json.loads((tmp_path / "run" / "model.json").read_text())["labels"] == [
        "Effusion",
        "Infiltration",
    ]
    predictions = pd.read_csv(tmp_path / "run" / "predictions-test.csv")
    test = pd.read_csv(tmp_path / "run" / "split" / "test.csv")
    probs = predicted(tmp_path / "run", test["path"].tolist())
    assert np.allclose(predictions[["prob_Effusion", "prob_Infiltration"]], probs, atol=1e-4)
    out = cli("predict", tmp_path / "run", test["path"].iloc[0], "--backend", "torch")
    assert "Effusion" in out or "Infiltration" in out


def test_an_nih_model_scored_against_google2019_expert_labels(tmp_path, shared_data):
    from cxr.config import TrainConfig
    from cxr.data.datasets import read_dataset
    from cxr.labels import PATHOLOGIES
    from cxr.workflows.train import prepare_run

    nih_dir = shared_data / "nih"
    expert = pd.read_csv(nih_dir / "metadata" / "google2019_nih-chest-xray-labels.csv.gz")
    table = read_dataset(nih_dir, drop_missing=True).table
    labelled = table["Image Index"].isin(expert["Image Index"])
    test = table[labelled]
    rest = table[~labelled & ~table["Patient ID"].isin(test["Patient ID"])]
    frames = {"train": rest.iloc[:100], "val": rest.iloc[100:150], "test": test}
    run = tmp_path / "run"
    prepare_run(run, frames, TrainConfig(weights="none"), data_source=str(nih_dir),
                split_note={"method": "test"})  # fmt: skip
    untrained_bundle(run, 32)
    cli("evaluate", run, "--labels", "google2019", "--workers", 0, "--device", "cpu")
    result = json.loads((run / "metrics.json").read_text())["external"]["google2019"]
    assert result["images"] == len(test) and result["dropped"] == ["Fracture"]
    probs = predicted(run, test["path"].tolist())
    opacity = ["Atelectasis", "Consolidation", "Infiltration", "Pneumonia", "Edema"]
    scores = {
        "Pneumothorax": probs[:, PATHOLOGIES.index("Pneumothorax")],
        "Nodule or mass": probs[:, [PATHOLOGIES.index(n) for n in ("Nodule", "Mass")]].max(1),
        "Airspace opacity": probs[:, [PATHOLOGIES.index(n) for n in opacity]].max(1),
    }
    by_image = expert.set_index("Image Index").loc[test["Image Index"]]
    for label, score in scores.items():
        truth = (by_image[label] == "YES").to_numpy().astype(int)
        value = result["per_class"][label]["auroc"]
        if len(set(truth)) == 2:
            assert value == pytest.approx(roc_auc_score(truth, score), abs=1e-4), label
        else:
            assert value is None, label


def test_a_chexpert_table_without_paths_is_evaluated_like_the_split(chexpert_runs, tmp_path):
    run = chexpert_runs["scratch"]
    cli("evaluate", run, "--workers", 0, "--device", "cpu")
    test = pd.read_csv(run / "split" / "test.csv", dtype=str, keep_default_na=False)
    test.drop(columns=["path"]).to_csv(tmp_path / "held-out.csv", index=False)
    cli("evaluate", run, "--split", tmp_path / "held-out.csv", "--workers", 0, "--device", "cpu")
    metrics = json.loads((run / "metrics.json").read_text())
    (name,) = [key for key in metrics if key.startswith("split-held-out-")]
    assert metrics[name]["auroc_mean"] == pytest.approx(metrics["test"]["auroc_mean"])
