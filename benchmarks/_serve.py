"""Start `cxr serve` in a subprocess on loopback for the service benchmarks, and stop it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(
    model: Path, backend: str, cache_dir: str, extra: list[str] | None = None
) -> Iterator[tuple[subprocess.Popen, str, dict]]:
    """Yield (process, base URL, /healthz answer) once the server answers; always stop it."""
    port = free_port()
    command = [sys.executable, "-m", "cxr", "serve", str(model), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--backend", backend, *(extra or [])]
    env = dict(os.environ, CXR_CACHE_DIR=cache_dir)
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                sys.exit(f"cxr serve exited with status {server.returncode}")
            try:
                health = httpx.get(f"{base}/healthz", timeout=2).json()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    sys.exit("cxr serve did not start within 300 s")
                time.sleep(0.5)
        yield server, base, health
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
