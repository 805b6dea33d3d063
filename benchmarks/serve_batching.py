"""`cxr serve` under concurrent clients against the bare batched forward, measured in one run.

    python benchmarks/serve_batching.py [--clients 16] [--requests 192] [--size 128]
        [--backend auto] [--max-batch 16] [--payload nih|small] [--model RUN]

Two service phases on the same machine and backend, each against the bare batched forward:

1. `cxr serve --max-batch N` (the batched worker) in a subprocess on a free loopback port,
   --requests uploads from --clients threads;
2. the same with `--max-batch 1`: one image per model call, as before the batched worker.

The bare batched forward (the predictor alone on preprocessed batches of --max-batch images, in
this process: no HTTP, no decoding) is timed just before and just after each service phase,
while the server idles; each phase's ratio is to the mean of the two (other load on a shared
machine then weighs on both sides). Prints images/s, p50 / p99 latency and the mean batch
size the service formed (from its /metrics). The payload is real NIH PNGs (1024x1024, decoded by the
service) or, with --payload small, the 128x128 copies in misc/nih_downscaled (decoding nearly
free: what is left is HTTP and batching). Weights are random unless --model is given.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
import torch
from _serve import running_server
from serve_load import phase

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PAYLOADS = {"nih": DATA / "nih" / "images", "small": DATA / "misc" / "nih_downscaled"}


class BareForward:
    """The predictor alone on preprocessed batches: images/s of one timed stretch."""

    def __init__(self, model, backend, tmp, paths: list[Path], batch: int, images: int):
        from cxr.data.images import decode_gray
        from cxr.engine.inference import load_predictor

        self.predictor = load_predictor(model, backend=backend, device="cpu", cache_dir=tmp)
        prepared = [self.predictor.preprocess(decode_gray(p)) for p in paths]
        self.tensors = torch.stack([prepared[i % len(prepared)] for i in range(batch)])
        self.calls = max(1, images // batch)
        self.predictor.probabilities(self.tensors)  # warm-up

    def per_s(self, batch: int | None = None) -> float:
        tensors = self.tensors[:batch]
        calls = self.calls * len(self.tensors) // len(tensors)
        start = time.perf_counter()
        for _ in range(calls):
            self.predictor.probabilities(tensors)
        return calls * len(tensors) / (time.perf_counter() - start)


def batch_totals(base: str) -> tuple[float, float]:
    """(images, model calls) so far, from the service's /metrics."""
    values = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    return (
        float(values["cxr_inference_batch_size_sum"]),
        float(values["cxr_inference_batch_size_count"]),
    )


def service(model, backend, tmp, payloads, requests, clients, extra, bare) -> dict:
    """The service phase, with the bare forward timed just before and just after it (the
    server idle) on the same machine: the ratio uses their mean, so that load from outside
    the benchmark shifts both sides alike."""
    with running_server(model, backend, tmp, extra) as (_, base, _health):
        url = f"{base}/v1/predict"
        phase(url, payloads, 2 * clients, clients)  # warm-up: workers, sessions, allocator
        images, calls = batch_totals(base)
        before = bare.per_s()
        result = phase(url, payloads, requests, clients)
        result["bare"] = (before + bare.per_s()) / 2
        after = batch_totals(base)
        result["mean_batch"] = (after[0] - images) / max(1.0, after[1] - calls)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--payload", choices=sorted(PAYLOADS), default="nih")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()

    paths = sorted(PAYLOADS[args.payload].glob("*.png"))[:20]
    payloads = [(p.name, p.read_bytes()) for p in paths]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from support.media import untrained_bundle

            model = untrained_bundle(Path(tmp) / "bundle", args.size)
        bare = BareForward(model, args.backend, tmp, paths, args.max_batch, args.requests)
        print(
            f"backend {bare.predictor.backend}, {args.size} px, {args.clients} clients, "
            f"{args.requests} requests, payload {args.payload} ({len(paths)} PNGs in rotation); "
            f"bare forward one image at a time: {bare.per_s(1):.1f} images/s"
        )
        batched = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
        phases = [
            (f"serve --max-batch {args.max_batch}", batched),
            ("serve --max-batch 1", ["--max-batch", "1"]),
        ]
        for label, extra in phases:
            result = service(
                model, args.backend, tmp, payloads, args.requests, args.clients, extra, bare
            )
            print(
                f"{label:>21}: {result['per_s']:5.1f} images/s = "
                f"{result['per_s'] / result['bare']:4.0%} of the bare forward's "
                f"{result['bare']:.1f} (batches of {args.max_batch}), p50 "
                f"{result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, mean batch "
                f"{result['mean_batch']:.1f}, {len(result['errors'])} errors"
            )
            for problem in result["errors"][:5]:
                print(f"    error: {problem}")


if __name__ == "__main__":
    main()
