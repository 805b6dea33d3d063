"""``cxr export --onnx`` and the onnx backend: same probabilities as PyTorch on real images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import FIXED_CALL_THRESHOLDS
from safetensors.torch import load_file
from typer.testing import CliRunner

from cxr.cli import app
from cxr.data.files import find_images
from cxr.engine.inference import load_predictor, predict_files
from cxr.model.bundle import weights_digest
from cxr.model.onnx import ONNX_META_KEY, ONNX_WEIGHTS_KEY

THRESHOLDS = FIXED_CALL_THRESHOLDS


@pytest.fixture(scope="session")
def bundle(untrained_bundle) -> Path:
    return untrained_bundle


@pytest.fixture(scope="session")
def onnx_file(tmp_path_factory, bundle) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = CliRunner().invoke(app, ["export", str(bundle), "--onnx", str(out)])
    assert result.exit_code == 0, result.output
    assert "onnxruntime agrees with PyTorch" in result.stdout
    return out


@pytest.fixture(scope="session")
def real_files(shared_data) -> list[Path]:
    """All of misc/ (PNG 512 px, RGB JPEG, JPEG DICOM, small RGB/RGBA) and 3 NIH PNGs."""
    files, errors, _ = find_images([shared_data / "misc"])
    assert errors == []
    nih = shared_data / "nih" / "images"
    return [*files, nih / "00001369_000.png", nih / "00001933_000.png", nih / "00004296_000.png"]


def test_onnx_has_a_dynamic_batch_axis_and_the_bundle_description(onnx_file, bundle):
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == "image"
    assert image.shape[0] == "batch" and image.shape[1:] == [3, 64, 64]
    assert [o.name for o in session.get_outputs()] == ["logits", "features"]
    weights = load_file(str(bundle / "model.safetensors"))
    head_w, head_b = weights["classifier.weight"].numpy(), weights["classifier.bias"].numpy()
    generator = np.random.default_rng(0)
    for batch in (1, 5):
        images = generator.standard_normal((batch, 3, 64, 64)).astype(np.float32)
        logits, features = session.run(None, {"image": images})
        assert logits.shape == (batch, 14) and features.shape == (batch, 1024)
        # The features are what the classifier reads: its Linear layer maps them to the logits.
        np.testing.assert_allclose(features @ head_w.T + head_b, logits, rtol=0, atol=1e-4)
        assert (features >= 0).all()  # pooled after DenseNet's final ReLU
    custom = session.get_modelmeta().custom_metadata_map
    assert json.loads(custom[ONNX_META_KEY]) == json.loads((bundle / "model.json").read_text())
    assert custom[ONNX_WEIGHTS_KEY] == weights_digest(bundle / "model.safetensors")


def test_onnx_and_pytorch_agree_on_real_images(onnx_file, bundle, real_files):
    torch_predictor = load_predictor(bundle, backend="torch", device="cpu")
    onnx_predictor = load_predictor(onnx_file, backend="onnx")
    assert onnx_predictor.backend == "onnx" and onnx_predictor.thresholds == THRESHOLDS
    expected = predict_files(torch_predictor, real_files, batch_size=4, workers=0)
    got = predict_files(onnx_predictor, real_files, batch_size=4, workers=0)
    assert got.files == expected.files == [str(p) for p in real_files]
    assert len(got.files) == 16 and got.errors == []
    difference = np.abs(got.probabilities - expected.probabilities).max()
    assert difference <= 1e-4
    assert (got.calls == expected.calls).all()


@pytest.mark.slow  # exports the model a second time (into the cache)
def test_auto_backend_uses_onnx_on_cpu_from_beside_the_weights_or_the_cache(
    tmp_path, bundle, onnx_file, real_files
):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    shutil.copy(onnx_file, copy / "model.onnx")
    cache = tmp_path / "cache"
    predictor = load_predictor(copy, backend="auto", device="cpu", cache_dir=cache)
    assert predictor.backend == "onnx"
    assert not cache.exists()  # model.onnx beside the weights was used, nothing exported
    assert predictor.torch_model is not None  # kept for Grad-CAM

    # Without model.onnx, the bundle is exported once into the cache and reused from there.
    (copy / "model.onnx").unlink()
    first = load_predictor(copy, backend="auto", device="cpu", cache_dir=cache)
    (cached,) = (cache / "onnx").iterdir()
    stamp = cached.stat().st_mtime_ns
    second = load_predictor(copy, backend="onnx", device="cpu", cache_dir=cache)
    assert cached.stat().st_mtime_ns == stamp
    torch_result = predict_files(
        load_predictor(copy, backend="torch", device="cpu"), real_files[:3], workers=0
    )
    for predictor in (first, second):
        result = predict_files(predictor, real_files[:3], workers=0)
        assert np.abs(result.probabilities - torch_result.probabilities).max() <= 1e-4


def test_cli_predict_with_the_onnx_backend(tmp_path, onnx_file, real_files):
    out = tmp_path / "p.csv"
    args = ["predict", str(onnx_file), *map(str, real_files[:2]), "--backend", "onnx"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 3


def test_export_errors(tmp_path, bundle, onnx_file):
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(bundle), "--onnx", str(tmp_path / "m.txt")])
    assert result.exit_code == 2
    assert f"{tmp_path / 'm.txt'}: the ONNX file name must end in .onnx" in result.stderr
    result = runner.invoke(app, ["export", str(tmp_path), "--onnx", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    assert "no model bundle here" in result.stderr
    result = runner.invoke(app, ["predict", str(onnx_file), str(onnx_file), "--backend", "torch"])
    assert result.exit_code == 2
    assert "an ONNX file runs on the onnx backend, not torch" in result.stderr
    assert "Traceback" not in result.output
