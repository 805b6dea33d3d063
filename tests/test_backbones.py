"""timm backbones: the registry's view of each architecture against timm's own forward,
Grad-CAM's target layer per family, training with ``--arch``, ONNX export, and importing
torchxrayvision's ResNet50."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from cxr.cli import app
from cxr.model.registry import ARCHITECTURES, WithFeatures, build

TIMM_ARCHS = [name for name, arch in ARCHITECTURES.items() if arch.timm_name]
FAST = ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224"]


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in TIMM_ARCHS]
)
def test_registry_reads_each_model_as_timm_runs_it(name):
    torch.manual_seed(0)
    model = build(name, 5, image_size=64).eval()
    size = {"img_size": 64} if ARCHITECTURES[name].family == "timm-vit" else {}
    reference = timm.create_model(
        ARCHITECTURES[name].timm_name, num_classes=5, **ARCHITECTURES[name].timm_args, **size
    )
    reference.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, features = WithFeatures(model)(images)
        expected = reference.eval()(images)
        pooled = reference.forward_head(reference.forward_features(images), pre_logits=True)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(features, pooled, atol=1e-5, rtol=1e-4)


def test_gradcam_on_a_timm_cnn_is_its_class_activation_map():
    # ResNet's head is global average pool + fc, so Grad-CAM on the last stage equals CAM.
    from cxr.explain.gradcam import gradcam

    torch.manual_seed(1)
    model = build("resnet18", 3).eval()
    images = torch.randn(1, 3, 128, 128)
    maps = gradcam(model, images, [2])
    with torch.no_grad():
        stage = model.forward_features(images)
        cam = torch.relu(torch.einsum("k,bkhw->bhw", model.fc.weight[2], stage))
        cam = torch.nn.functional.interpolate(cam[None], (128, 128), mode="bilinear")[0, 0]
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    np.testing.assert_allclose(maps[0, 0], cam.numpy(), atol=1e-4)


def test_gradcam_on_a_vit_reads_the_patch_grid():
    # The map is the final patch tokens on their 16 px grid: a patch whose tokens are
    # changed must change the map there (and a flat image gives a finite map).
    from cxr.explain.gradcam import gradcam_with_logits

    torch.manual_seed(2)
    model = build("vit_tiny_patch16_224", 2, image_size=64).eval()
    images = torch.randn(1, 3, 64, 64)
    maps, logits = gradcam_with_logits(model, images, [0, 1])
    assert maps.shape == (1, 2, 64, 64) and np.isfinite(maps).all()
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(images), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="convolutional"):
        gradcam_with_logits(model, images, [0], shifts=2)


@pytest.mark.parametrize(
    "name", ["resnet18", pytest.param("vit_tiny_patch16_224", marks=pytest.mark.slow)]
)
@pytest.mark.slow
def test_train_with_arch_records_it_and_exports(name, synth_data, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(synth_data), "--out", str(run), "--arch", name, "--weights", "none",
            "--image-size", "32" if name == "resnet18" else "64", "--max-epochs", "1",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--no-amp"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((run / "model.json").read_text())
    assert meta["architecture"] == name
    onnx = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["export", str(run), "--onnx", str(onnx)])
    assert result.exit_code == 0, result.output
    assert onnx.is_file()


def test_unknown_arch_is_refused_before_any_work(synth_data, tmp_path):
    args = ["train", str(synth_data), "--out", str(tmp_path / "run"), "--arch", "alexnet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "unknown architecture 'alexnet'" in " ".join(
        result.output.split()
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_xrv_resnet50_imports_and_matches_torchxrayvision(tmp_path, monkeypatch, shared_data):
    import torchvision
    import torchxrayvision as xrv

    name = "resnet50-res512-all"
    torch.manual_seed(3)
    inner = torchvision.models.resnet50(num_classes=18, weights=None)
    inner.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    with torch.no_grad():
        inner.fc.weight.mul_(0.05)
    images = sorted((shared_data / "nih" / "images").glob("*.png"))[:2]
    transform = torchvision.transforms.Compose(
        [xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(512)]
    )
    batch = torch.stack([torch.from_numpy(transform(xrv.utils.load_image(str(p)))) for p in images])
    inner.eval()
    cache = tmp_path / ".torchxrayvision" / "models_data"
    cache.mkdir(parents=True)
    url = xrv.models.model_urls[name]["weights_url"]
    torch.save(inner.state_dict(), cache / Path(url).name)  # xrv's ResNet file: a state dict
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["model", "import", f"xrv:{name}", "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "model.json").read_text())
    assert meta["architecture"] == "resnet50" and meta["image_size"] == 512
    # NaN operating points (two labels) fall back to 0.5.
    assert meta["thresholds"][14] == 0.5 and meta["source"]["no_operating_point"]
    model = xrv.models.get_model(name)
    model.op_threshs = None
    with torch.no_grad():
        expected = torch.sigmoid(model(batch)).numpy()
    from cxr.engine.inference import load_predictor

    predictor = load_predictor(out, backend="torch", device="cpu")
    from cxr.data.images import decode_gray

    ours = torch.stack([predictor.preprocess(decode_gray(p)) for p in images])
    assert np.max(np.abs(predictor.probabilities(ours) - expected)) <= 1e-4
