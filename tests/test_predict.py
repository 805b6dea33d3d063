"""``cxr predict`` and cxr.predict on real PNG, RGBA PNG, JPEG and DICOM files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FIXED_CALL_THRESHOLDS, reference_batch
from typer.testing import CliRunner

from cxr.cli import app
from cxr.data.files import FileError, find_images
from cxr.engine.inference import load_predictor, predict_files
from cxr.labels import PATHOLOGIES

DICOM_NAME = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
# The first 7 pathologies are always positive (p >= 0), the last 7 never (p < 1).
THRESHOLDS = FIXED_CALL_THRESHOLDS


@pytest.fixture(scope="session")
def bundle(untrained_bundle) -> Path:
    return untrained_bundle


@pytest.fixture(scope="session")
def predictor(bundle):
    return load_predictor(bundle, backend="torch", device="cpu")


@pytest.fixture(scope="session")
def real_files(shared_data) -> list[Path]:
    """One of each kind: 8-bit PNG, RGBA NIH PNG, RGB JPEG, JPEG-compressed DICOM, RGBA 64 px."""
    misc = shared_data / "misc"
    return [
        misc / "00000001_000.png",
        shared_data / "nih" / "images" / "00001369_000.png",
        misc / "16747_3_1.jpg",
        misc / DICOM_NAME,
        misc / "nih_downscaled" / "00000004_000.png",
    ]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def reference_probabilities(predictor, paths: list[Path]) -> np.ndarray:
    """The model on the files, decoded and preprocessed without cxr's code (conftest's
    reference: PIL / pydicom, shorter side to 64 px, centre crop, ImageNet mean/std)."""
    with torch.no_grad():
        logits = predictor.torch_model(reference_batch(paths, 64)).double()
    return torch.sigmoid(logits).numpy()


# ---------------------------------------------------------------------------- finding files


def test_find_images_recurses_skips_companions_and_sniffs_dicom(tmp_path, shared_data):
    misc = shared_data / "misc"
    files, errors, skipped = find_images([misc])
    names = sorted(f.name for f in files)
    assert errors == [] and skipped == []
    assert len(names) == 13  # 2 PNG + JPEG + DICOM + 9 downscaled PNGs; provenance.csv skipped
    assert DICOM_NAME in names and "16747_3_1.jpg" in names
    assert not any(n.endswith(".csv") for n in names)

    folder = tmp_path / "export"
    (folder / "series" / ".hidden").mkdir(parents=True)
    os.symlink(misc / DICOM_NAME, folder / "series" / "IM0001")  # PACS style: no extension
    (folder / "series" / "notes").write_text("not an image")
    (folder / "series" / ".hidden" / "a.png").write_bytes(b"x")
    (folder / "series" / ".DS_Store").write_bytes(b"x")
    files, errors, skipped = find_images([folder, folder / "series" / "IM0001"])  # twice
    assert [f.name for f in files] == ["IM0001"]
    assert errors == [] and skipped == []


def test_find_images_reports_missing_and_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    files, errors, skipped = find_images([tmp_path / "nope.png", tmp_path / "empty"])
    assert files == [] and skipped == []
    assert errors == [
        FileError(str(tmp_path / "nope.png"), "no such file or folder"),
        FileError(str(tmp_path / "empty"), "folder holds no PNG, JPEG or DICOM files"),
    ]


# ---------------------------------------------------------------------------- predicting


def test_predictions_match_the_model_and_bad_files_are_skipped(tmp_path, predictor, real_files):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes((real_files[0]).read_bytes()[:300])
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a JPEG")
    files = [real_files[0], corrupt, real_files[1], empty, *real_files[2:], text]
    seen_errors: list[FileError] = []
    progress: list[int] = []

    result = predict_files(
        predictor,
        files,
        batch_size=2,
        workers=1,
        on_error=seen_errors.append,
        on_progress=progress.append,
    )

    assert result.files == [str(p) for p in real_files]
    assert sum(progress) == len(files)
    assert [e.file for e in result.errors] == [str(corrupt), str(empty), str(text)]
    assert sorted(seen_errors, key=lambda e: e.file) == sorted(result.errors, key=lambda e: e.file)
    reasons = {Path(e.file).name: e.reason for e in result.errors}
    assert reasons["corrupt.png"].startswith("corrupt or truncated image")
    assert reasons["empty.dcm"] == "file is empty (0 bytes)"
    assert reasons["notes.jpg"] == "not a readable image (PNG, JPEG or DICOM expected)"

    expected = reference_probabilities(predictor, real_files)
    assert result.probabilities.shape == (5, 14)
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    assert result.calls[:, :7].all() and not result.calls[:, 7:].any()


def test_batching_and_workers_do_not_change_results(predictor, real_files):
    one = predict_files(predictor, real_files, batch_size=1, workers=0)
    many = predict_files(predictor, real_files, batch_size=16, workers=2)
    assert one.files == many.files
    np.testing.assert_allclose(one.probabilities, many.probabilities, atol=1e-6)


def test_table_and_json(tmp_path, predictor, real_files):
    result = predict_files(predictor, real_files[:2], workers=0)
    table = result.table()
    assert list(table.columns) == (
        ["file"] + [f"prob_{n}" for n in PATHOLOGIES] + [f"call_{n}" for n in PATHOLOGIES]
    )
    assert table[[f"call_{n}" for n in PATHOLOGIES[:7]]].to_numpy().tolist() == [[1] * 7] * 2
    result.write(tmp_path / "p.csv")
    assert pd.read_csv(tmp_path / "p.csv").shape == (2, 29)
    result.write(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["thresholds"]["Hernia"] == 1.0
    record = data["predictions"][0]
    assert record["file"] == str(real_files[0])
    assert record["positive"] == list(PATHOLOGIES[:7])
    assert record["calls"]["Atelectasis"] is True and record["calls"]["Hernia"] is False
    assert set(record["probabilities"]) == set(PATHOLOGIES)


# ---------------------------------------------------------------------------- the command


def test_cli_predict_reports_failures_and_exits_1(runner, tmp_path, bundle, real_files):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    out = tmp_path / "out.csv"
    args = ["predict", str(bundle), *map(str, real_files), str(bad), str(tmp_path / "gone.dcm")]
    result = runner.invoke(app, [*args, "--out", str(out), "--backend", "torch", "--workers", "1"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert f"error: {tmp_path / 'gone.dcm'}: no such file or folder" in result.stderr
    assert f"error: {bad}: not a readable image" in result.stderr
    assert "2 file(s) failed, 5 predicted" in result.stderr
    table = pd.read_csv(out)
    assert table["file"].tolist() == [str(p) for p in real_files]


def test_cli_predict_json_and_explain(runner, tmp_path, bundle, real_files):
    out = tmp_path / "out.json"
    explain = tmp_path / "cams"
    dicom = real_files[3]
    args = ["predict", str(bundle), str(dicom), "--out", str(out), "--explain", str(explain)]
    result = runner.invoke(app, [*args, "--backend", "torch", "--workers", "0"])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())["predictions"][0]
    assert record["file"] == str(dicom)
    # One overlay (and map) per positive call (the first 7 pathologies), named as
    # `cxr explain` names them: <image stem>/<Pathology>.png and .npy.
    folder = explain / dicom.stem
    assert [p.name for p in explain.iterdir()] == [dicom.stem]
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(
        f"{n}.png" for n in PATHOLOGIES[:7]
    )
    assert sorted(p.name for p in folder.glob("*.npy")) == sorted(
        f"{n}.npy" for n in PATHOLOGIES[:7]
    )
    assert record["overlays"][0].endswith(".png")
    assert (folder / "Atelectasis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_predict_prints_a_table_without_out(runner, bundle, real_files):
    args = ["predict", str(bundle), str(real_files[2]), "--backend", "torch", "--workers", "0"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "16747_3_1.jpg" in result.stdout
    assert "Atelectasis" in result.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--out", "x.txt"], "x.txt: --out must end in .csv or .json"),
        (["--backend", "tensorrt"], "unknown backend 'tensorrt'"),
    ],
)
def test_cli_predict_bad_options(runner, bundle, real_files, extra, message):
    result = runner.invoke(app, ["predict", str(bundle), str(real_files[0]), *extra])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_cli_predict_no_model_or_no_images(runner, tmp_path, bundle, real_files):
    result = runner.invoke(app, ["predict", str(tmp_path / "nomodel"), str(real_files[0])])
    assert result.exit_code == 2
    assert f"{tmp_path / 'nomodel'}: no such model" in result.stderr
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["predict", str(bundle), str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert "folder holds no PNG, JPEG or DICOM files" in result.stderr
    assert "no PNG, JPEG or DICOM files to predict" in result.stderr
