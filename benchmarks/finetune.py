"""Fine-tuning from an NIH run against training from scratch, on a SYNTHETIC CheXpert-layout set.

    python benchmarks/finetune.py --nih-run runs/demo-.../run      # an existing NIH demo run
    python benchmarks/finetune.py                                  # makes one with `cxr demo`

Both runs see the same split of the same synthetic CheXpert-layout data, with the same
settings and number of epochs; only their starting weights differ (random vs the NIH run's
bundle, whose outputs for the same findings keep their weights). It prints the test AUROC of
each, per label and the mean, and their difference, all measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CXR = [sys.executable, "-m", "cxr"]


def run(*args: str) -> None:
    print("$ cxr " + " ".join(args), flush=True)
    subprocess.run([*CXR, *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nih-run", type=Path, help="An NIH run (default: a new `cxr demo`).")
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="Work folder (default: a temporary one).")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="cxr-finetune-"))
    work.mkdir(parents=True, exist_ok=True)
    nih_run = args.nih_run
    if nih_run is None:
        run("demo", "--out", str(work / "nih-demo"), "--device", "cpu")
        nih_run = work / "nih-demo" / "run"
    image_size = json.loads((nih_run / "model.json").read_text())["image_size"]
    data = work / "chexpert"
    run("data", "synth", "--out", str(data), "--layout", "chexpert",
        "--patients", str(args.patients), "--image-size", str(image_size),
        "--seed", str(args.seed))  # fmt: skip
    run("data", "split", str(data), "--out", str(work / "split"), "--seed", str(args.seed))
    common = ["--split", str(work / "split"), "--image-size", str(image_size),
              "--max-epochs", str(args.epochs), "--lr", str(args.lr), "--seed", str(args.seed),
              "--device", "cpu"]  # fmt: skip
    results, seconds = {}, {}
    for name, weights in (("scratch", "none"), ("fine-tuned", str(nih_run))):
        folder = work / name
        started = time.perf_counter()
        run("train", str(data), "--out", str(folder), "--weights", weights, *common)
        seconds[name] = time.perf_counter() - started
        run("evaluate", str(folder), "--device", "cpu")
        results[name] = json.loads((folder / "metrics.json").read_text())["test"]
    kept = json.loads((work / "fine-tuned" / "run.json").read_text())["init"]["kept"]
    print(f"\nSYNTHETIC CheXpert layout, {args.patients} patients, {image_size} px, "
          f"{args.epochs} epochs, lr {args.lr}; fine-tuned from {nih_run}")  # fmt: skip
    print(f"NIH outputs kept for: {', '.join(f'{k} <- {v}' for k, v in kept.items())}")
    print(f"{'label':28} {'scratch':>8} {'fine-tuned':>10}")
    for label, entry in results["scratch"]["per_class"].items():
        tuned = results["fine-tuned"]["per_class"][label]["auroc"]
        print(f"{label:28} {_fmt(entry['auroc']):>8} {_fmt(tuned):>10}")
    scratch, tuned = results["scratch"]["auroc_mean"], results["fine-tuned"]["auroc_mean"]
    print(f"{'mean':28} {_fmt(scratch):>8} {_fmt(tuned):>10}")
    print(
        f"fine-tuned - scratch: {tuned - scratch:+.3f} mean test AUROC; training took "
        f"{seconds['scratch']:.0f} s and {seconds['fine-tuned']:.0f} s; work folder {work}"
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
