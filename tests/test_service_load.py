"""A bounded load test of the real HTTP server on loopback, with malformed requests mixed in.

uvicorn serves the app in a thread of this process on a port of 127.0.0.1 chosen by the OS;
8 client threads send 120 requests, about a third of them malformed. Every valid request must
get 200, every malformed one its 4xx, none a 5xx; afterwards the server answers /healthz and
its memory is near its level after the warm-up. The server is stopped at the end.
(`benchmarks/serve_soak.py` runs the same mix at 2,000 requests from 16 clients.)
"""

from __future__ import annotations

import gc
import io
import socket
import threading
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image
from support.media import png_bytes, png_claiming_size

from cxr.serve.app import create_app

pytestmark = pytest.mark.slow  # 120 requests to a real server

REQUESTS = 120
CLIENTS = 8
MAX_UPLOAD = 50_000
RSS_MARGIN_MB = 150


def request_mix() -> list[tuple[str, dict, int]]:
    """(kind, httpx keyword arguments, expected status), valid and malformed interleaved."""
    rng = np.random.default_rng(0)
    noise = png_bytes(Image.fromarray(rng.integers(0, 256, (96, 96), dtype=np.uint8), mode="L"))
    ramp = (np.arange(80 * 60, dtype=np.uint32).reshape(60, 80) * 13).astype(np.uint16)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (72, 90), dtype=np.uint8)).save(jpeg, format="JPEG")

    def upload(name: str, data: bytes) -> dict:
        return {"files": {"file": (name, data, "application/octet-stream")}}

    valid = [
        ("png", upload("scan.png", noise), 200),
        ("png16", upload("scan16.png", png_bytes(Image.fromarray(ramp))), 200),
        ("jpeg", upload("scan.jpg", jpeg.getvalue()), 200),
        ("tiny", upload("one.png", png_bytes(Image.new("L", (1, 1), 50))), 200),
    ]
    malformed = [
        ("text", upload("notes.png", b"not an image at all\n"), 415),
        ("empty", upload("empty.png", b""), 415),
        ("truncated", upload("cut.png", noise[: len(noise) // 2]), 422),
        ("bomb", upload("bomb.png", png_claiming_size(60_000, 60_000)), 413),
        ("oversize-file", upload("big.png", noise + b"\0" * MAX_UPLOAD), 413),
        ("oversize-body", upload("huge.png", b"\0" * (MAX_UPLOAD + 80_000)), 413),
        ("no-file-field", {"data": {"pathology": "Mass"}}, 422),
    ]
    mix = []
    for index in range(REQUESTS):
        if index % 3 == 2:
            mix.append(malformed[(index // 3) % len(malformed)])
        else:
            mix.append(valid[index % len(valid)])
    return mix


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture
def server(tmp_path):
    """A real uvicorn server on 127.0.0.1 (tiny untrained 32 px model), stopped afterwards."""
    from support.media import untrained_bundle

    bundle = untrained_bundle(tmp_path / "bundle", 32)
    app = create_app(bundle, backend="torch", device="cpu", max_upload_bytes=MAX_UPLOAD)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(400):
            if instance.started:
                break
            thread.join(0.05)
        assert instance.started, "uvicorn did not start"
        yield base
    finally:
        instance.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def send(base: str, mix: list[tuple[str, dict, int]], clients: int) -> list[tuple[str, int, int]]:
    """(kind, expected, got) per request; a transport error counts as status 0."""
    results: list[tuple[str, int, int]] = []
    lock = threading.Lock()
    jobs = iter(mix)

    def client() -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            while True:
                with lock:
                    job = next(jobs, None)
                if job is None:
                    return
                kind, kwargs, expected = job
                try:
                    response = http.post("/v1/predict", **kwargs)
                    status = response.status_code
                    json = "application/json" if status == 200 else "application/problem+json"
                    assert response.headers["content-type"] == json
                    text = response.text
                    assert "Traceback" not in text and "/tmp" not in text, text
                except (httpx.HTTPError, AssertionError):
                    status = 0
                with lock:
                    results.append((kind, expected, status))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_bounded_load_with_malformed_requests_leaves_the_server_healthy(server):
    mix = request_mix()
    assert sum(expected != 200 for _, _, expected in mix) >= REQUESTS // 4
    warm = send(server, mix[:24], 4)
    assert [r for r in warm if r[1] != r[2]] == []
    gc.collect()
    before = rss_mb()

    results = send(server, mix, CLIENTS)

    assert len(results) == REQUESTS
    wrong = Counter((kind, expected, got) for kind, expected, got in results if got != expected)
    assert not wrong, f"unexpected answers (kind, expected, got): {dict(wrong)}"
    assert not [r for r in results if r[2] >= 500]
    assert sum(expected == 200 for _, expected, _ in results) == REQUESTS - REQUESTS // 3
    health = httpx.get(f"{server}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    gc.collect()
    grown = rss_mb() - before
    assert grown < RSS_MARGIN_MB, f"resident memory grew by {grown:.0f} MB under load"
