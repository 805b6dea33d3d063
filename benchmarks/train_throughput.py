"""Training images/s through the input pipeline vs the bare model step on in-memory tensors.

The bare step is the training loop's own step (:meth:`cxr.engine.trainer.Trainer.step`:
DenseNet121 forward, weighted BCE, backward, SGD; float32 here) on one batch already in
memory; the pipeline run feeds the same step from cxr's training loader over the
memory-mapped cache with the training transforms. The gap is the input pipeline's cost.
Measurements alternate (bare, pipeline, bare, pipeline, ...) so that a change in the
machine's load hits both alike. ``--source png`` decodes the real 1024 px PNGs instead of
reading the cache (the pipeline of a run without ``--cache``).

    python benchmarks/train_throughput.py [--source cache|png] [--image-size 64] [--steps 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from cxr.config import TrainConfig
from cxr.data.cache import build_cache, open_cache
from cxr.data.datasets import label_matrix
from cxr.data.layouts.nih import load_nih
from cxr.data.loaders import split_loader
from cxr.data.transforms import Augment, Preprocess
from cxr.engine.trainer import Trainer
from cxr.model.network import build_model

NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("cache", "png"), default="cache")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=4, help="alternating measurements")
    args = parser.parse_args()

    torch.manual_seed(0)
    table = load_nih(NIH / "images.csv", image_root=NIH / "images").table
    labels = label_matrix(table)
    config = TrainConfig(batch_size=args.batch_size, amp=False, channels_last=False)
    trainer = Trainer.create(build_model(), config, labels, torch.device("cpu"))
    trainer.train_model.train()
    step = trainer.step

    print(
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"DenseNet121 at {args.image_size} px, batch {args.batch_size}, workers {args.workers}; "
        f"{args.rounds} x {args.steps} timed steps each"
    )
    with tempfile.TemporaryDirectory() as folder:
        reader = None
        if args.source == "cache":
            cache = open_cache(build_cache(table, Path(folder) / "cache", image_size=256).path)
            reader = cache.reader(table)
        loader, sampler = split_loader(
            table,
            Preprocess(args.image_size),
            batch_size=args.batch_size,
            workers=args.workers,
            augment=Augment(),
            reader=reader,
        )

        def batches():
            epoch = 0
            while True:
                sampler.set_epoch(epoch)
                yield from loader
                epoch += 1

        stream = batches()
        images, targets, _ = next(stream)  # starts the workers
        step(images, targets)  # warm-up (allocator, oneDNN kernels)
        fixed = (images.clone(), targets.clone())
        bare_time = pipe_time = 0.0
        for _ in range(args.rounds):
            started = time.perf_counter()
            for _ in range(args.steps):
                step(*fixed)
            bare_time += time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(args.steps):
                images, targets, _ = next(stream)
                step(images, targets)
            pipe_time += time.perf_counter() - started
    count = args.rounds * args.steps * args.batch_size
    bare, pipe = count / bare_time, count / pipe_time
    print(f"bare model step (in memory): {bare:8.2f} images/s")
    print(f"through the {args.source} pipeline: {pipe:8.2f} images/s")
    print(f"ratio pipeline / bare:       {pipe / bare:8.3f} ({(1 - pipe / bare):+.1%} slower)")


if __name__ == "__main__":
    main()
