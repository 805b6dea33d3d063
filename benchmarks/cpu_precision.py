"""DenseNet121 training step on the CPU: float32 vs channels_last vs bf16 autocast.

`cxr train` on a CPU turns on bf16 autocast where the CPU computes bfloat16 in hardware
(AVX512-BF16 or AMX) and keeps the model channels_last; this measures what each part gives.
Measurements alternate between the variants, round after round, so a change in the machine's
load hits all of them alike; the ratios are to float32 in the same run.

    python benchmarks/cpu_precision.py [--image-size 160] [--steps 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from cxr.model.loss import WeightedBCELoss
from cxr.model.network import build_model
from cxr.runtime import cpu_has_native_bf16

VARIANTS = {
    "float32": (False, False),
    "float32 channels_last": (False, True),
    "bf16 autocast": (True, False),
    "bf16 autocast channels_last (cxr's CPU default)": (True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements")
    args = parser.parse_args()

    print(
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"native bf16: {cpu_has_native_bf16()}; DenseNet121 at {args.image_size} px, "
        f"batch {args.batch_size}; {args.rounds} x {args.steps} timed steps each"
    )
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    targets = (torch.rand(args.batch_size, 14) < 0.2).float()
    loss_fn = WeightedBCELoss.from_labels(targets.numpy())
    steps = {}
    for name, (bf16, channels_last) in VARIANTS.items():
        model = build_model()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        batch = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()

        def step(model=model, batch=batch, optimizer=optimizer, bf16=bf16) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(batch)
            loss = loss_fn(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step()  # warm-up: allocator and oneDNN kernel selection
        steps[name] = step
    seconds = dict.fromkeys(VARIANTS, 0.0)
    for _ in range(args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            seconds[name] += time.perf_counter() - started
    count = args.rounds * args.steps * args.batch_size
    base = count / seconds["float32"]
    for name, spent in seconds.items():
        rate = count / spent
        print(f"{name:48s} {rate:7.2f} images/s  {rate / base:5.2f}x float32")


if __name__ == "__main__":
    main()
