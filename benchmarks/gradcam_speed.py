"""Grad-CAM for all 14 pathologies of one image: cxr.explain.gradcam vs captum on the full model.

    python benchmarks/gradcam_speed.py [--size 224] [--repeats 5] [--bundle RUN] [--shifts 1 2 4]

Goal: under 2 s on a 2-core CPU for one 224 px image. cxr.explain.gradcam runs the backbone
once under no_grad and differentiates only the head; the baseline is captum's LayerGradCam
hooked on ``model.features`` of the whole model, which repeats the backbone's forward (and
keeps its graph) for each of the 14 classes. Weights are random unless --bundle is given:
the speed does not depend on them. ``--shifts`` also times shift-and-stitch at those densities
(``cxr explain --shifts N``), as a ratio to the plain map measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up (allocator, oneDNN kernels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bundle", default=None, help="a run folder or bundle (default: random)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--shifts", type=int, nargs="*", default=[], help="also time these")
    args = parser.parse_args()

    from captum.attr import LayerGradCam

    from cxr.explain.gradcam import gradcam
    from cxr.model.bundle import load_bundle
    from cxr.model.network import build_model

    torch.manual_seed(0)
    model = load_bundle(args.bundle).model if args.bundle else build_model()
    model.eval()
    image = torch.randn(1, 3, args.size, args.size)
    classes = list(range(14))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size} px, CPU")

    ours = timed(lambda: gradcam(model, image, classes), args.repeats)
    print(
        f"cxr.explain.gradcam, 14 classes: median {statistics.median(ours):.3f} s "
        f"(min {min(ours):.3f}, max {max(ours):.3f}, {args.repeats} runs)"
    )
    for shifts in args.shifts:
        stitched = timed(lambda n=shifts: gradcam(model, image, classes, shifts=n), args.repeats)
        print(
            f"  --shifts {shifts} (map every {32 // shifts} px): median "
            f"{statistics.median(stitched):.3f} s, "
            f"{statistics.median(stitched) / statistics.median(ours):.1f}x the plain map"
        )
    if not args.skip_baseline:
        layer_cam = LayerGradCam(model, model.features)

        def baseline():
            return layer_cam.attribute(
                image.repeat(14, 1, 1, 1), target=classes, relu_attributions=True
            )

        theirs = timed(baseline, max(1, args.repeats // 2))
        print(
            f"captum LayerGradCam on the full model (batch of 14): median "
            f"{statistics.median(theirs):.3f} s (min {min(theirs):.3f})"
        )


if __name__ == "__main__":
    main()
