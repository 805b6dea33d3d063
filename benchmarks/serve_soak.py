"""Soak test of `cxr serve` on 127.0.0.1: many requests from many clients, some malformed.

    python benchmarks/serve_soak.py [--requests 2000] [--clients 16] [--size 64]
                                    [--malformed-every 4] [--backend auto] [--model RUN]

Starts `cxr serve` in a subprocess on a free loopback port (never another interface) with a
2 MiB upload limit, waits for /healthz, warms up, then sends --requests POSTs to /v1/predict
from --clients threads: real NIH PNGs (1024x1024, when ../shared/data is there) and small
synthetic PNG / 16-bit PNG / JPEG / 1x1 images, and every --malformed-every-th request a
malformed one (a text file, an empty file, a truncated PNG, a 60000x60000 header, an upload
over the limit, a body over the limit, a form without the file). Reports the answers by class
(valid ones must all be 200, malformed ones their 4xx, none 5xx), p50 / p99 latency, and the
server's resident memory (VmRSS of its process) after the warm-up, after the load and at peak.
Stops the server itself; exits 1 if any answer was not the expected one or /healthz failed.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from _serve import running_server
from PIL import Image
from support.media import png_bytes, png_claiming_size

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "data" / "nih" / "images"
MAX_UPLOAD_MB = 2


def payloads() -> tuple[list[tuple[str, dict, int]], list[tuple[str, dict, int]]]:
    """(valid, malformed): (class, httpx keyword arguments, expected status)."""
    rng = np.random.default_rng(0)
    noise = png_bytes(Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8), mode="L"))
    ramp = (np.arange(200 * 150, dtype=np.uint32).reshape(150, 200) % 4096).astype(np.uint16)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (300, 240), dtype=np.uint8)).save(jpeg, format="JPEG")
    limit = MAX_UPLOAD_MB * 1024 * 1024

    def upload(name: str, data: bytes) -> dict:
        return {"files": {"file": (name, data, "application/octet-stream")}}

    valid = [
        ("png", upload("noise.png", noise), 200),
        ("png16", upload("ramp16.png", png_bytes(Image.fromarray(ramp))), 200),
        ("jpeg", upload("scan.jpg", jpeg.getvalue()), 200),
        ("1x1", upload("one.png", png_bytes(Image.new("L", (1, 1), 90))), 200),
    ]
    valid += [
        ("nih", upload(p.name, p.read_bytes()), 200) for p in sorted(IMAGES.glob("*.png"))[:8]
    ]
    malformed = [
        ("text", upload("notes.png", b"not an image\n" * 10), 415),
        ("empty", upload("empty.png", b""), 415),
        ("truncated", upload("cut.png", noise[: len(noise) // 2]), 422),
        ("bomb", upload("bomb.png", png_claiming_size(60_000, 60_000)), 413),
        ("oversize-file", upload("big.png", noise[:4000] + b"\0" * limit), 413),
        ("oversize-body", upload("huge.png", b"\0" * (limit + 200_000)), 413),
        ("no-file-field", {"data": {"pathology": "Mass"}}, 422),
    ]
    return valid, malformed


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def load(url: str, jobs: list[tuple[str, dict, int]], clients: int) -> list[tuple]:
    """(class, expected, status, seconds) per request; a transport error is status 0."""
    results: list[tuple] = []
    lock = threading.Lock()
    queue = iter(jobs)

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while True:
                with lock:
                    job = next(queue, None)
                if job is None:
                    return
                kind, kwargs, expected = job
                start = time.perf_counter()
                try:
                    response = http.post(url, **kwargs)
                    status = response.status_code
                    if "Traceback" in response.text or "/tmp" in response.text:
                        status = -status  # a leak: counted as wrong
                except httpx.HTTPError:
                    status = 0
                with lock:
                    results.append((kind, expected, status, time.perf_counter() - start))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="model input size (random weights)")
    parser.add_argument("--malformed-every", type=int, default=4)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    if not 1 <= args.requests <= 100_000 or not 1 <= args.clients <= 256:
        sys.exit("--requests must be 1..100000 and --clients 1..256")

    valid, malformed = payloads()
    jobs, bad, good = [], 0, 0
    for index in range(args.requests):
        if args.malformed_every and index % args.malformed_every == args.malformed_every - 1:
            jobs.append(malformed[bad % len(malformed)])
            bad += 1
        else:
            jobs.append(valid[good % len(valid)])
            good += 1

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from support.media import untrained_bundle

            model = untrained_bundle(Path(tmp) / "bundle", args.size)
        with running_server(model, args.backend, tmp, ["--max-upload-mb", str(MAX_UPLOAD_MB)]) as (
            server,
            base,
            health,
        ):
            info = health["model"]
            url = f"{base}/v1/predict"
            load(url, (valid + malformed) * 2, 4)  # warm-up: every class twice
            rss_before, _ = rss_mb(server.pid)
            started = time.perf_counter()
            results = load(url, jobs, args.clients)
            wall = time.perf_counter() - started
            healthy = httpx.get(f"{base}/healthz", timeout=10).status_code == 200
            rss_after, rss_peak = rss_mb(server.pid)

    print(
        f"{len(results)} requests from {args.clients} clients in {wall:.1f} s "
        f"({len(results) / wall:.1f} requests/s); backend {info['backend']}, "
        f"{info['image_size']} px, random weights"
    )
    by_class = Counter((kind, expected, status) for kind, expected, status, _ in results)
    for (kind, expected, status), count in sorted(by_class.items()):
        mark = "" if status == expected else "   <-- WRONG"
        print(f"  {kind:>14}: {count:5d} x {status} (expected {expected}){mark}")
    for group, test in (("valid", lambda e: e == 200), ("malformed", lambda e: e != 200)):
        times = np.array([s for _, e, _, s in results if test(e)]) * 1000
        if len(times):
            print(
                f"  {group:>14}: {len(times):5d} requests, p50 {np.percentile(times, 50):.0f} ms, "
                f"p99 {np.percentile(times, 99):.0f} ms"
            )
    wrong = sum(count for (_, e, s), count in by_class.items() if s != e)
    server_errors = sum(count for (_, _, s), count in by_class.items() if s >= 500)
    print(
        f"  5xx answers: {server_errors}; wrong answers: {wrong}; /healthz after: "
        f"{'ok' if healthy else 'FAILED'}"
    )
    print(
        f"  server RSS: {rss_before:.0f} MB after warm-up, {rss_after:.0f} MB after the load "
        f"({rss_after - rss_before:+.0f} MB), peak {rss_peak:.0f} MB"
    )
    return 0 if wrong == 0 and healthy else 1


if __name__ == "__main__":
    sys.exit(main())
