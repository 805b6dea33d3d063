"""cxr: chest X-ray diagnosis on NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG or your own images.

The Python API (the CLI is a thin layer over it)::

    import cxr

    ds = cxr.open_dataset("data/nih")  # any supported layout, detected
    run = cxr.train(ds, out="runs/a", max_epochs=3)  # cxr.Run; cxr train's option names
    ev = run.evaluate("test")  # cxr.Evaluation: .auroc, .mean_auroc, .ci, .to_frame()
    model = cxr.load_model("runs/a")  # a run, a bundle or an exported .onnx
    table = model.predict(["a.png", "b.dcm"])  # what `cxr predict --out x.csv` writes
    maps = model.explain("a.png", labels=["Effusion"])  # {label: Grad-CAM array}

Importing cxr is cheap: these names load their modules (and PyTorch) on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Where each public name lives; `cxr.<name>` imports it on first use (PEP 562).
_EXPORTS = {
    "open_dataset": "cxr.api.dataset",
    "Dataset": "cxr.api.dataset",
    "train": "cxr.api.runs",
    "Run": "cxr.api.runs",
    "Evaluation": "cxr.api.runs",
    "ClassResult": "cxr.api.runs",
    "ExternalEvaluation": "cxr.api.runs",
    "Calibration": "cxr.api.runs",
    "load_model": "cxr.api.models",
    "Model": "cxr.api.models",
    "Split": "cxr.data.split",
    "TrainConfig": "cxr.config",
    "errors": "cxr.errors",
}

__all__ = [
    "Calibration",
    "ClassResult",
    "Dataset",
    "Evaluation",
    "ExternalEvaluation",
    "Model",
    "Run",
    "Split",
    "TrainConfig",
    "__version__",
    "errors",
    "load_model",
    "open_dataset",
    "train",
]

if TYPE_CHECKING:
    import cxr.errors as errors
    from cxr.api.dataset import Dataset, open_dataset
    from cxr.api.models import Model, load_model
    from cxr.api.runs import (
        Calibration,
        ClassResult,
        Evaluation,
        ExternalEvaluation,
        Run,
        train,
    )
    from cxr.config import TrainConfig
    from cxr.data.split import Split


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cxr' has no attribute {name!r}")
    value = import_module(module) if name == "errors" else getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
