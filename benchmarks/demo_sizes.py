"""The demo's pipeline at one row of its settings table: test AUROC, pointing game, seconds.

Runs :func:`cxr.workflows.demo.run_demo` (synthetic data, the cache, split, training from
scratch, calibration, evaluation, localisation, report) at the settings given (``--size``, a
row of :data:`cxr.workflows.demo.DEMO_SIZES`, or each setting by hand), then prints the mean
test AUROC, the pointing game with the localisation's ``--shifts``, the wall time of each
stage and in all, what the demo's cost model predicted from a throughput timed at the start
(as ``cxr demo`` does), and the machine's load (a shared machine's times are not a quiet
one's). ``--json`` keeps it all. The rows of ``DEMO_SIZES`` and the cost constants in
:mod:`cxr.workflows.demo` come from these runs (benchmarks/README.md).

    python benchmarks/demo_sizes.py OUT [--size 96px-10ep] [--image-size 96] [--synth-size 128]
        [--patients 400] [--epochs 10] [--shifts 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from cxr.workflows.demo import (
    DEMO_SIZES,
    DemoSize,
    estimate_seconds,
    measure_throughput,
    run_demo,
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--size", choices=[size.name for size in DEMO_SIZES])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--synth-size", type=int, default=160)
    parser.add_argument("--patients", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--shifts", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--threads",
        type=int,
        help="PyTorch threads (default: one per core); 1 on a crowded machine, where two "
        "threads wait on each other (the test AUROC may move in the third decimal)",
    )
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    if args.size:
        size = next(size for size in DEMO_SIZES if size.name == args.size)
    else:
        size = DemoSize(
            f"{args.image_size}px-{args.epochs}ep-{args.patients}p",
            args.patients,
            args.image_size,
            args.epochs,
            args.synth_size,
            args.shifts,
        )
    settings = size.settings()
    load_before = os.getloadavg()
    started = time.perf_counter()
    throughput = measure_throughput(settings.train, "cpu")
    predicted = estimate_seconds(size, throughput)
    print(
        f"{cpu_model()}, {os.cpu_count()} CPUs, {torch_threads()} threads; load "
        f"{load_before[0]:.2f}; settings {size.name}: "
        f"{size.patients} patients, {size.image_size} px, {size.epochs} epochs, "
        f"--shifts {size.localize_shifts}; timed {throughput.train:.1f} train / "
        f"{throughput.infer:.1f} inference images/s at {throughput.image_size} px; "
        f"predicted {predicted['total']:.0f} s"
    )
    stages: list[tuple[str, float]] = [("timing the first steps", 0.0)]

    def on_stage(stage: str) -> None:
        stages.append((stage, time.perf_counter() - started))
        print(f"[{stages[-1][1]:6.0f} s] {stage}", flush=True)

    result = run_demo(args.out, settings=settings, on_stage=on_stage)
    wall = time.perf_counter() - started
    ends = [at for _, at in stages[1:]] + [wall]
    spent = {stage: end - at for (stage, at), end in zip(stages, ends)}
    overall = result["localization"]["overall"]
    history = result["train_state"].history
    summary = {
        "size": size.name,
        "patients": size.patients,
        "image_size": size.image_size,
        "synth_image_size": size.synth_image_size,
        "epochs": size.epochs,
        "shifts": size.localize_shifts,
        "images": result["synthetic"].images if hasattr(result["synthetic"], "images") else None,
        "test_auroc": result["evaluation"]["auroc_mean"],
        "pointing": overall["pointing_hit_rate"],
        "pointing_tolerant": overall["pointing_hit_rate_tolerant"],
        "findings": overall["findings"],
        "seconds": wall,
        "predicted": predicted,
        "throughput": {"train": throughput.train, "infer": throughput.infer},
        "stages": spent,
        "epochs_run": len(history),
        "epoch_seconds": [round(record["seconds"], 1) for record in history],
        "train_images_per_s": [round(record["images_per_s"], 1) for record in history],
        "cpu": cpu_model(),
        "threads": torch_threads(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    print(f"mean test AUROC {summary['test_auroc']:.3f}")
    print(
        f"pointing game ({overall['findings']} findings, --shifts {size.localize_shifts}): "
        f"{overall['pointing_hit_rate']:.3f} inside the box, "
        f"{overall['pointing_hit_rate_tolerant']:.3f} within 16 px"
    )
    for stage, seconds in spent.items():
        print(f"  {seconds:6.1f} s  {stage}")
    print(f"epochs: {summary['epoch_seconds']} s; train images/s {summary['train_images_per_s']}")
    print(
        f"{wall:.0f} s wall (predicted {predicted['total']:.0f} s: "
        + ", ".join(f"{k} {v:.0f}" for k, v in predicted.items() if k != "total")
        + f"); load {load_before[0]:.2f} before, {summary['load_after'][0]:.2f} after"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(summary, file, indent=2, default=str)


if __name__ == "__main__":  # the synthetic data's worker processes re-import this module
    main()
