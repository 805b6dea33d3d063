"""Input pipeline images/s: raw PNG decoding vs the memory-mapped cache.

Both pipelines run the same training transforms (random scale, flip, centre crop, ImageNet
normalisation, 3 channels) through the same DataLoader settings (workers, batch, prefetch,
persistent workers); only where the grayscale array comes from differs. The cache is built
once (untimed) in a temporary folder; each pipeline gets one untimed warm-up epoch (worker
start, page cache), then ``--epochs`` timed epochs.

    python benchmarks/input_pipeline.py [--workers 2] [--images 264]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from cxr.data.cache import build_cache, open_cache
from cxr.data.layouts.nih import load_nih
from cxr.data.loaders import split_loader
from cxr.data.transforms import Augment, Preprocess

NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih"


def sample_table(images: int | None):
    table = load_nih(NIH / "images.csv", image_root=NIH / "images").table
    return table.iloc[:images] if images else table


def images_per_second(table, args, reader=None) -> float:
    """Through the training loader cxr trains with (:func:`cxr.data.loaders.split_loader`)."""
    loader, sampler = split_loader(
        table,
        Preprocess(args.image_size),
        batch_size=args.batch_size,
        workers=args.workers,
        augment=Augment(),
        reader=reader,
    )
    for _ in loader:  # warm-up epoch
        pass
    seen, started = 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        for images, _targets, _indices in loader:
            seen += len(images)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=None, help="first N of the 264 images")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--cache-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    table = sample_table(args.images)
    print(
        f"{len(table)} real NIH PNGs (1024x1024) from {NIH / 'images'}; {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}; "
        f"workers {args.workers}, batch {args.batch_size}, {args.image_size} px, "
        f"{args.epochs} timed epochs"
    )
    with tempfile.TemporaryDirectory() as folder:
        cache = open_cache(
            build_cache(table, Path(folder) / "cache", image_size=args.cache_size).path
        )
        png = images_per_second(table, args)
        cached = images_per_second(table, args, reader=cache.reader(table))
    print(f"raw PNG pipeline:        {png:8.1f} images/s")
    print(f"cache pipeline ({args.cache_size} px): {cached:8.1f} images/s")
    print(f"ratio cache / PNG:       {cached / png:8.2f}x")


if __name__ == "__main__":
    main()
