"""Putting a node together from a model: where its spool and results store live by default,
the model's digest, and the predictor ``cxr predict`` would use."""

from __future__ import annotations

import os
from pathlib import Path

from cxr.dicom.forward import Destination
from cxr.dicom.node import DicomNode, NodeOptions
from cxr.dicom.report import model_info
from cxr.dicom.spool import Spool
from cxr.errors import ModelError
from cxr.results import DEFAULT_STORE_NAME, open_store

SPOOL_NAME = "dicom-spool"


def model_folder(model: str | os.PathLike) -> Path:
    """The folder a model lives in: a run or bundle folder, or an ONNX file's folder."""
    path = Path(model)
    return path if path.is_dir() else path.parent


def default_spool(model: str | os.PathLike) -> Path:
    return model_folder(model) / SPOOL_NAME


def default_store(model: str | os.PathLike) -> Path:
    return model_folder(model) / DEFAULT_STORE_NAME


def model_digest(model: str | os.PathLike) -> str:
    """SHA-256 of the weights: ``model.safetensors``, or the ``.onnx`` file itself."""
    from cxr.model.bundle import resolve_bundle, weights_digest  # (imports torch)

    path = Path(model)
    if path.suffix.lower() == ".onnx":
        return weights_digest(path)
    return weights_digest(resolve_bundle(path)[0])


def build_node(
    model: str | os.PathLike,
    destination: Destination,
    options: NodeOptions,
    *,
    spool: str | os.PathLike | None = None,
    db: str | None = None,
    backend: str = "auto",
    device: str = "auto",
    load_in_background: bool = False,
) -> DicomNode:
    """A node ready to :meth:`~DicomNode.start`; its spool and store default to
    ``dicom-spool/`` and ``results.sqlite`` in the model's folder. With
    ``load_in_background`` the model is only found here; it is hashed and loaded (tens of
    seconds, importing PyTorch included) after the port is open, so that nothing this module
    imports pulls in PyTorch."""
    if options.overlays and Path(model).suffix.lower() == ".onnx":
        raise ModelError(
            "Grad-CAM needs the model bundle (model.safetensors + model.json), "
            "not only its ONNX export"
        )
    if not Path(model).exists():  # before listening; an unreadable one ends the listener
        raise ModelError(f"{model}: no such model (expected a run folder, a bundle or .onnx)")

    def load():
        from cxr.engine.inference import load_predictor

        digest = model_digest(model)
        predictor = load_predictor(model, backend=backend, device=device)
        if options.overlays:
            predictor.require_torch_model()  # Grad-CAM needs the PyTorch model
        return predictor, model_info(predictor.meta, digest)

    store = open_store(str(db or default_store(model)), busy_timeout_s=options.store_busy_timeout_s)
    place = Spool(spool or default_spool(model))
    if load_in_background:
        return DicomNode(None, None, store, place, destination, options, loader=load)
    return DicomNode(*load(), store, place, destination, options)
