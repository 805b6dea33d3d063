"""The HTTP service through FastAPI's TestClient, with real PNG, JPEG and DICOM uploads."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXED_CALL_THRESHOLDS
from fastapi.testclient import TestClient
from PIL import Image
from support.media import png_claiming_size
from support.problems import problem_detail

from cxr.data.images import decode_gray
from cxr.engine.inference import load_predictor
from cxr.labels import PATHOLOGIES
from cxr.serve.app import create_app
from cxr.serve.limits import BodyLimit

DICOM_NAME = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
THRESHOLDS = FIXED_CALL_THRESHOLDS
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def bundle(untrained_bundle) -> Path:
    return untrained_bundle


@pytest.fixture(scope="module")
def predictor(bundle):
    return load_predictor(bundle, backend="torch", device="cpu")


@pytest.fixture(scope="module")
def client(bundle) -> TestClient:
    # The app loads the model itself, once, from the bundle path.
    return TestClient(create_app(bundle, backend="torch", device="cpu"))


@pytest.fixture(scope="module")
def small_client(predictor) -> TestClient:
    """Limits low enough for the real files: 100,000 bytes and 300,000 pixels."""
    return TestClient(create_app(predictor=predictor, max_upload_bytes=100_000, max_pixels=300_000))


def post(client, path: Path | bytes, name: str | None = None, url="/v1/predict", **form):
    data = path if isinstance(path, bytes) else path.read_bytes()
    name = name or (path.name if isinstance(path, Path) else "upload.bin")
    return client.post(url, files={"file": (name, data, "application/octet-stream")}, data=form)


def assert_no_server_paths(text: str, bundle: Path) -> None:
    for secret in (str(bundle), str(bundle.parent), str(REPO), "/tmp/", "site-packages"):
        assert secret not in text


# ---------------------------------------------------------------------------- predict


@pytest.mark.parametrize(
    ("relative", "size"),
    [
        ("nih/images/00001369_000.png", (1024, 1024)),  # an RGBA NIH PNG
        ("misc/16747_3_1.jpg", (1036, 885)),
        (f"misc/{DICOM_NAME}", (1024, 1024)),  # JPEG-compressed DICOM
    ],
)
def test_predict_png_jpeg_dicom(client, predictor, shared_data, relative, size):
    path = shared_data / relative
    response = post(client, path)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["file"] == path.name
    assert (body["width"], body["height"]) == size
    assert body["labels"] == list(PATHOLOGIES)
    assert body["thresholds"] == dict(zip(PATHOLOGIES, THRESHOLDS))
    assert body["positive"] == list(PATHOLOGIES[:7])
    assert body["calls"] == {n: i < 7 for i, n in enumerate(PATHOLOGIES)}
    expected = predictor.probabilities(predictor.preprocess(decode_gray(path))[None])[0]
    got = np.array([body["probabilities"][n] for n in PATHOLOGIES])
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_client_file_names_are_only_labels(client, shared_data, bundle):
    response = post(client, shared_data / "misc" / "16747_3_1.jpg", name="../../etc/passwd")
    assert response.status_code == 200
    assert response.json()["file"] == "passwd"
    response = post(client, b"GIF89a not really", name="C:\\Users\\x\\..\\secret.gif")
    assert response.status_code == 415
    assert response.json()["detail"] == "secret.gif: not a PNG, JPEG or DICOM image"


# ---------------------------------------------------------------------------- refusals


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "name", "detail"),
    [
        (b"%PDF-1.7 a document", "report.pdf", "report.pdf: not a PNG, JPEG or DICOM image"),
        (b"", "empty.png", "empty.png: empty (0 bytes)"),
        (gif_bytes(), "x.gif", "x.gif: not a PNG, JPEG or DICOM image"),
    ],
)
def test_non_images_get_415(client, bundle, data, name, detail):
    response = post(client, data, name=name)
    assert response.status_code == 415
    assert problem_detail(response) == detail


def dicom_without_pixels() -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # a structured report
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.Modality = "SR"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_undecodable_images_get_422(client, shared_data, bundle):
    truncated = (shared_data / "misc" / "00000001_000.png").read_bytes()[:5000]
    response = post(client, truncated, name="cut.png")
    assert response.status_code == 422
    assert response.json()["detail"].startswith("cut.png: corrupt or truncated image")
    response = post(client, dicom_without_pixels(), name="report.dcm")
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "report.dcm: DICOM has no pixel data (not an image object)"
    )
    assert_no_server_paths(response.text, bundle)


def test_uploads_over_the_size_limit_get_413(small_client, shared_data, bundle):
    # Over the request-body limit (file limit + form overhead): refused before parsing.
    response = post(small_client, shared_data / "misc" / "00000001_000.png")  # 182,547 bytes
    assert response.status_code == 413
    assert "request body is larger than the limit" in response.json()["detail"]
    # Within the form overhead but over the file limit: refused by the handler, named.
    response = post(small_client, shared_data / "misc" / DICOM_NAME)  # 127,290 bytes
    assert response.status_code == 413
    assert response.json()["detail"] == f"{DICOM_NAME}: upload is larger than the limit of 0.1 MiB"
    # Under the size limit: accepted (this one is then refused for its pixels, see below).
    response = post(small_client, shared_data / "misc" / "16747_3_1.jpg")  # 90,480 bytes
    assert response.status_code == 413 and "pixels" in response.json()["detail"]
    assert_no_server_paths(response.text, bundle)


def test_body_limit_counts_chunked_bodies_without_content_length():
    reached = []

    async def app(scope, receive, send):
        reached.append(await receive())

    async def run(chunks: list[bytes]):
        messages = [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)
        ]
        sent = []

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "headers": [], "path": "/v1/predict"}
        await BodyLimit(app, limit=10)(scope, receive, send)
        return sent

    sent = asyncio.run(run([b"123456", b"789012"]))
    assert sent[0]["status"] == 413 and reached == []
    sent = asyncio.run(run([b"12345", b"67890"]))
    assert sent == [] and reached == [
        {"type": "http.request", "body": b"1234567890", "more_body": False}
    ]


def test_images_over_the_pixel_limit_get_413(small_client, shared_data, bundle):
    response = post(small_client, shared_data / "misc" / "nih_downscaled" / "00000002_000.png")
    assert response.status_code == 200  # 128 x 128
    response = post(small_client, shared_data / "misc" / "16747_3_1.jpg")
    assert response.status_code == 413
    assert response.json()["detail"] == (
        "16747_3_1.jpg: image is 1036x885 pixels, more than the limit of 300,000"
    )
    response = post(small_client, png_claiming_size(600, 600), name="big.png")
    assert response.status_code == 413
    assert response.json()["detail"] == (
        "big.png: image is 600x600 pixels, more than the limit of 300,000"
    )
    response = post(small_client, png_claiming_size(100_000, 100_000), name="bomb.png")
    assert response.status_code == 413
    assert "bomb.png: image is" in response.json()["detail"]
    assert_no_server_paths(response.text, bundle)


# ---------------------------------------------------------------------------- explain


def test_explain_returns_an_overlay_png(client, shared_data):
    path = shared_data / "nih" / "images" / "00001369_000.png"
    response = post(client, path, url="/v1/explain", pathology="Cardiomegaly")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-pathology"] == "Cardiomegaly"
    assert 0.0 <= float(response.headers["x-probability"]) <= 1.0
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and min(image.size) > 64
    # By index, and case-insensitively.
    assert post(client, path, url="/v1/explain", pathology="1").status_code == 200
    assert post(client, path, url="/v1/explain", pathology="pleural_thickening").status_code == 200


def test_explain_refuses_unknown_pathologies(client, shared_data, bundle):
    path = shared_data / "misc" / "16747_3_1.jpg"
    response = post(client, path, url="/v1/explain", pathology="Covid")
    assert response.status_code == 422
    assert response.json()["detail"].startswith("unknown pathology 'Covid'; choose one of")
    response = post(client, path, url="/v1/explain")  # no pathology field
    assert response.status_code == 422
    response = post(client, b"plain text", url="/v1/explain", pathology="Mass")
    assert response.status_code == 415
    assert_no_server_paths(response.text, bundle)


# ---------------------------------------------------------------------------- the rest


def test_healthz_docs_and_page(client, bundle):
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["model"]["labels"] == list(PATHOLOGIES)
    assert body["model"]["image_size"] == 64 and body["model"]["backend"] == "torch"
    assert_no_server_paths(response.text, bundle)
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/explain", "/healthz"} <= set(schema["paths"])
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and "v1/predict" in page.text and "v1/explain" in page.text


def test_no_route_serves_server_files(client):
    for url in ("/../../etc/passwd", "/static/../model.json", "/model.json", "/v1/predict/x"):
        assert client.get(url).status_code == 404


# ---------------------------------------------------------------------------- time limit, 500s


def small_png(size: int = 96) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_requests_over_the_time_limit_get_503_and_the_service_recovers(
    predictor, bundle, monkeypatch
):
    # The model blocks until the test releases it: the limit expires first, whatever the
    # machine's speed.
    release = threading.Event()
    original = predictor.scores

    def stuck(images):
        release.wait(60)
        return original(images)

    monkeypatch.setattr(predictor, "scores", stuck)
    app = create_app(predictor=predictor, request_timeout_s=0.2, decode_workers=1)
    app.state.service.start()  # a worker up and idle: the limit is spent in the model
    client = TestClient(app)
    try:
        response = post(client, small_png(), name="../slow.png")
    finally:
        release.set()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert problem_detail(response) == (
        "slow.png: not answered within the time limit of 0.2 s (the service is busy "
        "or the image is too slow to process); try again later"
    )
    assert_no_server_paths(response.text, bundle)
    monkeypatch.undo()
    assert client.get("/healthz").json()["status"] == "ok"
    # The model answers again once the abandoned call, still finishing in its thread, lets
    # go of it. Asked through an app with a limit no machine's speed reaches: under the
    # 0.2 s limit a slow, busy machine would time out this normal request too.
    patient = TestClient(create_app(predictor=predictor, request_timeout_s=120, decode_workers=1))
    response = post(patient, small_png(), name="fine.png")
    assert response.status_code == 200 and response.json()["file"] == "fine.png"
    assert patient.get("/healthz").json()["status"] == "ok"


def test_unexpected_failures_are_json_500_without_stack_or_paths(
    predictor, bundle, monkeypatch, caplog
):
    def broken(images):
        raise RuntimeError(f"boom: cannot open {bundle}/model.safetensors")

    monkeypatch.setattr(predictor, "scores", broken)
    client = TestClient(create_app(predictor=predictor), raise_server_exceptions=False)
    with caplog.at_level("ERROR", logger="cxr.serve"):
        response = post(client, small_png(), name="x.png")
    assert response.status_code == 500
    assert problem_detail(response) == "x.png: internal error while predicting (RuntimeError)"
    assert "boom" not in response.text and "Traceback" not in response.text
    assert_no_server_paths(response.text, bundle)
    assert "boom" in caplog.text  # the details are in the server's log

    # Anything outside the upload path too: the app-wide handler answers JSON.
    monkeypatch.setattr(predictor, "describe", lambda: broken(None))
    response = client.get("/healthz")
    assert response.status_code == 500
    assert problem_detail(response) == "internal error (RuntimeError); see the server log"
    assert_no_server_paths(response.text, bundle)
