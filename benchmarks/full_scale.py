"""A full-scale rehearsal of the NIH run on this machine: all 112,120 images, small.

    python benchmarks/full_scale.py OUT [--image-size 256] [--workers 2] [--skip-build]

Writes an NIH-shaped folder under OUT with every image name, patient, view and label of the
real table (``../shared/data/nih/metadata``), spread over ``images_001/images`` ...
``images_012/images`` as the download unpacks, each image a small synthetic PNG (the disk and
time here cannot hold 42 GB of 1024 px PNGs; 64 distinct images are reused). Then it times:

1. ``cxr data stats`` and ``cxr data split --val-patients 1672 --test-patients 389``;
2. ``cxr data cache`` over all images (images/s), killed part-way and resumed;
3. ``cxr train`` on the cached folder from its start to its first training step (224 px);
4. one epoch of the training loader alone through the cache (224 px, augmentation):
   images/s and the peak resident memory of the main process and of each worker;
5. inference over the full val and test sets with a small model (DenseNet121 at 64 px);
6. the decode cost of real 1024 px NIH PNGs (``../shared/data/nih/images``), to extrapolate
   the PNG-bound steps to the real download and to 16 cores.

Prints a table and writes ``OUT/full_scale.json``. Run by hand; it takes about 20 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from support.media import png_bytes, untrained_bundle

from cxr.config import TrainConfig
from cxr.data.cache import DEFAULT_CHUNK_SIZE, open_cache
from cxr.data.images import decode_gray
from cxr.data.loaders import split_loader
from cxr.data.transforms import Augment, Preprocess
from cxr.engine.trainer import Trainer
from cxr.run import RunFolder
from cxr.workflows.evaluate import bundle_logits
from cxr.workflows.train import create_run, train_run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih"
TABLE = SHARED / "metadata" / "Data_Entry_2017_v2020.csv.gz"
ARCHIVES = 12  # images_001 ... images_012
CHUNK = DEFAULT_CHUNK_SIZE


def cxr(*args: str, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cxr", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True, **kwargs)


def timed(action):
    started = time.perf_counter()
    result = action()
    return result, time.perf_counter() - started


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_folder(root: Path, size: int, limit: int | None) -> int:
    """NIH's layout: the real table (its first ``limit`` rows), its images (synthetic,
    small) in 12 archive folders. Returns the number of images."""
    table = pd.read_csv(TABLE, dtype=str, keep_default_na=False)
    if limit:
        table = table.iloc[:limit]
    names = table["Image Index"].tolist()
    rng = np.random.default_rng(0)
    images = []
    for _ in range(64):  # smooth structure plus noise: compresses like an X-ray, not like zeros
        coarse = rng.integers(0, 256, (size // 16, size // 16), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
        noise = rng.integers(-12, 13, (size, size))
        images.append(png_bytes(np.clip(smooth + noise, 0, 255).astype(np.uint8)))
    root.mkdir(parents=True, exist_ok=True)
    if limit:
        table.to_csv(root / "Data_Entry_2017_v2020.csv", index=False)
    else:
        shutil.copy(TABLE, root / TABLE.name)
    for archive, chunk in enumerate(np.array_split(np.arange(len(names)), ARCHIVES), start=1):
        folder = root / f"images_{archive:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for index in chunk:
            (folder / names[index]).write_bytes(images[index % len(images)])
    return len(names)


def cache_with_a_kill(data: Path, cache: Path, workers: int, size: int, count: int) -> dict:
    """Build the cache, kill it after a third of the images, resume; images/s of each part."""
    command = [sys.executable, "-m", "cxr", "data", "cache", str(data), "--out", str(cache)]
    command += ["--image-size", str(size), "--workers", str(workers)]
    started = time.perf_counter()
    build = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = cache / "progress.json"
    while build.poll() is None:
        if progress.exists():
            try:
                done = json.loads(progress.read_text()).get("done", [])
            except (json.JSONDecodeError, OSError):
                done = []
            if len(done) * CHUNK > count // 3:
                build.send_signal(signal.SIGKILL)
                break
        time.sleep(0.5)
    build.wait()
    first = time.perf_counter() - started
    written = min(len(json.loads(progress.read_text())["done"]) * CHUNK, count)
    _, second = timed(lambda: subprocess.run(command, capture_output=True, check=True))
    return {
        "killed_after_images": written,
        "images_per_s_before_kill": written / first,
        "images_per_s_resumed": (count - written) / second,
        "seconds_total": first + second,
    }


class FirstStep(Exception):
    """Stops training once the first step is done."""


def first_training_step(data: Path, split: Path, cache: Path, out: Path) -> dict:
    """Seconds from `cxr train`'s start (create_run) to the end of its first training step."""
    config = TrainConfig(weights="none", cache=str(cache), device="cpu", check_images="none")
    real_step = Trainer.step

    def step_once(self, images, targets):
        real_step(self, images, targets)
        raise FirstStep

    started = time.perf_counter()
    create_run(data, out, config, split_dir=split)
    created = time.perf_counter() - started
    Trainer.step = step_once
    try:
        train_run(out)
    except FirstStep:
        pass
    finally:
        Trainer.step = real_step
    return {"create_run_s": created, "first_step_s": time.perf_counter() - started}


def loader_epoch(run: Path, cache: Path, workers: int) -> dict:
    """One epoch of the training loader alone through the cache (224 px, augmented), in a
    fresh process, so that its peak memory is the loader's alone."""
    command = [sys.executable, __file__, str(run.parent), "--loader-only"]
    command += ["--workers", str(workers)]
    output = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def _loader_epoch(run: Path, cache: Path, workers: int) -> dict:
    frame = RunFolder(run).read_split("train")
    reader = open_cache(cache).reader(frame)
    loader, sampler = split_loader(
        frame, Preprocess(224), batch_size=16, workers=workers, augment=Augment(), reader=reader
    )
    sampler.set_epoch(0)
    seen, worker_peaks = 0, {}
    started = time.perf_counter()
    iterator = iter(loader)
    for images, _targets, _ in iterator:
        seen += len(images)
    seconds = time.perf_counter() - started
    for process in getattr(iterator, "_workers", []):  # persistent: still alive here
        worker_peaks[process.pid] = peak_rss_mb(process.pid)
    return {
        "images": seen,
        "images_per_s": seen / seconds,
        "main_peak_rss_mb": peak_rss_mb(os.getpid()),
        "worker_peak_rss_mb": sorted(worker_peaks.values()),
    }


def inference(run: Path) -> dict:
    """The full val and test sets through a small model (DenseNet121 at 64 px)."""
    folder = RunFolder(run)
    untrained_bundle(run, 64)
    results = {}
    for name in ("val", "test"):
        frame = folder.read_split(name)
        (_, logits), seconds = timed(
            lambda frame=frame: bundle_logits(folder, frame, device="cpu", workers=2)
        )
        results[name] = {"images": len(logits), "images_per_s": len(logits) / seconds}
    return results


def png_decode_ms() -> float:
    """Median ms to decode one real 1024 px NIH PNG (file read + decode to gray)."""
    times = []
    for path in sorted((SHARED / "images").glob("*.png"))[:40]:
        _, seconds = timed(lambda path=path: decode_gray(path))
        times.append(seconds * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--image-size", type=int, default=256, help="synthetic image size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-build", action="store_true", help="reuse OUT/nih")
    parser.add_argument("--limit", type=int, default=None, help="first N rows (a smoke run)")
    parser.add_argument("--loader-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data, split, cache = args.out / "nih", args.out / "split", args.out / "cache"
    if args.loader_only:  # step 4 in a process of its own (see loader_epoch)
        print(json.dumps(_loader_epoch(args.out / "run", cache, args.workers)))
        return 0
    report: dict = {"cores": os.cpu_count(), "workers": args.workers}
    if not args.skip_build:
        shutil.rmtree(args.out, ignore_errors=True)
        _, report["build_folder_s"] = timed(lambda: build_folder(data, args.image_size, args.limit))
    for folder in (split, cache, args.out / "run"):  # each step starts from nothing
        shutil.rmtree(folder, ignore_errors=True)
    count = len(pd.read_csv(next(data.glob("Data_Entry_*")), usecols=["Image Index"]))
    report["images"] = count
    _, report["stats_s"] = timed(lambda: cxr("data", "stats", str(data)))
    split_args = ["--val-patients", "1672", "--test-patients", "389", "--seed", "0"]
    if args.limit:
        split_args = ["--val-fraction", "0.1", "--test-fraction", "0.2", "--seed", "0"]
    _, report["split_s"] = timed(
        lambda: cxr("data", "split", str(data), "--out", str(split), *split_args)
    )
    report["cache"] = cache_with_a_kill(data, cache, args.workers, args.image_size, count)
    report["train_start"] = first_training_step(data, split, cache, args.out / "run")
    report["loader_epoch"] = loader_epoch(args.out / "run", cache, args.workers)
    report["inference"] = inference(args.out / "run")
    report["png_decode_ms_1024px"] = png_decode_ms()
    (args.out / "full_scale.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
