"""How long `import cxr`, `import cxr.cli` and a notebook's imports take, against torch alone.

    python benchmarks/import_time.py [--runs 7]

Each figure is the median wall time of N fresh interpreters (`python -c "import X"`), so
nothing is cached in the process; the interpreter's own start (`python -c pass`) is
measured too and subtracted. Goal (issue 23): `import cxr` under 1 s. `import cxr.cli` is
what every `cxr` command pays before it runs (`cxr --help` too); the notebook line imports
training, evaluation, prediction and Grad-CAM, which need torch, so it is compared with
`import torch`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "python -c pass": "pass",
    "import cxr": "import cxr",
    "import cxr.cli": "import cxr.cli",
    "import torch": "import torch",
    "a notebook's imports": (
        "import cxr.workflows.train, cxr.workflows.evaluate, cxr.engine.inference, "
        "cxr.explain.gradcam, cxr.model.bundle"
    ),
}


def seconds(code: str, runs: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    results = {name: seconds(code, args.runs) for name, code in CASES.items()}
    start = results.pop("python -c pass")
    torch_s = results["import torch"] - start
    print(f"median of {args.runs} fresh interpreters; interpreter start {start:.3f} s subtracted")
    for name, total in results.items():
        own = total - start
        print(f"{name:<24} {own:7.3f} s   {own / torch_s:5.2f} x import torch")


if __name__ == "__main__":
    main()
