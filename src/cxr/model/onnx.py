"""ONNX: export a bundle (dynamic batch axis, its description embedded), check the export
against PyTorch, and the onnxruntime sessions the onnx backend predicts with (beside the
weights, in the cache, or exported on first use).

onnx and onnxruntime are the ``onnx`` extra, imported by the functions that use them: the
torch backend, and everything else that imports this module, works without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cxr.errors import ModelError
from cxr.extras import import_extra
from cxr.metrics import probabilities
from cxr.model.bundle import (
    Bundle,
    BundleMeta,
    check_outputs,
    load_bundle,
    meta_digest,
    resolve_bundle,
    weights_digest,
)
from cxr.model.registry import WithFeatures
from cxr.utils import atomic_write_bytes

if TYPE_CHECKING:
    import onnxruntime as ort

ONNX_INPUT = "image"
ONNX_OUTPUT = "logits"
ONNX_FEATURES = "features"  # the pooled features [N, 1024], for the out-of-distribution score
# Part of the cache key: a model exported before the features output was added is not reused.
EXPORT_OUTPUTS = f"{ONNX_OUTPUT},{ONNX_FEATURES}"
ONNX_META_KEY = "cxr_bundle"  # the bundle's model.json, stored in the ONNX metadata
ONNX_WEIGHTS_KEY = "cxr_weights_sha256"  # which model.safetensors it was exported from
ONNX_META_DIGEST_KEY = "cxr_bundle_sha256"  # and which model.json (bundle.meta_digest)
ONNX_CACHE_ENV = "CXR_CACHE_DIR"
OPSET = 17
# The bar for "agree": probabilities within 1e-4 of PyTorch's.
MAX_PROB_DIFF = 1e-4


def export_onnx(model_path: str | Path, out: str | Path, *, check: bool = True) -> dict:
    """Write ``out`` (ONNX, input ``image`` [N,3,S,S] -> ``logits`` [N,C] and ``features``
    [N,1024], the pooled features) for a bundle.

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
        result["max_prob_diff"] = check_onnx(
            data, bundle.model, bundle.image_size, channels=bundle.meta.channels
        )
    atomic_write_bytes(out, data)
    return result


def onnx_bytes(
    model: torch.nn.Module, image_size: int, meta: BundleMeta, *, weights_sha256: str = ""
) -> bytes:
    """The serialised ONNX model (logits and pooled features), with the bundle description in
    its metadata."""
    onnx = import_extra("onnx", "onnx", "ONNX export")
    model = WithFeatures(model.to("cpu").eval()).eval()
    example = torch.zeros(1, meta.channels, image_size, image_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        try:
            torch.onnx.export(
                model,
                (example,),
                buffer,
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT, ONNX_FEATURES],
                dynamic_axes={
                    ONNX_INPUT: {0: "batch"},
                    ONNX_OUTPUT: {0: "batch"},
                    ONNX_FEATURES: {0: "batch"},
                },
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
    entry = proto.metadata_props.add()
    entry.key = ONNX_META_DIGEST_KEY
    entry.value = meta_digest(meta)
    if weights_sha256:
        entry = proto.metadata_props.add()
        entry.key = ONNX_WEIGHTS_KEY
        entry.value = weights_sha256
    proto.producer_name = "cxr"
    return proto.SerializeToString()


def read_onnx_meta(path: str | Path) -> BundleMeta:
    """The bundle description embedded by :func:`export_onnx`, checked as ``model.json`` is
    and against the model's input and output shapes."""
    session = onnx_session(path)
    text = session.get_modelmeta().custom_metadata_map.get(ONNX_META_KEY)
    if not text:
        raise ModelError(
            f"{path}: ONNX file has no cxr bundle description (not made by cxr export)"
        )
    source = f"{path} (metadata {ONNX_META_KEY})"
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{source}: not JSON ({exc})") from None
    meta = BundleMeta.from_dict(values, source=source)
    check_session(meta, session, source)
    return meta


def check_session(meta: BundleMeta, session: ort.InferenceSession, source: str) -> None:
    """The description fits the ONNX model: one label per output, the input's image size.
    Dimensions the file leaves symbolic (the batch) are not checked."""
    outputs = [o for o in session.get_outputs() if o.name == ONNX_OUTPUT]
    inputs = [i for i in session.get_inputs() if i.name == ONNX_INPUT]
    if not outputs or not inputs:
        raise ModelError(f"{source}: the ONNX model has no {ONNX_INPUT!r} -> {ONNX_OUTPUT!r}")
    classes = outputs[0].shape[-1] if outputs[0].shape else None
    check_outputs(meta, classes if isinstance(classes, int) else None, source, "the ONNX model")
    sizes = {d for d in inputs[0].shape[2:] if isinstance(d, int)}
    if sizes and sizes != {meta.image_size}:
        raise ModelError(
            f"{source}: image_size: expected {min(sizes)} (the ONNX model's input), "
            f"got {meta.image_size}"
        )


def onnx_session(source: str | Path | bytes, threads: int | None = None):
    """An onnxruntime CPU session for a file or serialised model."""
    ort = import_extra("onnxruntime", "onnx", "the onnx backend")
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


def check_onnx(
    data: bytes, model: torch.nn.Module, image_size: int, batch: int = 3, *, channels: int = 3
) -> float:
    """Max |p_onnx - p_torch| on a random batch; raises :class:`ModelError` above the bar
    (for the probabilities, and for the pooled features relative to their largest value)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, channels, image_size, image_size, generator=generator)
    with torch.no_grad():
        logits_torch, features_torch = WithFeatures(model.eval())(images)
    expected = probabilities(logits_torch.numpy())
    outputs = [ONNX_OUTPUT, ONNX_FEATURES]
    logits, features = onnx_session(data).run(outputs, {ONNX_INPUT: images.numpy()})
    diff = float(np.max(np.abs(probabilities(logits) - expected)))
    scale = 1.0 + float(np.max(np.abs(features_torch.numpy())))
    feature_diff = float(np.max(np.abs(features - features_torch.numpy()))) / scale
    if not feature_diff <= MAX_PROB_DIFF:
        raise ModelError(
            f"the ONNX model's pooled features disagree with PyTorch's: {feature_diff:.2e} "
            f"(relative) > {MAX_PROB_DIFF:.0e}"
        )
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
    """An onnxruntime session for these exact weights and this exact ``model.json``: beside
    them, cached, or made now.

    The description is part of the key because it shapes the export (``image_size`` is the
    input's size, the labels its outputs): a model exported before ``model.json`` changed
    would start and then fail every request.
    """
    digest = weights_digest(weights)
    described = meta_digest(bundle.meta)
    key = hashlib.sha256(f"{digest}\n{described}\n{EXPORT_OUTPUTS}".encode()).hexdigest()
    cached = Path(cache_dir or default_cache_dir()) / "onnx" / f"{key[:24]}.onnx"
    for candidate in (weights.parent / "model.onnx", cached):
        session = _matching_session(candidate, bundle.meta, digest, described)
        if session is not None:
            return session
    data = onnx_bytes(bundle.model, bundle.image_size, bundle.meta, weights_sha256=digest)
    check_onnx(data, bundle.model, bundle.image_size, channels=bundle.meta.channels)
    with contextlib.suppress(OSError):  # a read-only home: run from memory this time
        atomic_write_bytes(cached, data)
    return onnx_session(data)


def _matching_session(
    path: Path, meta: BundleMeta, weights_sha256: str, meta_sha256: str
) -> ort.InferenceSession | None:
    """A session for ``path`` if it was exported from these weights and this description."""
    if not path.is_file():
        return None
    try:
        session = onnx_session(path)
        stored = session.get_modelmeta().custom_metadata_map
        if (stored.get(ONNX_WEIGHTS_KEY), stored.get(ONNX_META_DIGEST_KEY)) != (
            weights_sha256,
            meta_sha256,
        ):
            return None
        check_session(meta, session, str(path))
        if ONNX_FEATURES not in {o.name for o in session.get_outputs()}:
            return None  # exported before the features output: exported again
    except ModelError:  # unreadable or foreign: exported again
        return None
    return session
