"""Every architecture of the registry on the demo data, in one run: training and inference
images per second and test AUROC.

Each architecture is trained from random weights (no ImageNet weights can be downloaded on
this machine; ``--weights imagenet`` uses them where timm's cache has them) with the same
data, split, seed and options; training images/s is the training split's images times the
epochs over the wall time of ``cxr.train`` (so it includes each epoch's validation and the
run's bookkeeping, the same for every architecture), inference images/s is
``Predictor.probabilities`` (PyTorch, eager, float32) on a batch of the test split already
preprocessed, best of three, after one untimed warm-up training. The demo data is SYNTHETIC:
the AUROCs say that each backbone learns through cxr's pipeline, not how well it reads
radiographs.

    python benchmarks/backbones.py [--image-size 64] [--epochs 2] [--patients 60]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import cxr
from cxr.data.images import decode_gray
from cxr.data.synthetic import write_synthetic_dataset
from cxr.engine.inference import load_predictor
from cxr.model.registry import ARCHITECTURES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--weights", default="none")
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic_dataset(data, patients=args.patients, image_size=args.image_size, seed=0)
        dataset = cxr.open_dataset(data)
        split = dataset.split(val_fraction=0.2, test_fraction=0.3, seed=0)
        # One untimed run first: the first training of a process pays one-time costs (lazy
        # imports, allocator and thread-pool warm-up) that would be charged to one backbone.
        cxr.train(
            dataset, out=Path(tmp) / "warm-up", split=split, arch="resnet18", weights="none",
            image_size=args.image_size, batch_size=args.batch_size, max_epochs=1,
            device="cpu", workers=0, amp=False, seed=0,
        )  # fmt: skip
        for name in args.archs.split(","):
            out = Path(tmp) / name
            start = time.perf_counter()
            run = cxr.train(
                dataset, out=out, split=split, arch=name, weights=args.weights,
                image_size=args.image_size, batch_size=args.batch_size,
                max_epochs=args.epochs, device="cpu", workers=0, amp=False, seed=0,
            )  # fmt: skip
            train_s = time.perf_counter() - start
            train_images = len(run.split("train")) * args.epochs
            evaluation = run.evaluate("test", device="cpu")
            predictor = load_predictor(out, backend="torch", device="cpu")
            paths = run.split("test")["path"].head(32).tolist()
            batch = torch.stack([predictor.preprocess(decode_gray(p)) for p in paths])
            best = float("inf")
            for _ in range(3):
                tick = time.perf_counter()
                predictor.probabilities(batch)
                best = min(best, time.perf_counter() - tick)
            rows.append((name, train_images / train_s, len(paths) / best, evaluation.mean_auroc))
            print(f"{name}: done", flush=True)
    base = rows[0]
    print(f"\n{args.image_size} px, {args.epochs} epochs, batch {args.batch_size}, CPU threads "
          f"{torch.get_num_threads()}, weights {args.weights}\n")  # fmt: skip
    print("| architecture | train img/s | vs densenet121 | inference img/s | vs densenet121 "
          "| test mean AUROC |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name, train, infer, auroc in rows:
        print(f"| {name} | {train:.1f} | {train / base[1]:.2f}x | {infer:.1f} | "
              f"{infer / base[2]:.2f}x | {auroc:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
