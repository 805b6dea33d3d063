"""GPU training images/s at 224 px: batch 64..256, fp32 vs AMP, channels-first vs -last,
eager vs ``torch.compile``, on in-memory tensors and through the cache pipeline.

Needs a CUDA device; on a CPU-only machine it says so and exits with status 2, unless
``--device cpu`` asks for a smoke run of the script itself (tiny sizes; its figures mean
nothing). The cache pipeline reads real NIH PNGs: ``--nih DIR`` (a folder holding
``images.csv`` and ``images/``; default ``$CXR_NIH_SAMPLE`` or ``../shared/data/nih``). A
handful of images is enough: the table is repeated until one epoch covers a whole row's
steps at the largest batch, and each image is decoded once into the cache.

    python benchmarks/gpu.py [--batches 64 128 256] [--steps 20] [--workers 8]
                             [--no-compile] [--images 264] [--nih DIR] [--json FILE]
    python benchmarks/gpu.py --batches 128 256 --steps 10 --no-compile   # about 2 minutes
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

NIH = Path(
    os.environ.get("CXR_NIH_SAMPLE") or Path(__file__).resolve().parents[2] / "shared/data/nih"
)
WARMUP_STEPS = 3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer, batches, steps) -> float:
    """Images/s of ``steps`` of the project's own training step (:meth:`Trainer.step`) after
    3 warm-up steps (compilation, autotuning)."""
    seen = 0
    for index in range(steps + WARMUP_STEPS):
        if index == WARMUP_STEPS:
            synchronize(trainer.device)
            started = time.perf_counter()
            seen = 0
        images, targets = next(batches)
        trainer.step(images, targets)
        seen += len(images)
    synchronize(trainer.device)
    return seen / (time.perf_counter() - started)


def repeated(table: pd.DataFrame, rows: int) -> pd.DataFrame:
    """``table`` repeated until it has at least ``rows`` rows (the cache pipeline then feeds
    full batches from a handful of images; each is still decoded once, into the cache)."""
    copies = max(1, math.ceil(rows / max(len(table), 1)))
    return pd.concat([table] * copies, ignore_index=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=None, help="first N images of the table")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    parser.add_argument(
        "--nih", type=Path, default=NIH, help="folder with images.csv and images/ (real NIH)"
    )
    parser.add_argument(
        "--device", default="cuda", help="cuda (default) or cpu: a smoke run of this script"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here (after each row)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; none is available here (CPU only).")
        return 2
    if not (args.nih / "images.csv").is_file():
        print(f"benchmarks/gpu.py: no images.csv in {args.nih} (--nih DIR: real NIH PNGs)")
        return 2

    from cxr.config import TrainConfig
    from cxr.data.cache import build_cache, open_cache
    from cxr.data.datasets import label_matrix
    from cxr.data.layouts.nih import load_nih
    from cxr.data.loaders import split_loader
    from cxr.data.transforms import Augment, Preprocess
    from cxr.engine.trainer import Trainer
    from cxr.model.network import build_model

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = "CPU (smoke run: these figures say nothing about a GPU)"
    table = load_nih(args.nih / "images.csv", image_root=args.nih / "images").table
    table = table.iloc[: args.images] if args.images else table
    labels = label_matrix(table)
    print(
        f"{name}, torch {torch.__version__}, {args.image_size} px, {len(table)} images "
        f"from {args.nih}, {args.steps} timed steps after {WARMUP_STEPS} warm-up",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        cache = open_cache(
            build_cache(table, Path(folder) / "cache", image_size=256, workers=0).path
        )
        # One epoch longer than every timed row, so that no epoch boundary (the workers
        # refilling their prefetch) falls inside a measurement.
        stream = repeated(table, (WARMUP_STEPS + args.steps + 1) * max(args.batches))
        compiles = [False] if args.no_compile else [False, True]
        loader = None
        for batch, compiled, amp, channels_last, source in itertools.product(
            args.batches, compiles, [False, True], [False, True], ["memory", "cache"]
        ):
            torch.manual_seed(0)
            config = TrainConfig(
                image_size=args.image_size, batch_size=batch, amp=amp,
                channels_last=channels_last, compile=compiled, workers=args.workers,
            )  # fmt: skip
            trainer = Trainer.create(build_model(), config, labels, device)
            trainer.train_model.train()
            if source == "memory":
                fixed = (
                    torch.randn(batch, 3, args.image_size, args.image_size),
                    torch.randint(0, 2, (batch, 14)).float(),
                )
                batches = itertools.repeat((fixed[0].to(device), fixed[1].to(device)))
            else:
                loader, sampler = split_loader(
                    stream, Preprocess(args.image_size), batch_size=batch, workers=args.workers,
                    augment=Augment(), reader=cache.reader(stream),
                    pin_memory=device.type == "cuda",
                )  # fmt: skip

                def forever(loader=loader, sampler=sampler):
                    for epoch in itertools.count():
                        sampler.set_epoch(epoch)
                        for images, targets, _ in loader:
                            yield images, targets

                batches = forever()
            try:
                rate = measure(trainer, batches, args.steps)
            except torch.OutOfMemoryError:
                rate = float("nan")
            # Drop this row's model and DataLoader (its persistent workers) before the next.
            trainer = batches = loader = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append((batch, compiled, amp, channels_last, source, rate))
            print(
                f"batch {batch:4d}  {'compile' if compiled else 'eager  '}  "
                f"{'AMP ' if amp else 'fp32'}  {'NHWC' if channels_last else 'NCHW'}  "
                f"{source:6s}  {rate:9.1f} images/s",
                flush=True,
            )
            if args.json:
                write_json(args.json, name, args, rows)
    print("\n| batch | compile | precision | layout | input | images/s |")
    print("|---:|---|---|---|---|---:|")
    for batch, compiled, amp, channels_last, source, rate in rows:
        print(
            f"| {batch} | {'yes' if compiled else 'no'} | {'AMP' if amp else 'fp32'} | "
            f"{'channels_last' if channels_last else 'channels_first'} | {source} | {rate:.1f} |"
        )
    return 0


def write_json(path: Path, device_name: str, args, rows) -> None:
    keys = ("batch", "compile", "amp", "channels_last", "input", "images_per_s")
    record = {
        "device": device_name,
        "torch": torch.__version__,
        "image_size": args.image_size,
        "steps": args.steps,
        "workers": args.workers,
        "rows": [dict(zip(keys, row)) for row in rows],
    }
    path.write_text(json.dumps(record, indent=1, allow_nan=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
