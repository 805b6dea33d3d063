"""`cxr serve` under concurrent decompression bombs: its memory stays within its budget.

    python benchmarks/serve_bombs.py [--clients 16] [--rounds 3] [--size 64] [--model RUN]
                                     [--deflate-mib 1024] [-- extra cxr serve options]

Starts `cxr serve` on a free loopback port (never another interface), waits for /healthz,
sends one warm-up round of valid images, then ``--rounds`` rounds of ``--clients``
concurrent uploads to /v1/predict, each round a mix of:

- DICOMs whose encapsulated JPEG claims 65500x65500 pixels while Rows/Columns say 1024
  (37 KB files that once took 16 GB to decode);
- deflated DICOMs carrying ``--deflate-mib`` MiB of zeros in a private element (1 MB files
  that once inflated twice, 2 GB each);
- valid images: real NIH PNGs (1024 px), the real JPEG-compressed chest DICOM, and DX
  DICOMs built from NIH PNGs.

It samples the resident memory of the server and of all its child processes (the decode
workers) every 20 ms, and reports the idle total (after warm-up), the peak total, the
per-decode budget the server states in /healthz (``decoding.memory_budget_mb``, else the
``--budget-mb`` given here), its number of decoding workers, and the goal
``idle + clients x budget``. Exits 1 if a valid
image did not get 200, a bomb did not get 413, or /healthz failed afterwards.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from _serve import running_server
from PIL import Image
from support.media import deflated_dicom_bomb, dicom_bytes, jpeg_dicom_claiming, untrained_bundle

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
REAL_DICOM = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants, in MB (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    family, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier]
        frontier = [pid for pid in children if pid not in family]
        family.update(frontier)
    total = 0
    for pid in family:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class Sampler(threading.Thread):
    """The peak of :func:`tree_rss_mb` while it runs."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0.0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            time.sleep(0.02)


def uploads(deflate_mib: int) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """(valid, bombs) as (file name, bytes)."""
    pngs = sorted((SHARED / "nih" / "images").glob("*.png"))[:6]
    valid = [(p.name, p.read_bytes()) for p in pngs]
    valid.append((REAL_DICOM, (SHARED / "misc" / REAL_DICOM).read_bytes()))
    for path in pngs[:2]:
        gray = np.asarray(Image.open(path).convert("L"))
        valid.append((path.stem + ".dcm", dicom_bytes(gray)))
    jpeg_bomb = jpeg_dicom_claiming(65500, 65500)
    deflate_bomb = deflated_dicom_bomb(deflate_mib * 2**20)
    bombs = [("jpeg-bomb.dcm", jpeg_bomb), ("deflate-bomb.dcm", deflate_bomb)]
    return valid, bombs


def send(base: str, name: str, data: bytes) -> int:
    with httpx.Client(timeout=300) as http:
        files = {"file": (name, data, "application/octet-stream")}
        return http.post(f"{base}/v1/predict", files=files).status_code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="model input size (untrained)")
    parser.add_argument("--model", default=None, help="a run folder instead of an untrained one")
    parser.add_argument("--deflate-mib", type=int, default=1024)
    parser.add_argument("--budget-mb", type=float, default=None, help="if /healthz states none")
    parser.add_argument("serve_options", nargs="*", help="extra `cxr serve` options, after --")
    args = parser.parse_args()
    valid, bombs = uploads(args.deflate_mib)
    # Every other upload a bomb, the two kinds in turn; the rest valid images in turn.
    jobs = [
        (*bombs[(i // 2) % 2], 413) if i % 2 == 0 else (*valid[(i // 2) % len(valid)], 200)
        for i in range(args.clients)
    ]
    outcomes: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or untrained_bundle(Path(tmp) / "bundle", args.size)
        extra = ["--max-upload-mb", "8", *args.serve_options]
        with running_server(model, "auto", tmp, extra) as (server, base, health):
            decoding = health.get("decoding") or {}
            budget = decoding.get("memory_budget_mb") or args.budget_mb
            workers = decoding.get("workers")
            for name, data in valid:
                assert send(base, name, data) == 200, name
            time.sleep(1.0)
            idle = tree_rss_mb(server.pid)
            sampler = Sampler(server.pid)
            sampler.start()
            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                for _ in range(args.rounds):
                    futures = [(pool.submit(send, base, n, d), n, e) for n, d, e in jobs]
                    for future, name, expected in futures:
                        status = future.result()
                        outcomes[(name.split(".")[0] if expected == 413 else "valid", status)] += 1
                        if status != expected:
                            outcomes["unexpected"] += 1
            seconds = time.perf_counter() - started
            sampler.running = False
            sampler.join()
            healthy = httpx.get(f"{base}/healthz", timeout=10).status_code == 200
    print(f"{args.rounds} rounds x {args.clients} concurrent uploads in {seconds:.1f} s")
    for key, count in sorted((k, v) for k, v in outcomes.items() if k != "unexpected"):
        print(f"  {key[0]:14s} -> {key[1]}: {count}")
    print(f"idle (after warm-up):   {idle:8.0f} MB")
    print(f"peak during the load:   {sampler.peak:8.0f} MB  (server + decode workers)")
    if budget:
        goal = idle + args.clients * float(budget)
        stated = f"stated by the server; {workers} decoding workers"
        print(f"per-decode budget:      {float(budget):8.0f} MB ({stated})")
        share = sampler.peak / goal
        print(f"goal idle + {args.clients} x budget: {goal:8.0f} MB  -> peak is {share:.2f} of it")
    failed = outcomes["unexpected"] or not healthy
    print("all answers as expected, /healthz fine" if not failed else "FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
