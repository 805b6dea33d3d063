"""cxr serve's batched predictions, /metrics and API key, through the app (TestClient).

Probabilities are checked against the model called by the test on conftest's independent
preprocessing of the same file; the weights digest against hashlib on the bundle's file.
A gate on the predictor decides when a model call returns, so that requests queue behind it
deterministically (waits below are hang guards, never timing assumptions).
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reference_gray, reference_input
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cxr.cli import app as cli
from cxr.cli.serve import is_loopback
from cxr.engine.inference import load_predictor
from cxr.errors import ConfigError
from cxr.labels import PATHOLOGIES
from cxr.serve.app import create_app
from cxr.serve.auth import MAX_KEY_FILE_BYTES, read_api_key, readable_by_others

HANG_GUARD_S = 60
KEY = "k3y-for-tests-0123456789abcdef"
IMAGES = [
    "nih/images/00001369_000.png",
    "misc/16747_3_1.jpg",
    "misc/00000001_000.png",
    "misc/nih_downscaled/00000002_000.png",
]


@pytest.fixture(scope="module")
def predictor(untrained_bundle):
    return load_predictor(untrained_bundle, backend="torch", device="cpu")


def expected(predictor, path: Path) -> np.ndarray:
    batch = torch.from_numpy(reference_input(reference_gray(path), predictor.image_size))[None]
    with torch.no_grad():
        logits = predictor.torch_model(batch).double()
    return torch.sigmoid(logits / predictor.temperature).numpy()[0]


def post(client, path: Path, **headers):
    files = {"file": (path.name, path.read_bytes(), "application/octet-stream")}
    return client.post("/v1/predict", files=files, headers=headers)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"hang guard: {what}"
        time.sleep(0.01)


class Gate:
    """Holds every model call until opened; records the batch sizes."""

    def __init__(self, predictor, monkeypatch):
        self.original = predictor.scores
        self.sizes: list[int] = []
        self.open = threading.Event()
        monkeypatch.setattr(predictor, "scores", self)

    def __call__(self, batch):
        self.sizes.append(len(batch))
        assert self.open.wait(HANG_GUARD_S)
        return self.original(batch)


def in_threads(work, count: int) -> tuple[list[threading.Thread], list]:
    results: list = [None] * count

    def run(index: int) -> None:
        results[index] = work(index)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads, results


def test_concurrent_requests_share_a_batch_and_keep_their_own_answers(
    predictor, shared_data, monkeypatch
):
    gate = Gate(predictor, monkeypatch)
    app = create_app(predictor=predictor, max_batch=8, max_wait_ms=0)
    batcher = app.state.service.batcher
    paths = [shared_data / p for p in IMAGES]
    with TestClient(app) as client:
        first, first_result = in_threads(lambda _: post(client, paths[0]), 1)
        wait_until(lambda: gate.sizes == [1], "the first request reaches the model")
        rest, results = in_threads(lambda i: post(client, paths[i % 4]), 6)
        wait_until(lambda: batcher.describe()["queued"] == 6, "six requests queue")
        gate.open.set()
        for thread in first + rest:
            thread.join(HANG_GUARD_S)
        metrics = client.get("/metrics").text
    assert gate.sizes == [1, 6]
    for index, response in [(0, first_result[0])] + [(i % 4, r) for i, r in enumerate(results)]:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["file"] == paths[index].name and body["labels"] == list(PATHOLOGIES)
        got = np.array([body["probabilities"][n] for n in PATHOLOGIES])
        np.testing.assert_allclose(got, expected(predictor, paths[index]), rtol=0, atol=2e-6)
    assert 'cxr_http_requests_total{endpoint="/v1/predict",status="200"} 7.0' in metrics
    assert "cxr_inference_batch_size_count 2.0" in metrics
    assert "cxr_inference_batch_size_sum 7.0" in metrics
    assert 'cxr_http_request_duration_seconds_count{endpoint="/v1/predict"} 7.0' in metrics


def test_a_full_queue_is_503_with_retry_after(predictor, shared_data, monkeypatch):
    gate = Gate(predictor, monkeypatch)
    app = create_app(predictor=predictor, max_batch=1, max_wait_ms=0, max_queue=1)
    batcher = app.state.service.batcher
    path = shared_data / IMAGES[3]
    with TestClient(app) as client:
        running, _ = in_threads(lambda _: post(client, path), 1)
        wait_until(lambda: gate.sizes == [1], "the first request reaches the model")
        queued, queued_result = in_threads(lambda _: post(client, path), 1)
        wait_until(lambda: batcher.describe()["queued"] == 1, "the second request queues")
        refused = post(client, path)
        gate.open.set()
        for thread in running + queued:
            thread.join(HANG_GUARD_S)
        metrics = client.get("/metrics").text
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["detail"].startswith("00000002_000.png: the service is busy")
    assert queued_result[0].status_code == 200
    assert 'cxr_refusals_total{reason="queue_full"} 1.0' in metrics
    assert 'cxr_http_requests_total{endpoint="/v1/predict",status="503"} 1.0' in metrics


def test_metrics_name_the_model_by_its_weights_digest(untrained_bundle):
    app = create_app(untrained_bundle, backend="torch", device="cpu")
    digest = hashlib.sha256((untrained_bundle / "model.safetensors").read_bytes()).hexdigest()
    client = TestClient(app)
    client.get("/no/such/path")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    text = response.text
    assert f'weights_sha256="{digest}"' in text and 'backend="torch"' in text
    assert 'cxr_http_requests_total{endpoint="other",status="404"} 1.0' in text
    assert "cxr_inference_queue_depth 0.0" in text


# ---------------------------------------------------------------------------- the API key


@pytest.fixture(scope="module")
def keyed(predictor) -> TestClient:
    return TestClient(create_app(predictor=predictor, api_key=KEY))


@pytest.mark.parametrize("url", ["/", "/metrics", "/docs", "/openapi.json", "/v1/results"])
def test_without_the_key_every_endpoint_but_healthz_is_401(keyed, url):
    assert keyed.get("/healthz").status_code == 200
    for headers in ({}, {"Authorization": f"Bearer {KEY}x"}, {"X-API-Key": KEY[:-1]}):
        response = keyed.get(url, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Basic realm=")
        assert KEY not in response.text


def test_the_key_is_accepted_as_bearer_header_or_basic_password(keyed, predictor, shared_data):
    path = shared_data / IMAGES[3]
    assert post(keyed, path).status_code == 401
    basic = base64.b64encode(f"anyone:{KEY}".encode()).decode()
    for headers in (
        {"Authorization": f"Bearer {KEY}"},
        {"X-API-Key": KEY},
        {"Authorization": f"Basic {basic}"},
    ):
        response = post(keyed, path, **headers)
        assert response.status_code == 200, response.text
        got = np.array([response.json()["probabilities"][n] for n in PATHOLOGIES])
        np.testing.assert_allclose(got, expected(predictor, path), atol=2e-6)
        assert keyed.get("/", headers=headers).status_code == 200
    metrics = keyed.get("/metrics", headers={"X-API-Key": KEY}).text
    assert 'cxr_refusals_total{reason="unauthorized"}' in metrics
    assert 'cxr_http_requests_total{endpoint="/v1/predict",status="401"} 1.0' in metrics


def test_key_files_must_be_regular_small_and_hold_a_real_key(tmp_path):
    good = tmp_path / "key"
    good.write_text(f"  {KEY}\n")
    good.chmod(0o600)
    assert read_api_key(good) == KEY and not readable_by_others(good)
    good.chmod(0o644)
    assert readable_by_others(good)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # would block a plain open() for ever
    cases = {
        fifo: "not a regular file",
        tmp_path: "not a regular file",
        tmp_path / "absent": "cannot read the API key file",
        tmp_path / "empty": "is empty",
        tmp_path / "big": f"more than the {MAX_KEY_FILE_BYTES:,}",
        tmp_path / "short": "fewer than 16",
        tmp_path / "spaced": "visible ASCII",
        tmp_path / "accents": "visible ASCII",
    }
    (tmp_path / "empty").write_text("\n \n")
    (tmp_path / "big").write_text("k" * (MAX_KEY_FILE_BYTES + 1))
    (tmp_path / "short").write_text("secret\n")
    (tmp_path / "spaced").write_text("two words that are long enough\n")
    (tmp_path / "accents").write_text("clé-très-secrète-0123456789\n")
    for path, says in cases.items():
        with pytest.raises(ConfigError, match=says) as error:
            read_api_key(path)
        assert str(path) in str(error.value)


def test_loopback_hosts():
    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.4", "example.org"]))


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--host", "0.0.0.0"], "--host 0.0.0.0 listens beyond this machine without an API key"),
        (["--api-key-file", "/no/such/key"], "/no/such/key: cannot read the API key file"),
        (["--max-batch", "0"], "--max-batch must be a whole number of at least 1, not 0"),
        (["--max-wait-ms", "-1"], "--max-wait-ms must be 0 or a positive number, not -1.0"),
        (["--max-queue", "0"], "--max-queue must be a whole number of at least 1, not 0"),
    ],
)
def test_serve_refuses_unsafe_or_bad_options_before_loading(tmp_path, options, says):
    missing = tmp_path / "no-such-bundle"
    result = CliRunner().invoke(cli, ["serve", str(missing), *options])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and says in result.output
    assert "no such model" not in result.output and "Traceback" not in result.output
