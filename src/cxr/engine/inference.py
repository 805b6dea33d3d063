"""Inference: a :class:`Predictor` wraps a bundle (or an exported ONNX file) behind one
``probabilities`` call with either backend, ``torch`` (eager, CPU or CUDA) or ``onnx``
(onnxruntime, CPU); :func:`predict_files` runs it over many files through a DataLoader whose
workers decode and preprocess the next batches while the current one is computed (an
unreadable file becomes a :class:`~cxr.data.files.FileError` and the others go on);
:func:`predict_logits` is the evaluation loop over a split's DataLoader.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxr.data.files import FileError
from cxr.data.loaders import Batch, file_loader
from cxr.data.transforms import Preprocess
from cxr.errors import CxrError, ModelError
from cxr.explain.gradcam import gradcam
from cxr.explain.render import ExplanationWriter, choose_pathologies
from cxr.extras import installed
from cxr.metrics import apply_thresholds, probabilities
from cxr.model.bundle import BundleMeta, load_bundle, resolve_bundle, weights_digest
from cxr.model.card import INTENDED_USE
from cxr.model.network import unwrap
from cxr.model.onnx import (
    ONNX_FEATURES,
    ONNX_INPUT,
    ONNX_OUTPUT,
    ONNX_WEIGHTS_KEY,
    bundle_session,
    onnx_session,
    read_onnx_meta,
)
from cxr.model.ood import OodSummary, load_ood
from cxr.model.registry import WithFeatures, architecture_of
from cxr.runtime import resolve_device
from cxr.utils import atomic_write_csv, atomic_write_text, path_text

BACKENDS = ("auto", "torch", "onnx")


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader,
    device: torch.device,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, logits) for every sample the loader yields: model in eval mode, float32."""
    indices, logits, _ = predict_outputs(model, loader, device, on_batch=on_batch)
    return indices, logits


@torch.no_grad()
def predict_outputs(
    model: nn.Module,
    loader,
    device: torch.device,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, logits, pooled features) for every sample: one forward pass gives both."""
    model.eval()
    both = WithFeatures(model)
    indices, outputs, pooled = [], [], []
    for images, _targets, batch_indices in loader:
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        logits, features = both(images)
        outputs.append(logits.float().cpu().numpy())
        pooled.append(features.float().cpu().numpy())
        indices.append(batch_indices.numpy())
        if on_batch:
            on_batch(len(batch_indices))
    if not outputs:
        plain = unwrap(model)
        classifier = architecture_of(plain).classifier(plain)
        empty = np.zeros((0, classifier.in_features), dtype=np.float32)
        classes = classifier.out_features
        return np.zeros(0, dtype=np.int64), np.zeros((0, classes), dtype=np.float32), empty
    return np.concatenate(indices), np.concatenate(outputs), np.concatenate(pooled)


class Predictor:
    """A model ready for inference: its description plus a backend that maps images to logits.

    ``probabilities(images)`` takes the preprocessed batch ``[N, 3, S, S]`` (see
    :attr:`preprocess`) and returns ``[N, C]`` float64. Thread-safe: calls are serialised,
    so a server may share one predictor between request threads.
    """

    def __init__(
        self,
        meta: BundleMeta,
        backend: str,
        *,
        torch_model: nn.Module | None = None,
        session=None,
        device: torch.device | None = None,
        weights_digest: str | None = None,
        ood: OodSummary | None = None,
    ):
        self.meta = meta
        self.ood = ood  # the out-of-distribution summary, if the bundle has one
        # SHA-256 of model.safetensors (of the bundle an ONNX file was exported from), or None.
        self.weights_digest = weights_digest
        self.backend = backend
        self.torch_model = torch_model
        self.session = session
        self.device = device or torch.device("cpu")
        self.lock = threading.RLock()

    labels = property(lambda self: list(self.meta.labels))
    image_size = property(lambda self: self.meta.image_size)
    normalization = property(lambda self: self.meta.normalization)
    temperature = property(lambda self: self.meta.effective_temperature)
    thresholds = property(lambda self: self.meta.decision_thresholds)

    @property
    def preprocess(self) -> Preprocess:
        return self.meta.preprocess

    def outputs(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, pooled features) from one forward pass; features ``None`` from an ONNX
        file exported without them."""
        with self.lock:
            if self.backend == "onnx":
                array = images.detach().cpu().numpy().astype(np.float32, copy=False)
                names = [o.name for o in self.session.get_outputs()]
                wanted = [ONNX_OUTPUT, *([ONNX_FEATURES] if ONNX_FEATURES in names else [])]
                results = self.session.run(wanted, {ONNX_INPUT: array})
                return results[0], results[1] if len(results) > 1 else None
            with torch.inference_mode():
                batch = images.to(self.device, non_blocking=True)
                if self.device.type == "cuda":
                    batch = batch.contiguous(memory_format=torch.channels_last)
                logits, features = WithFeatures(self.torch_model)(batch)
                return logits.float().cpu().numpy(), features.float().cpu().numpy()

    def logits(self, images: torch.Tensor) -> np.ndarray:
        return self.outputs(images)[0]

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        return probabilities(self.logits(images), self.temperature)

    def scores(self, images: torch.Tensor) -> Scores:
        """Probabilities and, where the bundle has a summary, out-of-distribution scores."""
        logits, features = self.outputs(images)
        ood = None
        if self.ood is not None and features is not None:
            ood = self.ood.score(features)
        return Scores(probabilities(logits, self.temperature), ood)

    def about(self) -> dict[str, Any]:
        """What the model is, for every answer: its training data and intended use."""
        return model_about(self.meta, self.ood)

    def calls(self, probabilities: np.ndarray) -> np.ndarray:
        return apply_thresholds(probabilities, self.thresholds).astype(bool)

    def require_torch_model(self) -> nn.Module:
        """The PyTorch model (Grad-CAM needs gradients, whatever backend predicts)."""
        if self.torch_model is None:
            raise ModelError(
                "Grad-CAM needs the model bundle (model.safetensors + model.json), "
                "not only its ONNX export"
            )
        return self.torch_model

    def gradcam(self, images: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
        """Grad-CAM ``[B, len(classes), S, S]`` in [0, 1] (:func:`cxr.explain.gradcam.gradcam`)."""
        model = self.require_torch_model()
        with self.lock:
            device = next(model.parameters()).device
            try:
                return gradcam(model, images.to(device), list(classes))
            except CxrError:
                raise
            except Exception as exc:
                raise ModelError(f"{exc.__class__.__name__}: {exc}") from None

    def describe(self) -> dict[str, Any]:
        """What a client may know about the model (no server paths)."""
        return {
            "labels": self.labels,
            "thresholds": dict(zip(self.labels, self.thresholds)),
            "threshold_rule": self.meta.threshold_rule,
            "image_size": self.image_size,
            "normalization": self.normalization,
            "temperature": self.temperature,
            "backend": self.backend,
            "about": self.about(),
        }


@dataclass
class Scores:
    """A batch's probabilities ``[N, C]`` and, per image, its out-of-distribution score
    (``None`` without a summary)."""

    probabilities: np.ndarray
    ood: list[dict[str, Any]] | None = None


def model_about(meta: BundleMeta, ood: OodSummary | None = None) -> dict[str, Any]:
    """``trained_on``, ``synthetic`` (``None``: not described), ``intended_use``, and the
    out-of-distribution flag's rule: what every answer says about the model."""
    card = meta.card
    if card is None:
        about = {
            "trained_on": "data this bundle does not describe (its model.json has no model "
            "card; `cxr card RUN` adds one)",
            "synthetic": None,
            "intended_use": INTENDED_USE,
        }
    else:
        data = card.training_data
        about = {
            "trained_on": data.description,
            "synthetic": data.synthetic,
            "origin": data.origin,
            "intended_use": card.intended_use,
        }
    about["ood"] = None if ood is None else ood.describe()
    return about


def load_predictor(
    model: str | os.PathLike,
    *,
    backend: str = "auto",
    device: str = "auto",
    cache_dir: str | os.PathLike | None = None,
) -> Predictor:
    """A predictor for a run folder, a bundle, or an ONNX file written by ``cxr export``.

    ``auto`` picks onnxruntime on CPU where the ``onnx`` extra is installed (about 4x faster
    than eager PyTorch for DenseNet121 on a CPU, same probabilities within 1e-4; see
    benchmarks/README.md), else PyTorch, and PyTorch on CUDA. For a
    bundle, the ONNX model is a ``model.onnx`` beside the weights exported from these same
    weights, or else is exported once into the cache (``$CXR_CACHE_DIR`` or ``~/.cache/cxr``).
    """
    if backend not in BACKENDS:
        raise CxrError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        if backend == "torch":
            raise ModelError(f"{path}: an ONNX file runs on the onnx backend, not torch")
        session = onnx_session(path)
        exported_from = session.get_modelmeta().custom_metadata_map.get(ONNX_WEIGHTS_KEY) or None
        meta = read_onnx_meta(path)
        return Predictor(meta, "onnx", session=session, weights_digest=exported_from)
    torch_device = resolve_device(device)
    if backend == "auto":
        # onnxruntime where it is installed (the onnx extra): the same answers, faster.
        backend = "onnx" if torch_device.type == "cpu" and installed("onnx") else "torch"
    if backend == "onnx" and torch_device.type != "cpu":
        raise CxrError("the onnx backend runs on the CPU; use --backend torch for CUDA")
    bundle = load_bundle(path, device=torch_device)
    weights = resolve_bundle(path)[0]
    digest = weights_digest(weights)
    ood = bundle_ood(weights.parent, bundle.meta)
    if backend == "torch":
        return Predictor(
            bundle.meta, "torch", torch_model=bundle.model, device=torch_device,
            weights_digest=digest, ood=ood,
        )  # fmt: skip
    session = bundle_session(bundle, weights, cache_dir)
    return Predictor(
        bundle.meta, "onnx", torch_model=bundle.model, session=session, weights_digest=digest,
        ood=ood,
    )  # fmt: skip


def bundle_ood(directory: Path, meta: BundleMeta) -> OodSummary | None:
    """The bundle's out-of-distribution summary, checked against model.json, or ``None``
    when it has none or the file was left behind (a bundle copied as its two original
    files): the model still answers, without the flag. A file that is there but changed,
    oversized or malformed is refused."""
    if meta.ood is None or not (Path(directory) / meta.ood.file).exists():
        return None
    return load_ood(directory, meta.ood.model_dump())


def missing_ood_note(directory: Path, meta: BundleMeta) -> str | None:
    """A warning when model.json lists an out-of-distribution summary that is not there."""
    if meta.ood is not None and not (Path(directory) / meta.ood.file).exists():
        return (
            f"{Path(directory) / meta.ood.file}: listed in model.json but missing; images "
            "get no out-of-distribution flag (copy it with the bundle, or run `cxr ood RUN`)"
        )
    return None


@dataclass
class Predictions:
    """One row per predicted file (in input order), plus the files that failed and the
    entries the search for images skipped.

    ``files`` and the keys of ``overlays`` are the paths as given (file-system text); the
    table, the records and the JSON show them through :func:`cxr.utils.path_text`, so that a
    name that is not UTF-8 is written (as ``\\xNN``) instead of failing the whole output,
    and reads the same in CSV and JSON.
    """

    labels: list[str]
    thresholds: list[float]
    files: list[str] = field(default_factory=list)
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros((0, 14)))
    errors: list[FileError] = field(default_factory=list)
    skipped: list[FileError] = field(default_factory=list)
    overlays: dict[str, list[str]] = field(default_factory=dict)
    backend: str = ""
    ood: list[dict[str, Any]] | None = None  # per row, where the bundle has a summary
    about: dict[str, Any] = field(default_factory=dict)  # what the model is (model_about)

    @property
    def calls(self) -> np.ndarray:
        return apply_thresholds(self.probabilities, self.thresholds).astype(bool)

    def table(self):
        """pandas: ``file``, ``prob_<label>`` x C, ``call_<label>`` x C (1 = positive)."""
        columns: dict[str, Any] = {"file": [path_text(name) for name in self.files]}
        for c, label in enumerate(self.labels):
            columns[f"prob_{label}"] = self.probabilities[:, c]
        calls = self.calls.astype(np.int8)
        for c, label in enumerate(self.labels):
            columns[f"call_{label}"] = calls[:, c]
        if self.ood is not None:
            columns["ood_distance"] = [s["distance"] for s in self.ood]
            columns["ood_percentile"] = [s["percentile"] for s in self.ood]
            columns["ood_flag"] = [int(s["flagged"]) for s in self.ood]
        return pd.DataFrame(columns)

    def records(self) -> list[dict[str, Any]]:
        calls = self.calls
        return [
            image_record(self.labels, self.probabilities[row], calls[row], file=path_text(name))
            | ({} if self.ood is None else {"ood": self.ood[row]})
            | (
                {"overlays": [path_text(p) for p in self.overlays[name]]}
                if name in self.overlays
                else {}
            )
            for row, name in enumerate(self.files)
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.about,
            "backend": self.backend,
            "labels": self.labels,
            "thresholds": dict(zip(self.labels, self.thresholds)),
            "predictions": self.records(),
            "errors": [_error_record(e) for e in self.errors],
            "skipped": [_error_record(e) for e in self.skipped],
        }

    def write(self, out: str | os.PathLike) -> Path:
        """``.csv`` (the table) or ``.json`` (records and errors), written atomically."""
        out = Path(out)
        suffix = out.suffix.lower()
        if suffix == ".csv":
            atomic_write_csv(self.table(), out)
        elif suffix == ".json":
            atomic_write_text(out, json.dumps(self.to_json(), indent=2) + "\n")
        else:
            raise CxrError(f"{out}: --out must end in .csv or .json")
        return out


def _error_record(error: FileError) -> dict[str, str]:
    return {"file": path_text(error.file), "reason": path_text(error.reason)}


def image_record(
    names: Sequence[str], probabilities: np.ndarray, calls: np.ndarray, /, **extra: Any
) -> dict[str, Any]:
    """One image's result as JSON-ready values (shared by ``cxr predict`` and the service)."""
    return {
        **extra,
        "probabilities": {name: float(p) for name, p in zip(names, probabilities)},
        "calls": {name: bool(c) for name, c in zip(names, calls)},
        "positive": [name for name, c in zip(names, calls) if c],
    }


def check_out_path(out: str | os.PathLike | None) -> None:
    if out is not None and Path(out).suffix.lower() not in (".csv", ".json"):
        raise CxrError(f"{out}: --out must end in .csv or .json")


def predict_files(
    predictor: Predictor,
    files: Sequence[Path],
    *,
    batch_size: int = 16,
    workers: int | None = None,
    explain_dir: str | os.PathLike | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_error: Callable[[FileError], None] | None = None,
) -> Predictions:
    """Predict every file; failures are collected (and reported to ``on_error``), not raised.

    With ``explain_dir``, the Grad-CAM of each positive call (or of the most probable
    pathology when none is positive) is written as ``<file stem>/<Pathology>.png`` and
    ``.npy`` (:class:`~cxr.explain.render.ExplanationWriter`).
    """
    if batch_size < 1:
        raise CxrError(f"batch size must be at least 1 (got {batch_size})")
    writer = None
    if explain_dir is not None:
        predictor.require_torch_model()  # an ONNX file cannot explain: refused before any work
        writer = ExplanationWriter(explain_dir, files)
    result = Predictions(labels=predictor.labels, thresholds=predictor.thresholds)
    result.backend = predictor.backend
    result.about = predictor.about()
    rows: dict[int, np.ndarray] = {}
    ood_rows: dict[int, dict[str, Any]] = {}
    failures: dict[int, str] = {}
    loader = file_loader(
        files,
        predictor.preprocess,
        batch_size=batch_size,
        workers=workers,
        keep_crops=writer is not None,
    )
    for batch in loader:
        for index, reason in batch.failed:
            failures[index] = reason
            if on_error:
                on_error(FileError(str(files[index]), reason))
        if batch.images is not None:
            scores = predictor.scores(batch.images)
            probs = scores.probabilities
            for row, index in enumerate(batch.indices):
                rows[index] = probs[row]
                if scores.ood is not None:
                    ood_rows[index] = scores.ood[row]
            if writer is not None:
                _explain_batch(predictor, writer, batch, probs, files, result, failures)
        if on_progress:
            on_progress(len(batch.indices) + len(batch.failed))
    order = sorted(rows)
    result.files = [str(files[i]) for i in order]
    result.probabilities = (
        np.stack([rows[i] for i in order])
        if order
        else np.zeros((0, len(result.labels)), dtype=np.float64)
    )
    result.errors = [FileError(str(files[i]), failures[i]) for i in sorted(failures)]
    if predictor.ood is not None and len(ood_rows) == len(order):
        result.ood = [ood_rows[i] for i in order]
    return result


def _explain_batch(
    predictor: Predictor,
    writer: ExplanationWriter,
    batch: Batch,
    probs: np.ndarray,
    files: Sequence[Path],
    result: Predictions,
    failures: dict[int, str],
) -> None:
    """Write the explanations of one batch's images; a failure is recorded for its file."""
    thresholds = predictor.thresholds
    for row, index in enumerate(batch.indices):
        classes, _ = choose_pathologies(
            probs[row], thresholds, mode="auto", top_k=1, labels=predictor.labels
        )
        try:
            maps = predictor.gradcam(batch.images[row : row + 1], classes)[0]
        except CxrError as exc:
            failures[index] = f"Grad-CAM failed ({exc})"
            continue
        written = [
            writer.write(
                index, batch.crops[row], maps[k], predictor.labels[c], probs[row, c],
                thresholds[c],
            )["png"]
            for k, c in enumerate(classes)
        ]  # fmt: skip
        result.overlays[str(files[index])] = written
