"""Training images/s of cxr's epoch against the bare step of the same network, in one run.

The bare step is DenseNet121's forward + weighted BCE + backward + SGD on one batch already
in memory, with the precision and memory layout cxr chooses on this machine (bf16 autocast
where the CPU computes it, channels_last): nothing else. cxr's epoch is
:func:`cxr.engine.trainer.train_one_epoch` over the training loader that ``cxr train`` builds
(:func:`cxr.workflows.train._loaders`): the demo's way by default (synthetic images in the
uint8 cache, augmented in this process, no worker processes), ``--workers N`` for worker
processes, ``--no-cache`` to decode the PNGs every epoch. Validation is timed the same way:
:func:`cxr.engine.trainer.validate` against a bare float32 forward pass under
``inference_mode`` at the validation batch. Measurements alternate (bare, epoch, bare, ...)
so that a change in the machine's load hits both alike; on a shared machine, run it twice.
``--layout`` also times the bare step in the other memory layout (channels_last or not).

    python benchmarks/train_throughput.py [--image-size 96] [--images 160] [--rounds 3]
        [--workers 0] [--no-cache] [--layout] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxr.data.cache import build_cache
from cxr.data.datasets import label_matrix
from cxr.data.layouts.nih import load_nih
from cxr.data.synthetic import write_synthetic_dataset
from cxr.engine.trainer import TrainCallbacks, Trainer, train_one_epoch, validate
from cxr.model.loss import WeightedBCELoss
from cxr.model.network import build_model
from cxr.runtime import Distributed, mixed_precision
from cxr.workflows.demo import demo_settings
from cxr.workflows.train import _loaders


def bare_step(config, labels: np.ndarray, image_size: int, channels_last: bool):
    """The bare training step on one in-memory batch: (step function, batch size)."""
    model = build_model()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp, dtype = mixed_precision(config.amp, torch.device("cpu"))
    loss_fn = WeightedBCELoss.from_labels(labels)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=1e-4
    )
    images = torch.randn(config.batch_size, 3, image_size, image_size)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.from_numpy(labels[: config.batch_size])
    model.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=amp):
            logits = model(images)
        loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocator and oneDNN kernel selection
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--images", type=int, default=160, help="training images per epoch")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="decode the PNGs every epoch")
    parser.add_argument("--layout", action="store_true", help="also the other memory layout")
    parser.add_argument("--threads", type=int, help="PyTorch threads (default: one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = demo_settings(quick=False).train
    config = dataclasses.replace(base, image_size=args.image_size, workers=args.workers)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data"
        patients = max(24, int(args.images / 2.8 * 1.6))
        write_synthetic_dataset(data, patients=patients, image_size=args.image_size + 32)
        table = load_nih(data).table.reset_index(drop=True)
        if not args.no_cache:
            cache = build_cache(table, Path(folder) / "cache", image_size=args.image_size + 32)
            config = dataclasses.replace(config, cache=str(cache.path), workers=args.workers)
        train, val = table.iloc[: args.images], table.iloc[args.images :]
        train_labels, val_labels = label_matrix(train), label_matrix(val)
        device = torch.device("cpu")
        trainer = Trainer.create(build_model(), config, train_labels, device)
        loaders, _ = _loaders(
            config, (train, train_labels), (val, val_labels), Distributed(), device
        )
        train_loader, sampler, val_loader = loaders
        callbacks = TrainCallbacks()
        steps = {
            "bare step": bare_step(config, train_labels, args.image_size, config.channels_last)
        }
        if args.layout:
            other = "NCHW" if config.channels_last else "channels_last"
            steps[f"bare step, {other}"] = bare_step(
                config, train_labels, args.image_size, not config.channels_last
            )
        batches = len(train_loader)
        model = build_model().eval()
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        forward_batch = torch.randn(2 * config.batch_size, 3, args.image_size, args.image_size)

        def bare_forward() -> None:
            with torch.inference_mode():
                model(forward_batch)

        bare_forward()
        train_one_epoch(trainer, train_loader, sampler, 0, 1, callbacks)  # warm-up
        print(
            f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads); DenseNet121 at {args.image_size} px, batch {config.batch_size}, "
            f"{trainer.precision}, channels_last {config.channels_last}; epoch of {len(train)} "
            f"images ({'PNG decode' if args.no_cache else 'uint8 cache'}, workers "
            f"{args.workers}); validation of {len(val)} images; {args.rounds} rounds; load "
            f"{os.getloadavg()[0]:.2f}"
        )
        seconds: dict[str, float] = dict.fromkeys(
            [*steps, "cxr epoch", "bare forward", "cxr validation"], 0.0
        )
        forwards = -(-len(val) // (2 * config.batch_size))
        for epoch in range(1, args.rounds + 1):
            for name, step in steps.items():
                started = time.perf_counter()
                for _ in range(batches):
                    step()
                seconds[name] += time.perf_counter() - started
            started = time.perf_counter()
            train_one_epoch(trainer, train_loader, sampler, epoch, args.rounds + 1, callbacks)
            seconds["cxr epoch"] += time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(forwards):
                bare_forward()
            seconds["bare forward"] += time.perf_counter() - started
            started = time.perf_counter()
            validate(trainer, val_loader, val_labels)
            seconds["cxr validation"] += time.perf_counter() - started
    trained = args.rounds * batches * config.batch_size
    rates = {name: trained / seconds[name] for name in steps}
    rates["cxr epoch"] = args.rounds * len(train) / seconds["cxr epoch"]
    validated = args.rounds * forwards * 2 * config.batch_size
    rates["bare forward"] = validated / seconds["bare forward"]
    rates["cxr validation"] = args.rounds * len(val) / seconds["cxr validation"]
    for name, rate in rates.items():
        print(f"{name:28s} {rate:8.2f} images/s")
    print(f"{'epoch / bare step':28s} {rates['cxr epoch'] / rates['bare step']:8.3f}")
    print(
        f"{'validation / bare forward':28s} {rates['cxr validation'] / rates['bare forward']:8.3f}"
    )
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":  # the synthetic data's worker processes re-import this module
    main()
