"""Helpers of ``benchmarks/gpu_check.sh``.

    python benchmarks/gpu_check.py env [--dicom FILE] [--site DIR] [--require-cuda]
    python benchmarks/gpu_check.py demo-summary DEMO_OUT SUMMARY.json

``env`` prints what the machine has (Python, torch, CUDA, cuDNN, NCCL, the GPU, glibc,
cores), imports every module of cxr and the packages they import (which fails on the first
package the machine lacks and ``.whl/`` did not bring), decodes the JPEG-compressed DICOM
through cxr (pydicom + pylibjpeg's compiled decoder), and checks each carried wheel's
requirements against what is installed (a warning). Exit status 1 when an import or the
decode fails, or with ``--require-cuda`` when torch sees no GPU.

``demo-summary`` gathers a ``cxr demo`` folder's results into one JSON file: the settings,
per-epoch log (with seconds and images/s: what the GPU demo is sized from), test AUROC,
pointing game; whatever exists, so a demo stopped by its time limit still says how far it got.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

# The third-party packages cxr imports (module name -> distribution name).
PACKAGES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "numpy": "numpy",
    "pandas": "pandas",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "typer": "typer",
    "rich": "rich",
    "safetensors": "safetensors",
    "tensorboard": "tensorboard",
    "pydicom": "pydicom",
    "pylibjpeg": "pylibjpeg",
    "libjpeg": "pylibjpeg-libjpeg",
    "fastapi": "fastapi",
    "fastapi_offline": "fastapi-offline",
    "starlette": "starlette",
    "uvicorn": "uvicorn",
    "multipart": "python-multipart",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic-core",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "captum": "captum",
    "matplotlib": "matplotlib",
    "jinja2": "jinja2",
}


def machine() -> None:
    import torch

    print(f"python {sys.version.split()[0]} at {sys.executable}")
    print(f"platform {platform.platform()}, glibc {'.'.join(platform.libc_ver()[1:])}")
    print(f"cores available: {len(os.sched_getaffinity(0))}")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {cudnn}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(
            f"GPU {props.name}, compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"
        )
        nccl = getattr(torch.cuda, "nccl", None)
        print(f"NCCL {nccl.version() if nccl else 'n/a'}")
    else:
        print("GPU: none (torch.cuda.is_available() is False)")


def imports(site: Path | None) -> list[str]:
    problems = []
    for module, dist in PACKAGES.items():
        try:
            loaded = importlib.import_module(module)
        except Exception as exc:
            problems.append(f"import {module} ({dist}): {type(exc).__name__}: {exc}")
            continue
        where = Path(getattr(loaded, "__file__", "") or "?")
        carried = site is not None and site.resolve() in where.resolve().parents
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = "?"
        print(f"  {dist:18s} {version:12s} {'carried' if carried else 'machine'}")
    import cxr

    for info in pkgutil.walk_packages(cxr.__path__, "cxr."):
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            problems.append(f"import {info.name}: {type(exc).__name__}: {exc}")
    return problems


def carried_requirements(site: Path) -> list[str]:
    """Requirements of the carried distributions that the environment does not meet."""
    from packaging.requirements import Requirement

    problems = []
    for dist in metadata.distributions(path=[str(site)]):
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                installed = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{dist.metadata['Name']} needs {requirement}: not installed")
                continue
            if installed not in requirement.specifier:
                problems.append(f"{dist.metadata['Name']} needs {requirement}: has {installed}")
    return problems


def env(args) -> int:
    machine()
    site = Path(args.site) if args.site else None
    print("packages:")
    problems = imports(site)
    if site is not None and site.is_dir():
        # Reported, not fatal: the imports above and the tests say whether it works.
        for warning in carried_requirements(site):
            print(f"WARNING: {warning}")
    if args.dicom:
        from cxr.data.images import decode_gray

        started = time.perf_counter()
        try:
            gray = decode_gray(args.dicom)
            print(
                f"decoded {Path(args.dicom).name}: {gray.shape[1]}x{gray.shape[0]} "
                f"in {time.perf_counter() - started:.2f} s"
            )
        except Exception as exc:
            problems.append(f"decode {args.dicom}: {type(exc).__name__}: {exc}")
    if args.require_cuda:
        import torch

        if not torch.cuda.is_available():
            problems.append("CUDA is not available to torch")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("environment: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def demo_summary(args) -> int:
    out = Path(args.demo)
    run = out / "run"
    summary: dict = {"demo": str(out)}
    for name in ("config.json", "run.json"):
        path = run / name
        if path.is_file():
            summary[name.removesuffix(".json")] = json.loads(path.read_text())
    if (out / "data" / "Data_Entry_2017.csv").is_file():
        with open(out / "data" / "Data_Entry_2017.csv", newline="") as handle:
            summary["images"] = sum(1 for _ in csv.DictReader(handle))
    if (run / "log.csv").is_file():
        with open(run / "log.csv", newline="") as handle:
            keep = ("epoch", "train_loss", "val_loss", "val_auroc_mean", "lr", "images_per_s")
            keep += ("seconds", "best")
            summary["epochs"] = [
                {k: row[k] for k in keep if k in row} for row in csv.DictReader(handle)
            ]
    metrics = run / "metrics.json"
    if metrics.is_file():
        test = json.loads(metrics.read_text()).get("test", {})
        summary["test_auroc_mean"] = test.get("auroc_mean")
        summary["test_images"] = test.get("images")
    localization = run / "localization.json"
    if localization.is_file():
        values = json.loads(localization.read_text())
        summary["localization"] = {
            k: values.get(k) for k in ("split", "shifts", "sample_spacing_px", "overall")
        }
    Path(args.summary).write_text(json.dumps(summary, indent=1) + "\n")
    epochs = summary.get("epochs", [])
    overall = (summary.get("localization") or {}).get("overall") or {}
    print(
        f"demo: {len(epochs)} epoch(s) logged, "
        f"{sum(float(e.get('seconds') or 0) for e in epochs):.0f} s of epochs; test AUROC "
        f"{summary.get('test_auroc_mean')}; pointing hit rate {overall.get('pointing_hit_rate')}"
        f" ({overall.get('pointing_hit_rate_tolerant')} within tolerance); wrote {args.summary}"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("env", help="the machine, the imports, the carried wheels")
    check.add_argument("--dicom", help="a compressed DICOM to decode through cxr")
    check.add_argument("--site", help="the folder the wheels were installed into")
    check.add_argument("--require-cuda", action="store_true")
    demo = commands.add_parser("demo-summary", help="a cxr demo folder's results as JSON")
    demo.add_argument("demo")
    demo.add_argument("summary")
    args = parser.parse_args()
    return env(args) if args.command == "env" else demo_summary(args)


if __name__ == "__main__":
    sys.exit(main())
