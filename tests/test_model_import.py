"""``cxr model import``: torchxrayvision models through xrv's own API and cache, CheXNet
checkpoints (arnoweng's and jrzech's formats), plain state dicts, the pickle refusal, and
everything after import (predict, explain, export, evaluate) on real NIH PNGs.

Models are built with torchxrayvision's and torchvision's own classes with seeded weights
(no pretrained weights can be downloaded here), saved in each format, and the reference
outputs are the library's own forward on images preprocessed with the library's own
functions (``xrv.utils.load_image``, ``XRayCenterCrop``, ``XRayResizer``; torchvision's
transforms for CheXNet).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchxrayvision as xrv
from torch import nn
from typer.testing import CliRunner

from cxr.cli import app

NAME = "densenet121-res224-all"


@pytest.fixture(scope="module")
def nih_images(shared_data) -> list[Path]:
    return sorted((shared_data / "nih" / "images").glob("*.png"))[:6]


def _xrv_input(path: Path, size: int) -> torch.Tensor:
    """torchxrayvision's documented preprocessing, with its own functions."""
    import torchvision

    img = xrv.utils.load_image(str(path))  # [-1024, 1024], one channel
    transform = torchvision.transforms.Compose(
        [xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(size)]
    )
    return torch.from_numpy(transform(img))


def _calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Running statistics from real images, so that the seeded model's outputs spread
    over (0, 1) instead of saturating at the [-1024, 1024] input scale."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()


@pytest.fixture(scope="module")
def xrv_home(tmp_path_factory, nih_images):
    """A home folder whose torchxrayvision cache holds a seeded DenseNet in xrv's own file
    format (a whole pickled ``xrv.models.DenseNet``), at the name xrv's loader looks for."""
    home = tmp_path_factory.mktemp("home")
    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None, num_classes=18)
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)
    batch = torch.stack([_xrv_input(p, 224) for p in nih_images])
    _calibrate_batchnorm(model, batch)
    url = xrv.models.model_urls[NAME]["weights_url"]
    cache = home / ".torchxrayvision" / "models_data"
    cache.mkdir(parents=True)
    torch.save(model, cache / Path(url).name)
    return home


@pytest.fixture
def at_home(xrv_home, monkeypatch):
    monkeypatch.setenv("HOME", str(xrv_home))
    return xrv_home


@pytest.fixture(scope="module")
def imported_xrv(xrv_home, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("xrv") / "bundle"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(xrv_home))
        result = CliRunner().invoke(app, ["model", "import", f"xrv:{NAME}", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _predicted(bundle: Path, images: list[Path], tmp_path: Path, backend: str) -> pd.DataFrame:
    out = tmp_path / f"pred-{backend}.csv"
    args = ["predict", str(bundle), *map(str, images), "--out", str(out), "--backend", backend]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    order = {Path(p).name: i for i, p in enumerate(images)}
    return frame.sort_values("file", key=lambda f: f.map(lambda p: order[Path(p).name]))


def _probability_columns(frame: pd.DataFrame, labels: list[str]) -> np.ndarray:
    return frame[[f"prob_{label}" for label in labels]].to_numpy()


def test_xrv_bundle_keeps_labels_preprocessing_and_op_threshs(imported_xrv):
    meta = json.loads((imported_xrv / "model.json").read_text())
    entry = xrv.models.model_urls[NAME]
    assert meta["labels"] == entry["labels"]
    np.testing.assert_allclose(meta["thresholds"], entry["op_threshs"], rtol=1e-6)
    assert meta["normalization"] == "xrv" and meta["channels"] == 1
    assert meta["resize_rule"] == "xrv" and meta["image_size"] == entry["input_resolution"]
    assert meta["architecture"] == "densenet121"
    assert meta["source"]["kind"] == "torchxrayvision"


@pytest.mark.slow
def test_cxr_predict_gives_torchxrayvisions_outputs(imported_xrv, at_home, nih_images, tmp_path):
    model = xrv.models.get_model(NAME)  # from the cache, as a user's own code would
    batch = torch.stack([_xrv_input(p, 224) for p in nih_images])
    with torch.no_grad():
        calibrated = model(batch).numpy()  # op_norm'd: 0.5 at each operating point
        model.op_threshs = None
        expected = torch.sigmoid(model(batch)).numpy()
    assert expected.std() > 0.05  # the seeded model's outputs are not saturated
    frame = _predicted(imported_xrv, nih_images, tmp_path, "torch")
    labels = xrv.models.model_urls[NAME]["labels"]
    got = _probability_columns(frame, labels)
    assert np.max(np.abs(got - expected)) <= 1e-4
    # cxr's calls at xrv's thresholds are xrv's calls: op_norm(p) >= 0.5 where p >= t.
    thresholds = np.array(xrv.models.model_urls[NAME]["op_threshs"])
    away = np.abs(expected - thresholds) > 1e-4
    assert np.array_equal((got >= thresholds)[away], (calibrated >= 0.5)[away])


@pytest.mark.slow
def test_xrv_bundle_onnx_backend_matches(imported_xrv, at_home, nih_images, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    torch_frame = _predicted(imported_xrv, nih_images[:3], tmp_path, "torch")
    onnx_frame = _predicted(imported_xrv, nih_images[:3], tmp_path, "onnx")
    labels = xrv.models.model_urls[NAME]["labels"]
    diff = _probability_columns(torch_frame, labels) - _probability_columns(onnx_frame, labels)
    assert np.max(np.abs(diff)) <= 1e-4


def test_missing_xrv_weights_name_the_cache_and_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["model", "import", f"xrv:{NAME}", "--out", str(out)])
    assert result.exit_code != 0
    url = xrv.models.model_urls[NAME]["weights_url"]
    text = " ".join(result.output.split())
    assert str(tmp_path / ".torchxrayvision" / "models_data" / Path(url).name) in text
    assert url in text and "wget" in text
    assert not out.exists()


def test_explain_on_an_imported_xrv_bundle_targets_its_last_dense_block(imported_xrv, nih_images):
    from cxr.engine.inference import load_predictor
    from cxr.explain.gradcam import gradcam

    predictor = load_predictor(imported_xrv, backend="torch", device="cpu")
    model = predictor.torch_model
    image = predictor.preprocess(
        np.asarray(__import__("PIL.Image").Image.open(nih_images[0]).convert("L"))
    )
    assert image.shape == (1, 224, 224)
    maps = gradcam(model, image[None], [10])
    # The reference: CAM from DenseNet's final feature map, ReLU(sum_k w_ck A_k), upsampled.
    with torch.no_grad():
        features = torch.relu(model.features(image[None]))
        cam = torch.relu(torch.einsum("k,bkhw->bhw", model.classifier.weight[10], features))
        cam = torch.nn.functional.interpolate(cam[None], (224, 224), mode="bilinear")[0, 0]
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    np.testing.assert_allclose(maps[0, 0], cam.numpy(), atol=1e-4)


# ------------------------------------------------------------------------------ CheXNet


ARNOWENG_LABELS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
]  # fmt: skip


def _chexnet_model() -> nn.Module:
    """arnoweng/CheXNet's model: torchvision's DenseNet121 with Linear + Sigmoid."""
    import torchvision

    torch.manual_seed(1)
    net = torchvision.models.densenet121(weights=None)
    net.classifier = nn.Sequential(nn.Linear(1024, 14), nn.Sigmoid())
    with torch.no_grad():
        net.classifier[0].weight.mul_(5.0)
    return net.eval()


def _old_key(key: str) -> str:
    """torchvision 0.2's DenseNet names (what arnoweng's checkpoint holds): norm1 -> norm.1."""
    import re

    return re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)


def _torchvision_input(path: Path, resize: int) -> torch.Tensor:
    """CheXNet's transforms (torchvision): resize, centre crop 224, ImageNet mean/std."""
    from PIL import Image
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    return transform(Image.open(path).convert("L").convert("RGB"))


@pytest.mark.slow
def test_arnoweng_checkpoint_imports_and_predicts_like_chexnet(tmp_path, nih_images):
    net = _chexnet_model()
    state = {f"module.densenet121.{_old_key(k)}": v for k, v in net.state_dict().items()}
    assert any(".norm.1." in k for k in state)
    checkpoint = tmp_path / "model.pth.tar"
    torch.save({"epoch": 10, "state_dict": state, "best_loss": torch.tensor(0.15)}, checkpoint)
    out = tmp_path / "chexnet"
    result = CliRunner().invoke(app, ["model", "import", str(checkpoint), "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "model.json").read_text())
    assert meta["labels"] == ARNOWENG_LABELS and meta["resize_to"] == 256
    frame = _predicted(out, nih_images[:3], tmp_path, "torch")
    batch = torch.stack([_torchvision_input(p, 256) for p in nih_images[:3]])
    with torch.no_grad():
        expected = net(batch).numpy()  # CheXNet's own Sigmoid output
    got = _probability_columns(frame, ARNOWENG_LABELS)
    # PIL resizes the grey image here and the RGB copy there: the same bilinear filter.
    assert np.max(np.abs(got - expected)) <= 1e-3


def test_a_pickled_checkpoint_is_refused_and_nothing_in_it_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    checkpoint = tmp_path / "checkpoint"
    torch.save({"model": _chexnet_model(), "trap": Payload(), "epoch": 3}, checkpoint)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["model", "import", str(checkpoint), "--out", str(out)])
    assert result.exit_code != 0
    text = " ".join(result.output.split())
    assert "pickle" in text and "run any code" in text and "--trust-pickle" in text
    assert not marker.exists() and not out.exists()


@pytest.mark.slow
def test_jrzech_checkpoint_imports_with_trust_pickle(tmp_path, nih_images):
    net = _chexnet_model()
    checkpoint = tmp_path / "checkpoint"
    torch.save({"model": net, "best_loss": 0.2, "epoch": 4, "LR": 0.001}, checkpoint)
    out = tmp_path / "bundle"
    args = ["model", "import", str(checkpoint), "--out", str(out), "--trust-pickle"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    frame = _predicted(out, nih_images[:2], tmp_path, "torch")
    batch = torch.stack([_torchvision_input(p, 224) for p in nih_images[:2]])
    with torch.no_grad():
        expected = net(batch).numpy()
    assert np.max(np.abs(_probability_columns(frame, ARNOWENG_LABELS) - expected)) <= 1e-3


def test_plain_state_dict_with_arch_and_labels(tmp_path, nih_images):
    import torchvision

    torch.manual_seed(2)
    net = torchvision.models.densenet121(weights=None, num_classes=3).eval()
    weights = tmp_path / "weights.pt"
    torch.save(net.state_dict(), weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("Effusion\nCardiomegaly\nPneumothorax\n")
    out = tmp_path / "bundle"
    args = ["model", "import", str(weights), "--arch", "densenet121", "--labels", str(labels)]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = _predicted(out, nih_images[:2], tmp_path, "torch")
    batch = torch.stack([_torchvision_input(p, 224) for p in nih_images[:2]])
    with torch.no_grad():
        expected = torch.sigmoid(net(batch)).numpy()
    got = _probability_columns(frame, ["Effusion", "Cardiomegaly", "Pneumothorax"])
    assert np.max(np.abs(got - expected)) <= 1e-3


def test_wrong_label_count_is_refused(tmp_path):
    import torchvision

    weights = tmp_path / "weights.pt"
    torch.save(torchvision.models.densenet121(weights=None, num_classes=3).state_dict(), weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("Effusion\nCardiomegaly\n")
    args = ["model", "import", str(weights), "--labels", str(labels), "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "3 outputs but 2 labels" in " ".join(result.output.split())


@pytest.mark.slow
def test_the_service_answers_torchxrayvisions_outputs(imported_xrv, at_home, nih_images):
    from fastapi.testclient import TestClient

    from cxr.serve.app import create_app

    client = TestClient(create_app(imported_xrv, backend="torch", device="cpu"))
    path = nih_images[0]
    files = {"file": (path.name, path.read_bytes(), "application/octet-stream")}
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    labels = xrv.models.model_urls[NAME]["labels"]
    model = xrv.models.get_model(NAME)
    model.op_threshs = None
    with torch.no_grad():
        expected = torch.sigmoid(model(_xrv_input(path, 224)[None]))[0].numpy()
    got = np.array([body["probabilities"][label] for label in labels])
    assert np.max(np.abs(got - expected)) <= 1e-4


@pytest.mark.slow
def test_the_dicom_node_reports_torchxrayvisions_outputs(imported_xrv, at_home, tmp_path):
    """`cxr dicom listen`'s node on an imported bundle: dcmtk's storescu sends a radiograph
    made from a real NIH PNG; the SR report's probabilities are torchxrayvision's own
    forward on the pixels pydicom decodes."""
    import subprocess

    import pydicom
    from conftest import reference_gray
    from dicom_support import dcmtk, nih_gray, report_findings
    from support.media import radiograph_dicom
    from test_dicom_node import Sink

    from cxr.dicom.forward import Destination
    from cxr.dicom.listen import build_node
    from cxr.dicom.node import NodeOptions

    image = tmp_path / "image.dcm"
    image.write_bytes(radiograph_dicom(nih_gray(1)))
    gray = reference_gray(image).astype(np.float32)
    pixels = xrv.datasets.normalize(gray, 255)[None]  # what xrv.utils.load_image does
    transform = __import__("torchvision").transforms.Compose(
        [xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)]
    )
    model = xrv.models.get_model(NAME)
    model.op_threshs = None
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(transform(pixels))[None]))[0].numpy()

    sink = Sink()
    node = build_node(
        imported_xrv,
        Destination("127.0.0.1", sink.port, "SINK"),
        NodeOptions(port=0, allowed_ae=("PACS",), workers=1),
        spool=tmp_path / "spool",
        db=str(tmp_path / "results.sqlite"),
    ).start()
    try:
        command = [dcmtk("storescu"), "-aet", "PACS", "-aec", "CXR", "-ta", "30", "-ts", "30"]
        sent = subprocess.run(
            [*command, "127.0.0.1", str(node.address[1]), str(image)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        assert node.wait(lambda: node.counts.sent >= 1, 120)  # a hang guard, not a timing
        (report,) = sink.reports()
    finally:
        node.stop()
        node.store.close()
        sink.stop()
    labels = xrv.models.model_urls[NAME]["labels"]
    findings = report_findings(report)
    assert list(findings) == labels
    got = np.array([findings[label]["probability"] for label in labels])
    assert np.max(np.abs(got - expected)) <= 1e-4
    thresholds = xrv.models.model_urls[NAME]["op_threshs"]
    assert [findings[label]["threshold"] for label in labels] == pytest.approx(thresholds)
    assert report.PatientID == pydicom.dcmread(image).PatientID
