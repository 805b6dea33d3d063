"""onnxruntime vs PyTorch eager for DenseNet121 on this CPU, same batch; and their agreement.

    python benchmarks/onnx_vs_torch.py [--batch-size 16] [--size 224] [--repeats 3] [--model RUN]

Prints images/s of each backend on the same ready batch (after one warm-up), the ratio
onnx/torch, and the max absolute probability difference on real images from ../shared/data
(the bar is 1e-4). The faster of the two is `cxr predict`'s CPU default when they agree.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def speed(run, batch: torch.Tensor, repeats: int) -> float:
    run(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return len(batch) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()

    from support.media import untrained_bundle

    from cxr.data.files import find_images
    from cxr.engine.inference import load_predictor, predict_files
    from cxr.model.onnx import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = untrained_bundle(Path(tmp) / "bundle", args.size)
        export_onnx(model, Path(tmp) / "model.onnx")
        eager = load_predictor(model, backend="torch", device="cpu")
        onnx = load_predictor(Path(tmp) / "model.onnx", backend="onnx")
        size = eager.image_size
        batch = torch.randn(args.batch_size, 3, size, size)
        print(
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{size} px, batch {args.batch_size}, median of {args.repeats}"
        )
        torch_speed = speed(eager.logits, batch, args.repeats)
        onnx_speed = speed(onnx.logits, batch, args.repeats)
        files = find_images([SHARED / "misc"]).files
        files += sorted((SHARED / "nih" / "images").glob("*.png"))[:16]
        a = predict_files(eager, files, batch_size=args.batch_size, workers=0)
        b = predict_files(onnx, files, batch_size=args.batch_size, workers=0)
        difference = float(np.abs(a.probabilities - b.probabilities).max())
    print(f"torch eager  : {torch_speed:7.2f} images/s")
    print(f"onnxruntime  : {onnx_speed:7.2f} images/s")
    print(f"ratio onnx/torch: {onnx_speed / torch_speed:.2f}x")
    print(f"max |p_onnx - p_torch| on {len(files)} real images: {difference:.1e} (bar 1e-4)")


if __name__ == "__main__":
    main()
