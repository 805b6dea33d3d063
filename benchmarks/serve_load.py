"""Latency and throughput of `cxr serve` on 127.0.0.1: 200 sequential requests, then 8 clients.

    python benchmarks/serve_load.py [--requests 200] [--clients 8] [--backend auto] [--model RUN]

Starts `cxr serve` in a subprocess on a free loopback port (never another interface), waits
for /healthz, POSTs real NIH PNGs (1024x1024) to /v1/predict, and stops the server itself.
The concurrent phase sends the same number of requests from --clients threads. Reports p50 /
p99 latency, requests/s and the number of errors (anything but 200). Weights are random unless
--model is given (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from _serve import running_server

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "data" / "nih" / "images"


def phase(url: str, payloads: list[tuple[str, bytes]], requests: int, clients: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                name, data = payloads[index % len(payloads)]
                start = time.perf_counter()
                try:
                    response = http.post(url, files={"file": (name, data, "image/png")})
                    ok = response.status_code == 200
                    problem = f"{response.status_code} {response.text[:100]}"
                except httpx.HTTPError as exc:
                    ok, problem = False, repr(exc)
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    if not ok:
                        errors.append(problem)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    values = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
        "per_s": len(latencies) / wall,
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()

    payloads = [(p.name, p.read_bytes()) for p in sorted(IMAGES.glob("*.png"))[:20]]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from support.media import untrained_bundle

            model = untrained_bundle(Path(tmp) / "bundle", args.size)
        with running_server(model, args.backend, tmp) as (_, base, health):
            model_info = health["model"]
            print(
                f"backend {model_info['backend']}, {model_info['image_size']} px, "
                f"payload: {len(payloads)} NIH PNGs (1024x1024) in rotation"
            )
            url = f"{base}/v1/predict"
            phase(url, payloads, 4, 1)  # warm-up
            for name, clients in (("sequential", 1), (f"{args.clients} clients", args.clients)):
                result = phase(url, payloads, args.requests, clients)
                print(
                    f"{name:>12}: {result['requests']} requests, p50 {result['p50_ms']:.0f} ms, "
                    f"p99 {result['p99_ms']:.0f} ms, {result['per_s']:.2f} requests/s, "
                    f"{len(result['errors'])} errors"
                )
                for problem in result["errors"][:5]:
                    print(f"    error: {problem}")


if __name__ == "__main__":
    main()
