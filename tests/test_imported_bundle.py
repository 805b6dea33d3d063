"""``cxr thresholds``, ``cxr calibrate`` and ``cxr report`` on an imported bundle with
``--data LABELLED``: the labelled set becomes the bundle's validation or test split.

The bundle is a seeded torchvision DenseNet121 imported from a plain state dict with four
outputs, one of which (Fracture) no NIH label answers. The labelled sets are halves of the
real NIH sample in ``../shared/data`` (by patient). The references: each image's truth read
from the NIH table with pandas, probabilities from ``cxr predict`` (whose parity with the
library's own forward tests/test_model_import.py proves), Youden's J counted by hand over
every cut, the temperature found by SciPy over the NLL written out here, and the AUROCs of
scikit-learn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import minimize_scalar
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from cxr.cli import app

OUTPUTS = ["Effusion", "Infiltration", "Atelectasis", "Fracture"]
NIH_LABELLED = OUTPUTS[:3]


def _nih_folder(root: Path, table: pd.DataFrame, images: Path) -> Path:
    """NIH's archive layout holding ``table``'s rows; the images are the real ones (linked)."""
    root.mkdir(parents=True)
    table.to_csv(root / "Data_Entry_2017.csv", index=False)
    (root / "images_001").mkdir()
    os.symlink(images, root / "images_001" / "images", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def halves(tmp_path_factory, sample_csv, sample_images) -> dict[str, Path]:
    """The NIH sample split by patient: even-indexed patients validate, odd ones test."""
    table = pd.read_csv(sample_csv)
    patients = sorted(table["Patient ID"].unique())
    root = tmp_path_factory.mktemp("labelled")
    return {
        name: _nih_folder(root / name, table[table["Patient ID"].isin(chosen)], sample_images)
        for name, chosen in (("val", patients[::2]), ("test", patients[1::2]))
    }


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, Path]:
    import torchvision

    torch.manual_seed(4)
    net = torchvision.models.densenet121(weights=None, num_classes=len(OUTPUTS))
    folder = tmp_path_factory.mktemp("weights")
    torch.save(net.state_dict(), folder / "weights.pt")
    (folder / "labels.txt").write_text("\n".join(OUTPUTS) + "\n")
    return folder / "weights.pt", folder / "labels.txt"


def _import(weights: tuple[Path, Path], out: Path) -> Path:
    args = ["model", "import", str(weights[0]), "--arch", "densenet121"]
    args += ["--labels", str(weights[1]), "--image-size", "64", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def _truth(folder: Path) -> tuple[list[str], np.ndarray]:
    """Image names and their NIH labels (1/0), read from the table with pandas."""
    table = pd.read_csv(folder / "Data_Entry_2017.csv")
    findings = table["Finding Labels"].str.split("|")
    truth = np.array([[label in f for label in NIH_LABELLED] for f in findings], dtype=float)
    return table["Image Index"].tolist(), truth


def _probabilities(bundle: Path, folder: Path, names: list[str], tmp_path: Path) -> np.ndarray:
    """``cxr predict``'s probabilities of the named images, in that order."""
    out = tmp_path / f"{folder.name}.csv"
    images = [str(folder / "images_001" / "images" / name) for name in names]
    _invoke("predict", str(bundle), *images, "--out", str(out), "--backend", "torch")
    frame = pd.read_csv(out)
    frame.index = frame["file"].map(lambda p: Path(p).name)
    return frame.loc[names, [f"prob_{label}" for label in OUTPUTS]].to_numpy()


def _youden(truth: np.ndarray, prob: np.ndarray, threshold: float) -> float:
    """Sensitivity + specificity - 1 of the call prob >= threshold."""
    called = prob >= threshold
    return called[truth == 1].mean() - called[truth == 0].mean()


def _reference_temperature(logits: np.ndarray, truth: np.ndarray) -> float:
    """The temperature minimising the mean binary cross-entropy of sigmoid(logit / T)."""

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        return float(np.mean(np.logaddexp(0, z) - truth * z))

    return float(np.exp(minimize_scalar(nll, bounds=(-5, 5), method="bounded").x))


@pytest.mark.slow
def test_thresholds_calibrate_and_report_fit_on_the_labelled_sets(weights, halves, tmp_path):
    bundle = _import(weights, tmp_path / "bundle")
    val_names, val_truth = _truth(halves["val"])
    val_prob = _probabilities(bundle, halves["val"], val_names, tmp_path)

    said = _invoke("thresholds", str(bundle), "--data", str(halves["val"]))
    assert "no label of the data answers Fracture" in said
    thresholds = json.loads((bundle / "model.json").read_text())["thresholds"]
    for c in range(len(NIH_LABELLED)):
        cuts = np.unique(val_prob[:, c])
        best = max(_youden(val_truth[:, c], val_prob[:, c], t) for t in cuts)
        assert _youden(val_truth[:, c], val_prob[:, c], thresholds[c]) == pytest.approx(best)
    assert thresholds[3] == 0.5  # Fracture: nothing to fit on, kept as imported

    _invoke("calibrate", str(bundle), "--data", str(halves["val"]))
    meta = json.loads((bundle / "model.json").read_text())
    logits = np.log(val_prob[:, :3] / (1 - val_prob[:, :3]))
    expected = _reference_temperature(logits, val_truth)
    assert meta["temperature"] == pytest.approx(expected, rel=1e-3)

    test_names, test_truth = _truth(halves["test"])
    test_prob = _probabilities(bundle, halves["test"], test_names, tmp_path)
    _invoke("report", str(bundle), "--data", str(halves["test"]), "--resamples", "50")
    assert (bundle / "report.html").stat().st_size > 0
    report = json.loads((bundle / "metrics.json").read_text())["test"]["report"]
    assert report["images"] == len(test_names)
    for c, label in enumerate(NIH_LABELLED):
        expected = roc_auc_score(test_truth[:, c], test_prob[:, c])
        assert report["per_class"][label]["auroc"] == pytest.approx(expected, abs=1e-9)
    assert report["per_class"]["Fracture"]["auroc"] is None
    html = (bundle / "report.html").read_text()
    assert "Trained outside cxr" in html and str(halves["test"]) in html


@pytest.fixture(scope="module")
def imported_once(weights, tmp_path_factory) -> Path:
    return _import(weights, tmp_path_factory.mktemp("imported") / "bundle")


@pytest.fixture
def bundle_once(imported_once, tmp_path) -> Path:
    """A fresh copy of an imported bundle, for the tests that run no model."""
    import shutil

    return Path(shutil.copytree(imported_once, tmp_path / "bundle"))


def _refused(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code != 0
    return " ".join(result.output.split())


def test_the_report_refuses_a_test_set_that_shares_images_with_the_validation_set(
    bundle_once, halves, tmp_path, sample_csv, sample_images
):
    from cxr.workflows.labelled import attach_labelled_data

    attach_labelled_data(bundle_once, "val", halves["val"])
    before = (bundle_once / "split" / "val.csv").read_bytes()
    everything = _nih_folder(tmp_path / "all", pd.read_csv(sample_csv), sample_images)
    said = _refused("report", str(bundle_once), "--data", str(everything))
    assert "shares" in said and "image(s) with the bundle's val split" in said
    assert not (bundle_once / "split" / "test.csv").exists()
    assert (bundle_once / "split" / "val.csv").read_bytes() == before


def test_a_patient_in_both_sets_is_refused(bundle_once, tmp_path, sample_csv, sample_images):
    from cxr.errors import DataError
    from cxr.workflows.labelled import attach_labelled_data

    table = pd.read_csv(sample_csv)
    twice = table[table["Patient ID"].duplicated(keep=False)]
    patient = twice["Patient ID"].iloc[0]
    first, second = twice.index[twice["Patient ID"] == patient][:2]
    others = table[~table["Patient ID"].isin(twice["Patient ID"])]
    val = _nih_folder(tmp_path / "v", pd.concat([table.loc[[first]], others[:20]]), sample_images)
    test = _nih_folder(
        tmp_path / "t", pd.concat([table.loc[[second]], others[20:40]]), sample_images
    )
    attach_labelled_data(bundle_once, "val", val)
    with pytest.raises(DataError, match=r"shares 1 patient\(s\)"):
        attach_labelled_data(bundle_once, "test", test)


def test_a_run_cxr_trained_keeps_its_own_splits(make_run, tmp_path, halves):
    run = make_run(tmp_path / "run")
    before = (run / "split" / "val.csv").read_bytes()
    said = _refused("thresholds", str(run), "--data", str(halves["val"]))
    assert "trained by cxr" in said and "cxr evaluate RUN --data OTHER" in said
    assert (run / "split" / "val.csv").read_bytes() == before


def test_the_labels_become_the_model_outputs(bundle_once, halves):
    """The split table holds the model's outputs, each with its NIH label's truth, and a
    blank where no label answers it."""
    from cxr.run import RunFolder
    from cxr.workflows.labelled import attach_labelled_data

    entry = attach_labelled_data(bundle_once, "val", halves["val"])
    assert entry["unlabelled_outputs"] == ["Fracture"]
    frame = RunFolder(bundle_once).read_split("val")
    names, truth = _truth(halves["val"])
    frame = frame.set_index("Image Index").loc[names]
    np.testing.assert_array_equal(frame[NIH_LABELLED].to_numpy(), truth)
    assert frame["Fracture"].isna().all()


@pytest.mark.slow
def test_the_python_api_fits_and_reports_on_the_labelled_sets(weights, halves, tmp_path):
    """``cxr.Run(bundle).fit_thresholds / .calibrate / .report`` with ``data=``: the same
    references as the CLI's (Youden's J by hand, SciPy's temperature, scikit-learn's AUROC)."""
    import cxr

    bundle = _import(weights, tmp_path / "bundle")
    val_names, val_truth = _truth(halves["val"])
    val_prob = _probabilities(bundle, halves["val"], val_names, tmp_path)
    run = cxr.Run(bundle)

    fitted = run.fit_thresholds(data=halves["val"], device="cpu")
    assert list(fitted) == OUTPUTS
    for c, label in enumerate(NIH_LABELLED):
        best = max(_youden(val_truth[:, c], val_prob[:, c], t) for t in np.unique(val_prob[:, c]))
        assert _youden(val_truth[:, c], val_prob[:, c], fitted[label]) == pytest.approx(best)
    assert fitted["Fracture"] == 0.5

    calibration = run.calibrate(data=halves["val"], device="cpu")
    logits = np.log(val_prob[:, :3] / (1 - val_prob[:, :3]))
    expected = _reference_temperature(logits, val_truth)
    assert calibration.temperature == pytest.approx(expected, rel=1e-3)

    test_names, test_truth = _truth(halves["test"])
    test_prob = _probabilities(bundle, halves["test"], test_names, tmp_path)
    html = run.report(data=halves["test"], resamples=50, device="cpu")
    assert html == bundle / "report.html" and html.stat().st_size > 0
    evaluation = cxr.Run(bundle).evaluation("test")
    for c, label in enumerate(NIH_LABELLED):
        expected = roc_auc_score(test_truth[:, c], test_prob[:, c])
        assert evaluation.auroc[label] == pytest.approx(expected, abs=1e-9)
