"""The service under hostile or broken input: decodes in worker processes that are ended on
time and memory, statuses that never echo input, options checked before anything loads,
slow clients cut off, and /docs without a CDN.

Everything is generated here; the decoding workers' misbehaviour comes from
``decode_hooks.misbehave_by_name`` (one upload name each). No assertion is on elapsed time:
a worker's end is checked by its process id, a memory cap by the worker's RLIMIT_AS.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
import uvicorn
from decode_hooks import misbehave_by_name
from fastapi.testclient import TestClient
from support.media import png_bytes
from support.problems import problem_detail
from typer.testing import CliRunner

import cxr
from cxr.cli import app as cli
from cxr.engine.inference import load_predictor
from cxr.errors import ConfigError
from cxr.runtime import resolve_device
from cxr.serve.app import create_app
from cxr.serve.decoding import DecodePool
from cxr.serve.limits import BodyTimeout
from cxr.serve.server import server_config

BUDGET = 16 * 2**20  # small enough that a 6000 x 6000 8-bit image (36 MB) cannot fit


@pytest.fixture(scope="module")
def predictor(untrained_bundle):
    return load_predictor(untrained_bundle, backend="torch", device="cpu")


@pytest.fixture(scope="module")
def client(predictor) -> TestClient:
    return TestClient(create_app(predictor=predictor, decode_workers=1))


@pytest.fixture(scope="module")
def hooked(predictor):
    """One worker running the misbehaving decoder, and two apps that share it: one with a
    1 s time limit (for the decode that never ends) and a patient one for everything else."""
    pool = DecodePool(1, decode=misbehave_by_name)
    pool.start()
    quick = TestClient(create_app(predictor=predictor, decoder=pool, request_timeout_s=1))
    patient = TestClient(create_app(predictor=predictor, decoder=pool, request_timeout_s=120))
    yield pool, quick, patient
    pool.close()


def small_png(size: int = 80) -> bytes:
    pixels = np.random.default_rng(2).integers(0, 256, (size, size), dtype=np.uint8)
    return png_bytes(pixels)


def post(client, data: bytes, name: str, url="/v1/predict", **form):
    return client.post(url, files={"file": (name, data, "application/octet-stream")}, data=form)


def running(pid: int) -> bool:
    """Whether a process with this id exists and is not a zombie (the pool reaps the workers
    it ends; an orphan is reaped by whoever adopts it, perhaps later)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return re.search(r"^State:\s+Z", status, re.M) is None


def address_space_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max address space"):
            soft = line.split()[3]
            return -1 if soft == "unlimited" else int(soft)
    raise AssertionError("no address-space line in /proc/PID/limits")


def virtual_size(pid: int) -> int:
    found = re.search(r"^VmSize:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(found.group(1)) * 1024


# ---------------------------------------------------------------------------- decoding workers


def test_a_decode_over_the_memory_budget_is_413_and_its_worker_replaced(predictor):
    app = create_app(predictor=predictor, decode_workers=1, decode_memory_bytes=BUDGET)
    pool = app.state.service.decoder
    client = TestClient(app)
    try:
        pool.start()
        [old] = pool.pids()
        # The cap is the worker's own: its size after imports plus the budget, hard.
        limit = address_space_limit(old)
        assert limit > virtual_size(old) and limit - virtual_size(old) <= BUDGET
        big = png_bytes(np.zeros((6000, 6000), dtype=np.uint8))  # 36 Mpx, under the pixel limit
        response = post(client, big, "big.png")
        assert response.status_code == 413
        assert problem_detail(response) == (
            "big.png: decoding needs more memory than the per-decode budget of 16 MiB"
        )
        assert not running(old)
        assert client.get("/healthz").status_code == 200
        response = post(client, small_png(), "fine.png")
        assert response.status_code == 200, response.text
        [new] = pool.pids()
        assert new != old
        assert client.get("/healthz").json()["decoding"]["restarts"] == 1
    finally:
        pool.close()


@pytest.mark.slow
def test_a_decode_past_the_time_limit_is_ended_and_the_next_request_succeeds(hooked):
    pool, quick, patient = hooked
    assert post(patient, small_png(), "warm.png").status_code == 200  # the worker is idle
    [old] = pool.pids()
    response = post(quick, small_png(), "slow.png")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["detail"].startswith("slow.png: not answered within the time limit")
    assert not running(old)  # ended before the answer went out, not left to finish
    assert quick.get("/healthz").status_code == 200
    response = post(patient, small_png(), "fine.png")
    assert response.status_code == 200, response.text
    assert pool.pids() and pool.pids() != [old]


def test_a_worker_that_dies_is_422_and_replaced(hooked):
    pool, _quick, patient = hooked
    assert post(patient, small_png(), "warm.png").status_code == 200
    [old] = pool.pids()
    response = post(patient, small_png(), "crash.png")
    assert response.status_code == 422
    assert problem_detail(response) == (
        "crash.png: the decoder stopped on this image (signal SIGKILL)"
    )
    assert not running(old)
    assert patient.get("/healthz").json()["status"] == "ok"
    assert post(patient, small_png(), "fine.png").status_code == 200


@pytest.mark.slow
def test_a_worker_ended_by_a_signal_without_a_name_is_replaced_too(hooked):
    """A real-time signal once raised ValueError while the worker was being named: a 500,
    and the slot was lost, so every later request waited for a worker and got 503."""
    pool, _quick, patient = hooked
    assert post(patient, small_png(), "warm.png").status_code == 200
    rtmin = signal.SIGRTMIN + 6
    for _ in range(2):
        response = post(patient, small_png(), "rt-signal.png")
        assert response.status_code == 422, response.text
        assert response.json()["detail"].endswith(f"(signal {int(rtmin)})")
        assert post(patient, small_png(), "fine.png").status_code == 200
    assert len(pool.pids()) == 1


def test_worker_errors_keep_their_kind_and_the_worker(hooked):
    pool, _quick, patient = hooked
    assert post(patient, small_png(), "warm.png").status_code == 200
    pids = pool.pids()
    # An ImageError subclass named ImageTooLarge (cxr.data.images' size guard): 413.
    response = post(patient, small_png(), "huge.png")
    assert response.status_code == 413
    assert problem_detail(response) == "huge.png: image would need too much memory"
    # A bug in the decoder: 500 with the class only, its message stays in the server's log.
    response = post(patient, small_png(), "bug.png")
    assert response.status_code == 500
    assert problem_detail(response) == "bug.png: internal error while decoding (KeyError)"
    # Ordinary bad images are refused by the worker with the decoder's own message.
    response = post(patient, small_png()[:300], "cut.png")
    assert response.status_code == 422
    assert response.json()["detail"].startswith("cut.png: corrupt or truncated image")
    assert pool.pids() == pids  # none of these cost a worker


ORPHAN = """
import os, signal, sys, threading, time
from decode_hooks import misbehave_by_name
from cxr.serve.decoding import DecodePool

pool = DecodePool(1, decode=misbehave_by_name)
pool.start()
print(pool.pids()[0], flush=True)
job = {"name": "slow.png", "timeout": 1.0}
threading.Thread(target=pool.decode, args=(b"",), kwargs=job, daemon=True).start()
for _ in range(1200):
    if os.path.exists(os.environ["CXR_TEST_DECODE_STARTED"]):
        break
    time.sleep(0.05)
os.kill(os.getpid(), signal.SIGKILL)  # the service dies mid-decode: nobody will kill the worker
"""


@pytest.mark.slow
def test_a_worker_whose_service_died_mid_decode_ends_itself(tmp_path):
    started = tmp_path / "started"
    paths = [str(Path(__file__).parent), str(Path(cxr.__file__).parents[1])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths),
        "CXR_TEST_DECODE_STARTED": str(started),
    }
    result = subprocess.run(
        [sys.executable, "-c", ORPHAN], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL and started.exists(), result.stderr
    worker = int(result.stdout.split()[0])
    for _ in range(600):  # its alarm goes off 5 s after the job's 1 s deadline; 60 s bound
        if not running(worker):
            break
        time.sleep(0.1)
    assert not running(worker)


IDLE_ORPHANS = """
import os, signal
from cxr.serve.decoding import DecodePool

pool = DecodePool(2)
pool.start()
print(*pool.pids(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the service dies with its workers idle
"""


@pytest.mark.slow
def test_idle_workers_whose_service_died_end_themselves():
    paths = [str(Path(__file__).parent), str(Path(cxr.__file__).parents[1])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    result = subprocess.run(
        [sys.executable, "-c", IDLE_ORPHANS], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    workers = [int(pid) for pid in result.stdout.split()]
    assert len(workers) == 2
    for _ in range(600):  # they look for their parent once a second; 60 s bound
        if not any(running(pid) for pid in workers):
            break
        time.sleep(0.1)
    assert not any(running(pid) for pid in workers)


# ---------------------------------------------------------------------------- statuses


@pytest.mark.parametrize(
    "pathology", ["²", "①", "¹⁰", "٣", "３", "-1", "14", "1e1", "0x3", "ｍass"]
)
def test_pathologies_that_are_not_an_ascii_index_or_a_label_get_422(client, pathology):
    response = post(client, small_png(), "x.png", url="/v1/explain", pathology=pathology)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("unknown pathology ")


def test_unknown_pathologies_are_echoed_only_as_a_short_escaped_prefix(client):
    response = post(client, small_png(), "x.png", url="/v1/explain", pathology="\0<b>" * 5000)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "\0" not in detail and "<b>" in detail and len(detail) < 400
    assert detail.startswith("unknown pathology '\\x00<b>") and "...; choose one of" in detail


def test_ascii_indices_and_labels_still_work(client):
    for pathology in ("3", " 03 ", "infiltration", "Pleural Thickening"):
        response = post(client, small_png(), "x.png", url="/v1/explain", pathology=pathology)
        assert response.status_code == 200, (pathology, response.text)


def test_a_text_field_named_file_is_422_without_echo(client):
    nuls = "\0" * 2**20
    response = client.post(
        "/v1/predict", data={"file": nuls}, files={"other": ("a.txt", b"x", "text/plain")}
    )
    assert response.status_code == 422
    assert len(response.content) < 500 and "\\u0000" not in response.text
    assert problem_detail(response) == (
        "invalid request: file: expected an uploaded file (a multipart part with a file name)"
    )
    response = client.post("/v1/explain", data={"pathology": "Mass"})
    assert response.status_code == 422
    assert problem_detail(response) == "invalid request: file: missing"


def test_more_than_one_file_part_is_422(client):
    files = [("file", ("a.png", small_png(), "image/png")), ("file", ("b.png", small_png(), ""))]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 422
    assert problem_detail(response) == "one file per request (the form has 2 'file' parts)"


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--max-upload-mb", "-1", "--max-upload-mb must be a positive number"),
        ("--max-megapixels", "0", "--max-megapixels must be a positive number"),
        ("--request-timeout", "-5", "--request-timeout must be a positive number (0 turns"),
        ("--request-timeout", "nan", "--request-timeout must be a positive number"),
        ("--header-timeout", "0", "--header-timeout must be a positive number"),
        ("--body-timeout", "-1", "--body-timeout must be a positive number"),
        ("--decode-workers", "0", "--decode-workers must be a positive number"),
        ("--decode-memory-mb", "-2", "--decode-memory-mb must be a positive number"),
        ("--port", "70000", "--port must be between 1 and 65535, not 70000"),
        ("--port", "0", "--port must be between 1 and 65535, not 0"),
        ("--device", "cuda:7", "cuda:7"),
        ("--device", "tpu", "unknown device 'tpu'"),
    ],
)
def test_serve_refuses_bad_options_before_loading_the_model(tmp_path, option, value, says):
    missing = tmp_path / "no-such-bundle"  # were the model loaded first, this would be the error
    result = CliRunner().invoke(cli, ["serve", str(missing), option, value])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and says in result.output
    assert "no such model" not in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "limits",
    [
        {"max_upload_bytes": -1},
        {"max_pixels": 0},
        {"request_timeout_s": -5},
        {"header_timeout_s": 0},
        {"body_timeout_s": float("inf")},
        {"decode_workers": 0},
        {"decode_workers": 1.5},
        {"decode_memory_bytes": -1},
        {"device": "cuda:7"},
    ],
)
def test_create_app_raises_config_error_before_loading(tmp_path, limits):
    with pytest.raises(ConfigError):
        create_app(tmp_path / "no-such-bundle", **limits)


def test_a_cuda_index_beyond_the_devices_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"cuda:7 .* 2 CUDA device\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:7")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


# ---------------------------------------------------------------------------- slow clients


def test_a_stalled_body_gets_408_and_close():
    """BodyTimeout alone, over ASGI: the second part of the body never comes."""
    reached = []

    async def app(scope, receive, send):
        reached.append(await receive())
        reached.append(await receive())  # never answered

    async def run():
        first = {"type": "http.request", "body": b"--b\r\n", "more_body": True}
        stalled = asyncio.Event()
        sent = []

        async def receive():
            if first not in reached:
                return first
            await stalled.wait()  # a client that stopped sending

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "headers": [], "path": "/v1/predict"}
        await BodyTimeout(app, timeout_s=0.05)(scope, receive, send)
        return sent

    sent = asyncio.run(run())
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert reached == [{"type": "http.request", "body": b"--b\r\n", "more_body": True}]


@pytest.fixture
def server(predictor):
    """A real uvicorn server on 127.0.0.1 with 1 s header and body limits."""
    app = create_app(predictor=predictor, header_timeout_s=1, body_timeout_s=1, decode_workers=1)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = server_config(app, host="127.0.0.1", port=port)
    config.lifespan = "off"
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if instance.started or not thread.is_alive():
                break
            thread.join(0.05)
        assert instance.started, "uvicorn did not start"
        yield port
    finally:
        instance.should_exit = True
        thread.join(30)
        sock.close()
        app.state.service.close()


def exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload``, then read until the server closes (a 60 s bound, far above 1 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(payload)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
        return received


@pytest.mark.slow
def test_a_body_that_trickles_gets_408_at_its_total_limit():
    """A part every 20 ms passes each 50 ms wait, but the whole body has 200 ms."""
    parts = []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            parts.append(message)
            if not message.get("more_body"):
                break

    async def run():
        sent = []

        async def receive():
            await asyncio.sleep(0.02)
            return {"type": "http.request", "body": b"x", "more_body": True}  # never ends

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "headers": [], "path": "/v1/predict"}
        await BodyTimeout(app, timeout_s=0.05, total_s=0.2)(scope, receive, send)
        return sent

    sent = asyncio.run(run())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 408
    assert b"not all of it within 0.2 s" in sent[1]["body"]
    # Without the total limit this body would never end (each part beats the 50 ms wait).
    assert parts and all(part["more_body"] for part in parts)


@pytest.mark.slow
def test_the_server_closes_connections_whose_headers_or_body_stall(server):
    assert exchange(server, b"") == b""  # connected, never sent a byte
    assert exchange(server, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n") == b""
    answer = exchange(
        server,
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request body stalled" in answer


@pytest.mark.slow
def test_the_header_limit_leaves_complete_requests_alone(server):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = exchange(server, request + request + last)  # three on one connection
    assert answer.count(b"HTTP/1.1 200 OK") == 3
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    body += small_png() + b"\r\n--b--\r\n"
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    answer = exchange(server, head + body)
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:300]


# ---------------------------------------------------------------------------- /docs offline


def test_docs_and_page_load_everything_from_the_service(client):
    for page in ("/docs", "/"):
        html = client.get(page).text
        assert "http://" not in html and "https://" not in html, page
        urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
        assert urls or page == "/"
        for url in urls:
            parts = urlsplit(url)
            assert not parts.scheme and not parts.netloc, url
            asset = client.get(url)
            assert asset.status_code == 200 and asset.content, url
    bundle = client.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle.headers["content-type"].startswith("text/javascript")
    assert b"SwaggerUIBundle" in bundle.content
    assert "openapi.json" in client.get("/docs").text
    assert client.get("/redoc").status_code == 404  # it would load its script from a CDN
    for url in ("/docs/assets/redoc.standalone.js", "/docs/assets/..%2f__init__.py"):
        assert client.get(url).status_code == 404
