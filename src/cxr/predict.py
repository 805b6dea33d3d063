"""Inference on image files: find them, decode while the model computes, predict in batches.

A :class:`Predictor` wraps a bundle (or an exported ONNX file) behind one ``probabilities``
call with either backend: ``torch`` (eager, CPU or CUDA) or ``onnx`` (onnxruntime, CPU).
:func:`predict_files` runs it over many files through a DataLoader whose workers decode and
preprocess the next batches while the current one is computed; an unreadable file becomes a
:class:`FileError` (name and reason) and the others go on.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cxr.data.dataset import Preprocess
from cxr.data.images import IMAGE_SUFFIXES, decode_gray, is_dicom_bytes
from cxr.errors import CxrError, ModelError
from cxr.evaluate import apply_thresholds, sigmoid

BACKENDS = ("auto", "torch", "onnx")
ONNX_CACHE_ENV = "CXR_CACHE_DIR"


# ---------------------------------------------------------------------------- finding files


@dataclass(frozen=True)
class FileError:
    """A file (or a path given on the command line) that produced no prediction, and why."""

    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


def find_images(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[FileError]]:
    """The image files named by ``paths``: files as given, folders searched recursively.

    In folders, files ending in .png/.jpg/.jpeg/.dcm/.dicom are taken, and so are files without
    an image suffix that start like a DICOM file (PACS exports often have no extension). Hidden
    files and folders are skipped. A path that does not exist, or a folder without images, is
    reported as an error. Each file is listed once, in a stable (sorted) order per argument.
    """
    files: list[Path] = []
    errors: list[FileError] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = _images_below(path)
            if not found:
                errors.append(FileError(str(path), "folder holds no PNG, JPEG or DICOM files"))
        elif path.is_file():
            found = [path]
        elif path.exists():
            found = []
            errors.append(FileError(str(path), "not a regular file or folder"))
        else:
            found = []
            errors.append(FileError(str(path), "no such file or folder"))
        for file in found:
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                files.append(file)
    return files, errors


def _images_below(folder: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(root, name)
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES or (suffix not in _OTHER_SUFFIXES and _looks_dicom(path)):
                found.append(path)
    return found


# Common non-image companions of X-ray folders; not worth opening to sniff.
_OTHER_SUFFIXES = {".csv", ".gz", ".txt", ".json", ".md", ".zip", ".tar", ".xml", ".html", ".py"}


def _looks_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return is_dicom_bytes(handle.read(132))
    except OSError:
        return False


# ---------------------------------------------------------------------------- predictor


class Predictor:
    """A model ready for inference: its description plus a backend that maps images to logits.

    ``probabilities(images)`` takes the preprocessed batch ``[N, 3, S, S]`` (see
    :attr:`preprocess`) and returns ``[N, C]`` float64. Thread-safe: calls are serialised,
    so a server may share one predictor between request threads.
    """

    def __init__(
        self,
        meta: dict[str, Any],
        backend: str,
        *,
        torch_model: torch.nn.Module | None = None,
        session=None,
        device: torch.device | None = None,
    ):
        self.meta = meta
        self.backend = backend
        self.torch_model = torch_model
        self.session = session
        self.device = device or torch.device("cpu")
        self.lock = threading.RLock()

    labels = property(lambda self: list(self.meta["labels"]))
    image_size = property(lambda self: int(self.meta["image_size"]))
    normalization = property(lambda self: str(self.meta.get("normalization", "imagenet")))
    temperature = property(lambda self: float(self.meta.get("temperature", 1.0) or 1.0))

    @property
    def thresholds(self) -> list[float]:
        values = self.meta.get("thresholds")
        return [float(v) for v in values] if values else [0.5] * len(self.labels)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.image_size, self.normalization)

    def logits(self, images: torch.Tensor) -> np.ndarray:
        with self.lock:
            if self.backend == "onnx":
                from cxr.export import ONNX_INPUT, ONNX_OUTPUT

                array = images.detach().cpu().numpy().astype(np.float32, copy=False)
                return self.session.run([ONNX_OUTPUT], {ONNX_INPUT: array})[0]
            with torch.inference_mode():
                batch = images.to(self.device, non_blocking=True)
                if self.device.type == "cuda":
                    batch = batch.contiguous(memory_format=torch.channels_last)
                return self.torch_model(batch).float().cpu().numpy()

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        return sigmoid(self.logits(images), self.temperature)

    def calls(self, probabilities: np.ndarray) -> np.ndarray:
        return apply_thresholds(probabilities, self.thresholds).astype(bool)

    def explainer(self) -> torch.nn.Module:
        """The PyTorch model (Grad-CAM needs gradients, whatever backend predicts)."""
        if self.torch_model is None:
            raise ModelError(
                "Grad-CAM needs the model bundle (model.safetensors + model.json), "
                "not only its ONNX export"
            )
        return self.torch_model

    def describe(self) -> dict[str, Any]:
        """What a client may know about the model (no server paths)."""
        return {
            "labels": self.labels,
            "thresholds": dict(zip(self.labels, self.thresholds)),
            "threshold_rule": self.meta.get("threshold_rule"),
            "image_size": self.image_size,
            "normalization": self.normalization,
            "temperature": self.temperature,
            "backend": self.backend,
        }


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise CxrError(f"unknown device {device!r} (auto, cpu, cuda or cuda:N)") from None


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def load_predictor(
    model: str | os.PathLike,
    *,
    backend: str = "auto",
    device: str = "auto",
    cache_dir: str | os.PathLike | None = None,
) -> Predictor:
    """A predictor for a run folder, a bundle, or an ONNX file written by ``cxr export``.

    ``auto`` picks onnxruntime on CPU (about 4x faster than eager PyTorch for DenseNet121 on a
    CPU, same probabilities within 1e-4; see benchmarks/README.md) and PyTorch on CUDA. For a
    bundle, the ONNX model is a ``model.onnx`` beside the weights exported from these same
    weights, or else is exported once into the cache (``$CXR_CACHE_DIR`` or ``~/.cache/cxr``).
    """
    from cxr.model import load_bundle, resolve_bundle

    if backend not in BACKENDS:
        raise CxrError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        if backend == "torch":
            raise ModelError(f"{path}: an ONNX file runs on the onnx backend, not torch")
        from cxr.export import onnx_session, read_onnx_meta

        return Predictor(read_onnx_meta(path), "onnx", session=onnx_session(path))
    torch_device = resolve_device(device)
    if backend == "auto":
        use_onnx = torch_device.type == "cpu" and onnxruntime_available()
        backend = "onnx" if use_onnx else "torch"
    if backend == "onnx" and torch_device.type != "cpu":
        raise CxrError("the onnx backend runs on the CPU; use --backend torch for CUDA")
    bundle = load_bundle(path, device=torch_device)
    if backend == "torch":
        return Predictor(bundle.meta, "torch", torch_model=bundle.model, device=torch_device)
    weights = resolve_bundle(path)[0]
    session = _bundle_session(bundle, weights, cache_dir)
    return Predictor(bundle.meta, "onnx", torch_model=bundle.model, session=session)


def weights_digest(weights: Path) -> str:
    digest = hashlib.sha256()
    with weights.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    if os.environ.get(ONNX_CACHE_ENV):
        return Path(os.environ[ONNX_CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cxr"


def _bundle_session(bundle, weights: Path, cache_dir) -> Any:
    """An onnxruntime session for these exact weights: beside them, cached, or made now."""
    from cxr.export import ONNX_WEIGHTS_KEY, check_onnx, onnx_bytes, onnx_session

    digest = weights_digest(weights)
    cached = Path(cache_dir or default_cache_dir()) / "onnx" / f"{digest[:24]}.onnx"
    for candidate in (weights.parent / "model.onnx", cached):
        if candidate.is_file():
            try:
                session = onnx_session(candidate)
            except ModelError:
                continue
            stored = session.get_modelmeta().custom_metadata_map.get(ONNX_WEIGHTS_KEY)
            if stored == digest:
                return session
    data = onnx_bytes(bundle.model, bundle.image_size, bundle.meta, weights_sha256=digest)
    check_onnx(data, bundle.model, bundle.image_size)
    try:
        from cxr.utils import atomic_write_bytes

        atomic_write_bytes(cached, data)
    except OSError:
        pass  # a read-only home: run from memory this time
    return onnx_session(data)


# ---------------------------------------------------------------------------- batches


class ImageFiles(Dataset):
    """Decode + preprocess one file; a failure is returned (not raised) so the batch goes on."""

    def __init__(self, files: Sequence[Path], preprocess: Preprocess, keep_crops: bool = False):
        self.files = list(files)
        self.preprocess = preprocess
        self.keep_crops = keep_crops

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        try:
            crop = self.preprocess.crop_resized(decode_gray(path))
            image = self.preprocess.to_tensor(crop)
        except CxrError as exc:
            return index, None, None, _reason(str(exc), str(path))
        except Exception as exc:  # a decoder bug must not stop the other files
            return index, None, None, f"cannot decode ({exc.__class__.__name__}: {exc})"
        return index, image, (crop if self.keep_crops else None), None


def _reason(message: str, name: str) -> str:
    prefix = f"{name}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


@dataclass
class Batch:
    indices: list[int]
    images: torch.Tensor | None
    crops: list[np.ndarray | None]
    failed: list[tuple[int, str]]


def collate(items) -> Batch:
    good = [item for item in items if item[3] is None]
    return Batch(
        indices=[item[0] for item in good],
        images=torch.stack([item[1] for item in good]) if good else None,
        crops=[item[2] for item in good],
        failed=[(item[0], item[3]) for item in items if item[3] is not None],
    )


def default_workers() -> int:
    """Decoding processes: enough to keep ahead of the model, leaving it most cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, (cores or 1) // 2))


def batch_loader(
    files: Sequence[Path],
    preprocess: Preprocess,
    *,
    batch_size: int = 16,
    workers: int | None = None,
    keep_crops: bool = False,
) -> DataLoader:
    workers = default_workers() if workers is None else workers
    workers = min(workers, max(1, -(-len(files) // batch_size))) if files else 0
    return DataLoader(
        ImageFiles(files, preprocess, keep_crops),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=2 if workers else None,
    )


# ---------------------------------------------------------------------------- results


@dataclass
class Predictions:
    """One row per predicted file (in input order), plus the files that failed."""

    labels: list[str]
    thresholds: list[float]
    files: list[str] = field(default_factory=list)
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros((0, 14)))
    errors: list[FileError] = field(default_factory=list)
    overlays: dict[str, list[str]] = field(default_factory=dict)
    backend: str = ""

    @property
    def calls(self) -> np.ndarray:
        return apply_thresholds(self.probabilities, self.thresholds).astype(bool)

    def table(self):
        """pandas: ``file``, ``prob_<label>`` x C, ``call_<label>`` x C (1 = positive)."""
        import pandas as pd

        columns: dict[str, Any] = {"file": self.files}
        for c, label in enumerate(self.labels):
            columns[f"prob_{label}"] = self.probabilities[:, c]
        calls = self.calls.astype(np.int8)
        for c, label in enumerate(self.labels):
            columns[f"call_{label}"] = calls[:, c]
        return pd.DataFrame(columns)

    def records(self) -> list[dict[str, Any]]:
        calls = self.calls
        return [
            image_record(self.labels, self.probabilities[row], calls[row], file=name)
            | ({"overlays": self.overlays[name]} if name in self.overlays else {})
            for row, name in enumerate(self.files)
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "labels": self.labels,
            "thresholds": dict(zip(self.labels, self.thresholds)),
            "predictions": self.records(),
            "errors": [{"file": e.file, "reason": e.reason} for e in self.errors],
        }

    def write(self, out: str | os.PathLike) -> Path:
        """``.csv`` (the table) or ``.json`` (records and errors), written atomically."""
        from cxr.utils import atomic_write_text

        out = Path(out)
        suffix = out.suffix.lower()
        if suffix == ".csv":
            atomic_write_text(out, self.table().to_csv(index=False))
        elif suffix == ".json":
            atomic_write_text(out, json.dumps(self.to_json(), indent=2) + "\n")
        else:
            raise CxrError(f"{out}: --out must end in .csv or .json")
        return out


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

    With ``explain_dir``, a Grad-CAM overlay PNG is written per positive call (or for the most
    probable pathology when none is positive), named ``<file stem>_<pathology>.png``.
    """
    if batch_size < 1:
        raise CxrError(f"batch size must be at least 1 (got {batch_size})")
    explain = None
    if explain_dir is not None:
        explain = _Explainer(predictor, Path(explain_dir), files)
    result = Predictions(labels=predictor.labels, thresholds=predictor.thresholds)
    result.backend = predictor.backend
    rows: dict[int, np.ndarray] = {}
    failures: dict[int, str] = {}
    loader = batch_loader(
        files,
        predictor.preprocess,
        batch_size=batch_size,
        workers=workers,
        keep_crops=explain is not None,
    )
    for batch in loader:
        for index, reason in batch.failed:
            failures[index] = reason
            if on_error:
                on_error(FileError(str(files[index]), reason))
        if batch.images is not None:
            probabilities = predictor.probabilities(batch.images)
            for row, index in enumerate(batch.indices):
                rows[index] = probabilities[row]
            if explain is not None:
                for row, index in enumerate(batch.indices):
                    try:
                        paths = explain.write(
                            index, batch.images[row], batch.crops[row], probabilities[row]
                        )
                    except CxrError as exc:
                        failures[index] = f"Grad-CAM failed ({exc})"
                        continue
                    result.overlays[str(files[index])] = paths
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
    return result


class _Explainer:
    """Grad-CAM overlays for ``predict_files``: unique names, the calls' pathologies."""

    def __init__(self, predictor: Predictor, out: Path, files: Sequence[Path]):
        self.predictor = predictor
        self.model = predictor.explainer()
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.stems: list[str] = []
        used: dict[str, int] = {}
        for file in files:
            stem = safe_name(Path(file).stem) or "image"
            used[stem] = used.get(stem, 0) + 1
            self.stems.append(stem if used[stem] == 1 else f"{stem}-{used[stem]}")

    def write(
        self, index: int, image: torch.Tensor, crop: np.ndarray, probabilities: np.ndarray
    ) -> list[str]:
        from cxr.utils import atomic_write_bytes

        labels = self.predictor.labels
        calls = self.predictor.calls(probabilities[None, :])[0]
        classes = [c for c in range(len(labels)) if calls[c]] or [int(np.argmax(probabilities))]
        heatmaps = explain_heatmaps(self.predictor, image[None], classes)[0]
        written = []
        for k, c in enumerate(classes):
            title = f"{labels[c]}  p={probabilities[c]:.2f}"
            png = overlay(crop, heatmaps[k], title)
            path = self.out / f"{self.stems[index]}_{labels[c]}.png"
            atomic_write_bytes(path, png)
            written.append(str(path))
        return written


def explain_heatmaps(predictor: Predictor, images: torch.Tensor, classes: list[int]) -> np.ndarray:
    """Grad-CAM ``[B, len(classes), S, S]`` in [0, 1] with the predictor's PyTorch model."""
    from cxr.explain import gradcam

    model = predictor.explainer()
    with predictor.lock:
        device = next(model.parameters()).device
        try:
            return np.asarray(gradcam(model, images.to(device), list(classes)))
        except CxrError:
            raise
        except Exception as exc:
            raise ModelError(f"{exc.__class__.__name__}: {exc}") from None


def overlay(crop: np.ndarray, heatmap: np.ndarray, title: str) -> bytes:
    from cxr.explain import overlay_png

    return overlay_png(crop, heatmap, title)


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, ``._-``; at most 100 chars)."""
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)
    return cleaned.strip("._")[:100]
