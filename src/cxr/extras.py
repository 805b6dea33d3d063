"""The optional parts of cxr and the packages each one needs: pyproject.toml's extras.

The core (training, evaluation, prediction, Grad-CAM, the report) imports none of these; a
command or function that needs one calls :func:`require` first, so that a missing package is
one :class:`~cxr.errors.MissingExtraError` naming the extra to install, not a
``ModuleNotFoundError`` from deep inside.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from cxr.errors import MissingExtraError

# The modules each extra's packages provide, as imported (pyproject.toml lists the packages).
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": (
        "fastapi",
        "fastapi_offline",
        "uvicorn",
        "python_multipart",
        "prometheus_client",
        "sqlalchemy",  # GET /v1/results reads the DICOM listener's results store
    ),
    "dicom": ("pynetdicom", "highdicom", "sqlalchemy", "prometheus_client"),
    "postgres": ("sqlalchemy", "psycopg"),
    "parquet": ("pyarrow",),
    "onnx": ("onnx", "onnxruntime"),
}


def require(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` unless every module of ``extra`` imports; ``feature``
    names what needs it in the message (``"cxr serve"``)."""
    for module in EXTRAS[extra]:
        import_extra(module, extra, feature)


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """``module``, imported; :class:`MissingExtraError` naming ``extra`` if it is not there."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(extra, feature, module) from None


def installed(extra: str) -> bool:
    """Whether ``extra``'s modules can be found, without importing them (for a default that
    uses an extra where it is there, such as the onnx backend on a CPU)."""
    try:
        return all(importlib.util.find_spec(module) is not None for module in EXTRAS[extra])
    except (ImportError, ValueError):
        return False
