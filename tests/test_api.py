"""The Python face (``import cxr``): the same numbers as the CLI, typed values, checked
against references that are not cxr's own code (pandas on the raw table, scikit-learn)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import cxr
from cxr.cli import app
from cxr.labels import PATHOLOGIES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def api_run(tmp_path_factory, trained_run) -> cxr.Run:
    """A copy of the session's tiny trained run (32 px, 2 epochs), evaluated through the API.
    (Training through the API is compared with ``cxr train`` in the slow test below.)"""
    import shutil

    run = cxr.Run(shutil.copytree(trained_run, tmp_path_factory.mktemp("api") / "run"))
    run.evaluate("test", device="cpu", workers=0)
    return run


# ---------------------------------------------------------------------------- the face


def test_every_exported_name_resolves_and_import_is_lazy():
    for name in cxr.__all__:
        assert getattr(cxr, name) is not None, name
    code = (
        "import sys, cxr; cxr.open_dataset; cxr.Run; cxr.load_model; "
        "print(sorted(m for m in ('torch', 'captum', 'onnx', 'matplotlib', 'fastapi') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import sys, cxr; print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "False"  # `import cxr` alone loads no PyTorch
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert "captum" not in loaded.stdout and "fastapi" not in loaded.stdout
    with pytest.raises(AttributeError):
        cxr.no_such_thing  # noqa: B018


# ---------------------------------------------------------------------------- datasets


def test_open_dataset_reads_nih_as_the_raw_table_says(mini_nih, sample_csv):
    ds = cxr.open_dataset(mini_nih)
    raw = pd.read_csv(sample_csv)
    assert isinstance(ds, cxr.Dataset) and ds.layout == "nih"
    assert ds.labels == PATHOLOGIES and len(ds) == len(raw)
    assert ds.patients == raw["Patient ID"].nunique() and ds.has_images
    by_name = ds.table.set_index("Image Index")
    for _, row in raw.iterrows():
        findings = set(row["Finding Labels"].split("|")) - {"No Finding"}
        called = {name for name in PATHOLOGIES if by_name.loc[row["Image Index"], name] == 1}
        assert called == findings
        assert Path(by_name.loc[row["Image Index"], "path"]).is_file()
    counts = ds.label_counts()
    for name in PATHOLOGIES:
        expected = raw["Finding Labels"].str.split("|").apply(lambda v, n=name: n in v).sum()
        assert counts.loc[name, "positive"] == expected


def test_open_dataset_generic_table_with_options(tmp_path, sample_images):
    names = sorted(p.name for p in sample_images.iterdir())[:6]
    table = pd.DataFrame(
        {
            "file": names,
            "subject": ["a", "a", "b", "c", "c", "d"],
            "Opacity": [1, 0, "", 1, -1, 0],
        }
    )
    table.to_csv(tmp_path / "mine.csv", index=False)
    ds = cxr.open_dataset(
        tmp_path / "mine.csv", image_col="file", patient_col="subject", labels=["Opacity"],
        image_root=sample_images,
    )  # fmt: skip
    assert ds.layout == "generic" and ds.labels == ("Opacity",) and ds.patients == 4
    values = ds.table["Opacity"].to_numpy()
    np.testing.assert_array_equal(values, [1, 0, np.nan, 1, -1, 0])
    counts = ds.label_counts().loc["Opacity"]
    assert (counts["positive"], counts["negative"], counts["uncertain"], counts["blank"]) == (
        2, 2, 1, 1,
    )  # fmt: skip


def test_dataset_split_and_subset_keep_patients_apart(synth_data):
    ds = cxr.open_dataset(synth_data)
    split = ds.split(val_patients=3, test_patients=4, seed=1)
    sets = [set(f["Patient ID"]) for f in split.frames().values()]
    assert len(sets[1]) == 3 and len(sets[2]) == 4
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(map(len, split.frames().values())) == len(ds)
    pa = ds.subset(ds.table["View Position"] == "PA")
    assert len(pa) == int((ds.table["View Position"] == "PA").sum()) and len(pa) < len(ds)
    with pytest.raises(cxr.errors.DataError, match="no image"):
        ds.subset(ds.table["Patient ID"] == "nobody")


def test_official_split_is_the_dataset_lists(synth_data):
    ds = cxr.open_dataset(synth_data)
    split = ds.split(official=True, val_patients=2)
    listed = set((synth_data / "test_list.txt").read_text().split())
    assert set(split.test["Image Index"]) == listed
    assert split.method == "official" and split.val["Patient ID"].nunique() == 2
    assert not set(split.val["Patient ID"]) & set(split.train["Patient ID"])
    with pytest.raises(cxr.errors.DataError, match="own test set"):
        ds.split(official=True, test_patients=3)


def test_open_dataset_errors_are_typed(tmp_path):
    with pytest.raises(cxr.errors.DataError, match="no such file"):
        cxr.open_dataset(tmp_path / "missing")


# ---------------------------------------------------------------------------- runs


def test_evaluation_equals_metrics_json_and_scikit_learn(api_run: cxr.Run):
    ev = api_run.evaluation("test")
    stored = json.loads((api_run.path / "metrics.json").read_text())["test"]
    assert isinstance(ev, cxr.Evaluation) and ev.mean_auroc == stored["auroc_mean"]
    predictions = pd.read_csv(api_run.path / stored["predictions"])
    for name in ev.labels:
        truth = predictions[f"true_{name}"]
        known = truth.notna()
        if truth[known].nunique() < 2:
            assert ev.auroc[name] is None
            continue
        expected = roc_auc_score(truth[known], predictions[f"prob_{name}"][known])
        assert ev.auroc[name] == pytest.approx(expected, abs=1e-12)
        assert ev.thresholds[name] == stored["per_class"][name]["threshold"]
    frame = ev.to_frame()
    assert list(frame.index) == list(ev.labels)
    defined = frame.dropna(subset=["auroc"])
    assert (
        (defined["ci_low"] <= defined["auroc"]) & (defined["auroc"] <= defined["ci_high"])
    ).all()
    assert api_run.config.image_size == 32 and len(api_run.history) == 2


@pytest.mark.slow
def test_evaluation_intervals_are_the_reports(api_run: cxr.Run):
    before = api_run.evaluation("test").ci  # computed from the predictions file
    api_run.report("test")
    report = json.loads((api_run.path / "metrics.json").read_text())["test"]["report"]
    for name, (low, high) in before.items():
        expected = report["per_class"][name]["auroc_ci"]
        assert [low, high] == pytest.approx(expected) if low is not None else expected[0] is None


def test_evaluate_through_the_api_equals_the_cli(api_run: cxr.Run, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", str(api_run.path), "--split", "val"])
    assert result.exit_code == 0, result.output
    cli_metrics = json.loads((api_run.path / "metrics.json").read_text())["val"]
    ev = api_run.evaluate("val", device="cpu", workers=0)
    assert ev.mean_auroc == cli_metrics["auroc_mean"]
    assert ev.auroc == {n: v["auroc"] for n, v in cli_metrics["per_class"].items()}


PREDICT_BACKENDS = ["torch", pytest.param("onnx", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", PREDICT_BACKENDS)
def test_model_predict_equals_cxr_predict(api_run: cxr.Run, tmp_path, shared_data, backend):
    files = [
        shared_data / "misc" / "00000001_000.png",
        shared_data / "misc" / "16747_3_1.jpg",
        shared_data / "misc" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    ]
    out = tmp_path / f"{backend}.csv"
    args = ["predict", str(api_run.path), *map(str, files), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--backend", backend, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    cli = pd.read_csv(out)
    model = cxr.load_model(api_run.path, backend=backend, device="cpu")
    table = model.predict(files)
    assert list(table.columns) == list(cli.columns)
    assert list(table["file"]) == list(cli["file"])
    probs = [c for c in cli.columns if c.startswith("prob_")]
    np.testing.assert_allclose(table[probs].to_numpy(), cli[probs].to_numpy(), atol=1e-6)
    calls = [c for c in cli.columns if c.startswith("call_")]
    assert (table[calls].to_numpy() == cli[calls].to_numpy()).all()
    assert model.labels == list(api_run.labels) and model.image_size == 32


def test_model_predict_names_failed_files(api_run: cxr.Run, tmp_path, shared_data):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    good = shared_data / "misc" / "00000001_000.png"
    model = cxr.load_model(api_run.path, backend="torch", device="cpu")
    with pytest.raises(cxr.errors.ImageError, match=re.escape(str(bad))):
        model.predict([good, bad])
    table = model.predict([good, bad], on_error="skip")
    assert list(table["file"]) == [str(good)]


def test_model_explain_equals_cxr_explain(api_run: cxr.Run, tmp_path, shared_data):
    image = shared_data / "misc" / "00000001_000.png"
    out = tmp_path / "explained"
    result = CliRunner().invoke(
        app,
        ["explain", str(api_run.path), str(image), "--out", str(out), "--pathology", "Effusion",
         "--pathology", "Mass", "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    model = cxr.load_model(api_run.path, backend="torch", device="cpu")
    maps = model.explain(image, labels=["Effusion", "Mass"])
    assert set(maps) == {"Effusion", "Mass"}
    for name, array in maps.items():
        expected = np.load(out / image.stem / f"{name}.npy")
        assert array.shape == expected.shape == (32, 32)
        np.testing.assert_allclose(array, expected, atol=1e-6)
    with pytest.raises(cxr.errors.CxrError, match="unknown label"):
        model.explain(image, labels=["Effusion", "Not a finding"])


@pytest.mark.slow
def test_external_evaluation_equals_the_cli_and_scikit_learn(api_run: cxr.Run, tmp_path):
    from cxr.data.synthetic import write_synthetic_dataset

    other = tmp_path / "chexpert"
    write_synthetic_dataset(other, patients=12, image_size=64, seed=5, layout="chexpert")
    ev = api_run.evaluate_external(other, split="all", name="api", device="cpu", workers=0)
    args = ["evaluate", str(api_run.path), "--data", str(other), "--split", "all"]
    result = CliRunner().invoke(app, [*args, "--name", "cli", "--workers", "0"])
    assert result.exit_code == 0, result.output
    cli = json.loads((api_run.path / "metrics.json").read_text())["external"]["cli"]
    assert isinstance(ev, cxr.ExternalEvaluation) and ev.layout == "chexpert"
    assert ev.mean_auroc == cli["auroc_mean"] and ev.images == cli["images"]
    assert ev.auroc == {n: v["auroc"] for n, v in cli["per_class"].items()}
    predictions = pd.read_csv(ev.predictions_file)
    scored = [n for n, v in ev.auroc.items() if v is not None]
    assert scored
    for name in scored:
        truth = predictions[f"true_{name}"]
        known = truth.notna()
        expected = roc_auc_score(truth[known], predictions[f"prob_{name}"][known])
        assert ev.auroc[name] == pytest.approx(expected, abs=1e-12)
    assert set(ev.to_frame().index) == set(ev.auroc)


def test_calibrate_from_python_is_stored_in_the_bundle(api_run: cxr.Run, tmp_path):
    import shutil

    run = cxr.Run(shutil.copytree(api_run.path, tmp_path / "copy"))
    calibration = run.calibrate(device="cpu")
    stored = json.loads((run.path / "model.json").read_text())
    assert isinstance(calibration, cxr.Calibration)
    assert calibration.temperature == pytest.approx(stored["temperature"])
    assert calibration.val_images == len(run.split("val"))
    assert calibration.thresholds == cxr.load_model(run.path, backend="torch").thresholds


def test_run_opens_only_run_folders(tmp_path):
    with pytest.raises(cxr.errors.DataError, match="no such run folder"):
        cxr.Run(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(cxr.errors.DataError, match="not a cxr run folder"):
        cxr.Run(tmp_path / "empty")


def test_train_refuses_unknown_options_before_any_work(synth_data, tmp_path):
    with pytest.raises(cxr.errors.ConfigError, match="no_such_option"):
        cxr.train(synth_data, tmp_path / "run", no_such_option=3)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_through_the_api_equals_cxr_train(synth_data, tmp_path):
    """Same data, seed and options: the API's run and the CLI's trained the same model."""
    options = dict(weights="none", image_size=32, batch_size=8, workers=0, device="cpu",
                   max_epochs=2, seed=3)  # fmt: skip
    api = cxr.train(cxr.open_dataset(synth_data), tmp_path / "api", **options)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    result = CliRunner().invoke(
        app, ["train", str(synth_data), "--out", str(tmp_path / "cli"), *flags]
    )
    assert result.exit_code == 0, result.output
    for name in ("train", "val", "test"):
        pd.testing.assert_frame_equal(
            pd.read_csv(api.path / "split" / f"{name}.csv").drop(columns=["path"]),
            pd.read_csv(tmp_path / "cli" / "split" / f"{name}.csv").drop(columns=["path"]),
        )
    columns = ["epoch", "train_loss", "val_loss", "val_auroc_mean"]
    pd.testing.assert_frame_equal(
        api.history[columns], pd.read_csv(tmp_path / "cli" / "log.csv")[columns]
    )


@pytest.mark.slow
def test_the_documented_example_runs(tmp_path):
    """docs/tutorials/python.md's first example, as a user would paste it."""
    text = (ROOT / "docs" / "tutorials" / "python.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    result = subprocess.run(
        [sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mean AUROC" in result.stdout
    assert (tmp_path / "runs" / "first" / "metrics.json").is_file()
