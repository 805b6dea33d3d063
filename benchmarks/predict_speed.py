"""`cxr predict` throughput vs the bare model forward at the same batch size, on this CPU.

    python benchmarks/predict_speed.py [--images 64] [--batch-size 16] [--backend auto]
                                       [--workers N] [--model RUN]

Goal: predict_files (decode PNG -> resize/crop -> normalise in DataLoader workers, then the
model) within 10 % of the bare forward: decoding must overlap compute, not add to it. Images
are real 1024x1024 NIH PNGs from ../shared/data/nih/images; weights are random unless --model
is given (speed does not depend on them). The bare forward is the same predictor's backend
on a ready tensor, so both sides use the same backend and thread settings.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from support.media import untrained_bundle

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "data" / "nih" / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()

    from cxr.data.loaders import default_workers
    from cxr.engine.inference import load_predictor, predict_files

    files = sorted(IMAGES.glob("*.png"))[: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or untrained_bundle(Path(tmp) / "bundle", args.size)
        predictor = load_predictor(model, backend=args.backend, device="cpu", cache_dir=tmp)
        size, batch = predictor.image_size, args.batch_size
        workers = default_workers() if args.workers is None else args.workers
        print(
            f"backend {predictor.backend}, {size} px, batch {batch}, {len(files)} NIH PNGs, "
            f"{workers} decode worker(s), torch threads {torch.get_num_threads()}"
        )
        images = torch.randn(batch, 3, size, size)
        predictor.logits(images)  # warm-up
        start = time.perf_counter()
        for _ in range(-(-len(files) // batch)):
            predictor.logits(images)
        bare = (-(-len(files) // batch) * batch) / (time.perf_counter() - start)
        predict_files(predictor, files[:batch], batch_size=batch, workers=workers)  # warm-up
        start = time.perf_counter()
        result = predict_files(predictor, files, batch_size=batch, workers=workers)
        piped = len(result.files) / (time.perf_counter() - start)
        assert not result.errors, result.errors
    print(f"bare forward : {bare:7.2f} images/s")
    print(f"cxr predict  : {piped:7.2f} images/s  ({100 * piped / bare:.0f} % of bare)")


if __name__ == "__main__":
    main()
