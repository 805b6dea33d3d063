"""GPU training images/s at 224 px: batch 64..256, fp32 vs AMP, channels-first vs -last,
eager vs ``torch.compile``, on in-memory tensors and through the cache pipeline.

Needs a CUDA device; on a CPU-only machine it says so and exits with status 2.

    python benchmarks/gpu.py [--batches 64 128 256] [--steps 20] [--workers 8]
                             [--no-compile] [--images 264]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih"


def measure(trainer, batches, steps) -> float:
    """Images/s of ``steps`` of the project's own training step (:meth:`Trainer.step`) after
    3 warm-up steps (compilation, autotuning)."""
    seen = 0
    for index in range(steps + 3):
        if index == 3:
            torch.cuda.synchronize()
            started = time.perf_counter()
            seen = 0
        images, targets = next(batches)
        trainer.step(images, targets)
        seen += len(images)
    torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=None, help="first N of the 264 images")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; none is available here (CPU only).")
        return 2

    from cxr.config import TrainConfig
    from cxr.data.cache import build_cache, open_cache
    from cxr.data.loaders import split_loader
    from cxr.data.nih import label_matrix, load_nih
    from cxr.data.transforms import Augment, Preprocess
    from cxr.engine.trainer import Trainer
    from cxr.model.network import build_model

    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    table = load_nih(NIH / "images.csv", image_root=NIH / "images").table
    table = table.iloc[: args.images] if args.images else table
    labels = label_matrix(table)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.image_size} px")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        cache = open_cache(build_cache(table, Path(folder) / "cache", image_size=256).path)
        compiles = [False] if args.no_compile else [False, True]
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
                    table, Preprocess(args.image_size), batch_size=batch, workers=args.workers,
                    augment=Augment(), reader=cache.reader(table), pin_memory=True,
                )  # fmt: skip
                if len(loader) == 0:
                    continue

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
            torch.cuda.empty_cache()
            rows.append((batch, compiled, amp, channels_last, source, rate))
            print(
                f"batch {batch:4d}  {'compile' if compiled else 'eager  '}  "
                f"{'AMP ' if amp else 'fp32'}  {'NHWC' if channels_last else 'NCHW'}  "
                f"{source:6s}  {rate:9.1f} images/s",
                flush=True,
            )
    print("\n| batch | compile | precision | layout | input | images/s |")
    print("|---:|---|---|---|---|---:|")
    for batch, compiled, amp, channels_last, source, rate in rows:
        print(
            f"| {batch} | {'yes' if compiled else 'no'} | {'AMP' if amp else 'fp32'} | "
            f"{'channels_last' if channels_last else 'channels_first'} | {source} | {rate:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
