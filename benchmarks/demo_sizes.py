"""The demo's pipeline at other sizes: test AUROC and the Grad-CAM pointing game.

Runs :func:`cxr.workflows.demo.run_demo` (synthetic data, split, training from scratch, calibration,
evaluation, localisation, report) with the CPU demo's settings except those given, then
prints the mean test AUROC, the pointing game with the localisation's ``--shifts`` and the
wall time. For measuring how resolution, data and epochs move the pointing game.

    python benchmarks/demo_sizes.py OUT [--image-size 224] [--synth-size 256]
        [--patients 1000] [--epochs 14] [--shifts 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from cxr.workflows.demo import DemoSettings, demo_settings, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--synth-size", type=int, default=160)
    parser.add_argument("--patients", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--shifts", type=int, default=1)
    args = parser.parse_args()

    base = demo_settings(quick=False)
    settings = DemoSettings(
        patients=args.patients,
        synth_image_size=args.synth_size,
        train=dataclasses.replace(base.train, image_size=args.image_size, max_epochs=args.epochs),
        localize_shifts=args.shifts,
    )
    started = time.perf_counter()
    result = run_demo(
        args.out,
        settings=settings,
        on_stage=lambda stage: print(f"[{time.perf_counter() - started:6.0f} s] {stage}"),
    )
    overall = result["localization"]["overall"]
    print(f"mean test AUROC {result['evaluation']['auroc_mean']:.3f}")
    print(
        f"pointing game ({overall['findings']} findings, --shifts {args.shifts}): "
        f"{overall['pointing_hit_rate']:.3f} inside the box, "
        f"{overall['pointing_hit_rate_tolerant']:.3f} within 16 px"
    )
    print(f"{time.perf_counter() - started:.0f} s wall")


if __name__ == "__main__":  # the synthetic data's worker processes re-import this module
    main()
