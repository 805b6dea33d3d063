"""ONNX: export a bundle (dynamic batch axis, its description embedded), check the export
against PyTorch, and the onnxruntime sessions the onnx backend predicts with (beside the
weights, in the cache, or exported on first use)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from cxr.errors import ModelError
from cxr.metrics import probabilities
from cxr.model.bundle import Bundle, BundleMeta, load_bundle, resolve_bundle, weights_digest
from cxr.utils import atomic_write_bytes

ONNX_INPUT = "image"
ONNX_OUTPUT = "logits"
ONNX_META_KEY = "cxr_bundle"  # the bundle's model.json, stored in the ONNX metadata
ONNX_WEIGHTS_KEY = "cxr_weights_sha256"  # which model.safetensors it was exported from
ONNX_CACHE_ENV = "CXR_CACHE_DIR"
OPSET = 17
# The bar for "agree": probabilities within 1e-4 of PyTorch's.
MAX_PROB_DIFF = 1e-4


def export_onnx(model_path: str | Path, out: str | Path, *, check: bool = True) -> dict:
    """Write ``out`` (ONNX, input ``image`` [N,3,S,S] -> ``logits`` [N,C]) for a bundle.

    The bundle's description (labels, image size, normalisation, thresholds, temperature) is
    embedded in the file's metadata, so ``cxr predict --backend onnx FILE.onnx`` needs nothing
    else. With ``check``, onnxruntime runs the file on a batch of 3 and its probabilities must be
    within ``MAX_PROB_DIFF`` of PyTorch's; the result says how close they were.
    """
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ModelError(f"{out}: the ONNX file name must end in .onnx")
    bundle = load_bundle(model_path)
    digest = weights_digest(resolve_bundle(model_path)[0])
    data = onnx_bytes(bundle.model, bundle.image_size, bundle.meta, weights_sha256=digest)
    result = {"path": str(out), "bytes": len(data), "opset": OPSET}
    if check:
        result["max_prob_diff"] = check_onnx(data, bundle.model, bundle.image_size)
    atomic_write_bytes(out, data)
    return result


def onnx_bytes(
    model: torch.nn.Module, image_size: int, meta: BundleMeta, *, weights_sha256: str = ""
) -> bytes:
    """The serialised ONNX model, with the bundle description in its metadata."""
    model = model.to("cpu").eval()
    example = torch.zeros(1, 3, image_size, image_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        try:
            torch.onnx.export(
                model,
                (example,),
                buffer,
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
                dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        except Exception as exc:
            raise ModelError(f"ONNX export failed ({exc.__class__.__name__}: {exc})") from None
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key = ONNX_META_KEY
    entry.value = json.dumps(meta.to_dict())
    if weights_sha256:
        entry = proto.metadata_props.add()
        entry.key = ONNX_WEIGHTS_KEY
        entry.value = weights_sha256
    proto.producer_name = "cxr"
    return proto.SerializeToString()


def read_onnx_meta(path: str | Path) -> BundleMeta:
    """The bundle description embedded by :func:`export_onnx`."""
    session = onnx_session(path)
    meta = session.get_modelmeta().custom_metadata_map.get(ONNX_META_KEY)
    if not meta:
        raise ModelError(
            f"{path}: ONNX file has no cxr bundle description (not made by cxr export)"
        )
    return BundleMeta.from_dict(json.loads(meta), source=f"{path} (metadata {ONNX_META_KEY})")


def onnx_session(source: str | Path | bytes, threads: int | None = None):
    """An onnxruntime CPU session for a file or serialised model."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    label = "<onnx>" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes):
        if not Path(source).is_file():
            raise ModelError(f"{source}: ONNX file not found")
        source = str(source)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"{label}: not a loadable ONNX model ({exc})") from None


def check_onnx(data: bytes, model: torch.nn.Module, image_size: int, batch: int = 3) -> float:
    """Max |p_onnx - p_torch| on a random batch; raises :class:`ModelError` above the bar."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    with torch.no_grad():
        expected = probabilities(model.eval()(images).numpy())
    logits = onnx_session(data).run([ONNX_OUTPUT], {ONNX_INPUT: images.numpy()})[0]
    diff = float(np.max(np.abs(probabilities(logits) - expected)))
    if not diff <= MAX_PROB_DIFF:
        raise ModelError(
            f"the ONNX model disagrees with PyTorch: max probability difference {diff:.2e} "
            f"> {MAX_PROB_DIFF:.0e}"
        )
    return diff


def default_cache_dir() -> Path:
    if os.environ.get(ONNX_CACHE_ENV):
        return Path(os.environ[ONNX_CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cxr"


def bundle_session(bundle: Bundle, weights: Path, cache_dir=None) -> ort.InferenceSession:
    """An onnxruntime session for these exact weights: beside them, cached, or made now."""
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
    with contextlib.suppress(OSError):  # a read-only home: run from memory this time
        atomic_write_bytes(cached, data)
    return onnx_session(data)
