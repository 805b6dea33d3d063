"""Cache build images/s per worker vs the bare decode + resize of the same files.

The bare loop decodes and resizes every file in this process and keeps nothing; the build
does the same work through ``build_cache`` (worker processes, memory-mapped writes, progress
records, validation). Per worker, the two should be close: the gap is the cache's overhead.

    python benchmarks/cache_build.py [--images 264] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from cxr.data.cache import build_cache, cache_image
from cxr.data.layouts.nih import load_nih
from cxr.data.schema import PATH_COLUMN

NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="first N of the 264 images")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    table = load_nih(NIH / "images.csv", image_root=NIH / "images").table
    table = table.iloc[: args.images] if args.images else table
    paths = table[PATH_COLUMN].tolist()
    for path in paths:  # page cache warm for everyone
        Path(path).read_bytes()
    print(f"{len(paths)} real 1024x1024 NIH PNGs -> {args.image_size} px; {os.cpu_count()} CPUs")
    started = time.perf_counter()
    for path in paths:
        cache_image(path, args.image_size)
    bare = len(paths) / (time.perf_counter() - started)
    print(f"bare decode + resize (1 process):  {bare:7.1f} images/s")
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            build_cache(table, Path(folder) / "c", image_size=args.image_size, workers=workers)
            rate = len(paths) / (time.perf_counter() - started)
        print(
            f"cache build, {workers} worker(s):      {rate:7.1f} images/s = "
            f"{rate / workers:6.1f} per worker, {rate / workers / bare:5.2f}x the bare loop"
        )


if __name__ == "__main__":
    main()
