"""Bring your own model: a torchxrayvision model, a CheXNet checkpoint or a plain state dict
written as a cxr bundle, with the preprocessing, labels and thresholds it was trained with.

- ``xrv:NAME`` is loaded through torchxrayvision's own API (``xrv.models.get_model``) from
  its cache, never downloaded here. torchxrayvision's published DenseNet files are whole
  pickled models, which its loader unpickles; cxr calls it only for names torchxrayvision
  itself lists, from the folder torchxrayvision itself writes. The bundle keeps xrv's
  preprocessing (centre square, scikit-image resize, [-1024, 1024], one channel), its label
  order, and its ``op_threshs`` as the decision thresholds: cxr reports the sigmoid
  probability and calls a finding where it reaches the threshold, which is where xrv's
  ``op_norm`` output reaches 0.5. Outputs xrv leaves unnamed (``""``: not trained for that
  dataset) are dropped; a label whose operating point is NaN keeps the default 0.5.
- A file is read with ``torch.load(weights_only=True)``. A checkpoint that needs full
  unpickling (jrzech/reproduce-chexnet saves the whole model object) is refused before any
  of it runs, unless ``trust_pickle``.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr.errors import ModelError
from cxr.labels import PATHOLOGIES
from cxr.model.bundle import DEFAULT_THRESHOLD, BundleMeta, save_bundle, weights_digest
from cxr.model.card import COMMON_LIMITATIONS, ModelCard, TrainingData
from cxr.model.network import rename_old_densenet_key
from cxr.model.registry import ARCHITECTURES, build, get_architecture

XRV_EXTRA = 'pip install "cxr[xrv]"'
XRV_PREFIX = "xrv:"
IMPORTED_LAYOUT = (
    "imported"  # split/dataset.json's layout: trained elsewhere, on data cxr never saw
)
# CheXNet's 14 findings in the order of its output layer (arnoweng/CheXNet's CLASS_NAMES and
# jrzech/reproduce-chexnet's PRED_LABEL are the same list).
CHEXNET_LABELS = PATHOLOGIES  # NIH's 14, in NIH's order
PICKLE_RISK = (
    "it needs full unpickling (Python's pickle), and unpickling a file can run any code its "
    "author put in it"
)


@dataclass
class Imported:
    """What an import wrote: the bundle's description and where the weights came from."""

    bundle: Path
    meta: BundleMeta
    note: dict[str, Any]


# ------------------------------------------------------------------------ torchxrayvision


def import_xrv_lib():
    try:
        import torchxrayvision as xrv
    except ImportError:
        raise ModelError(f"importing a torchxrayvision model needs it: {XRV_EXTRA}") from None
    return xrv


def xrv_weights_path(name: str, cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Where torchxrayvision keeps the weights of ``name`` (its ``get_weights`` rule), and
    their download address."""
    xrv = import_xrv_lib()
    urls = xrv.models.model_urls
    if name not in urls:
        known = ", ".join(k for k in urls if "-" in k)
        raise ModelError(f"xrv:{name}: not a torchxrayvision model (known: {known})")
    url = urls[name]["weights_url"]
    folder = str(cache_dir) if cache_dir is not None else xrv.utils.get_cache_dir()
    return Path(os.path.expanduser(os.path.join(folder, os.path.basename(url)))), url


def load_xrv_model(name: str, cache_dir: str | os.PathLike | None = None) -> nn.Module:
    """torchxrayvision's model ``name`` from its cache, by its own API; never downloads."""
    path, url = xrv_weights_path(name, cache_dir)
    if not path.is_file():
        raise ModelError(
            f"xrv:{name}: its weights are not in torchxrayvision's cache ({path}). Download "
            f'them where there is internet, with wget {url} -O {path} or python -c "import '
            f"torchxrayvision as xrv; xrv.models.get_model('{name}')\", then copy that file "
            "here (or pass --xrv-cache DIR for another cache folder)."
        )
    xrv = import_xrv_lib()
    kwargs = {} if cache_dir is None else {"cache_dir": str(cache_dir)}
    try:
        if name.startswith(("densenet", "resnet")):
            model = xrv.models.get_model(name, **kwargs)
        else:  # the short aliases ('all', 'nih', ...) name DenseNets
            model = xrv.models.DenseNet(weights=name, **kwargs)
    except Exception as exc:
        raise ModelError(f"xrv:{name}: torchxrayvision could not load {path} ({exc})") from None
    return model.eval()


def import_xrv(
    name: str, out: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
) -> Imported:
    """Write torchxrayvision's model ``name`` as a cxr bundle in ``out``."""
    xrv = import_xrv_lib()
    model = load_xrv_model(name, cache_dir)
    if isinstance(model, xrv.models.ResNet):
        arch, state = model.weights.split("-")[0], model.model.state_dict()
    elif isinstance(model, xrv.models.DenseNet):
        arch = "densenet121"
        state = {k: v for k, v in model.state_dict().items() if k != "op_threshs"}
    else:
        raise ModelError(f"xrv:{name}: {type(model).__name__} models cannot be imported yet")
    labels = list(model.targets)
    op = getattr(model, "op_threshs", None)
    op = [float("nan")] * len(labels) if op is None else [float(v) for v in op]
    kept = [i for i, label in enumerate(labels) if label.strip()]
    net = build(arch, len(kept), channels=1)
    head_key = _head_key(net)
    state = dict(state)
    for suffix in ("weight", "bias"):
        state[f"{head_key}.{suffix}"] = state[f"{head_key}.{suffix}"][kept]
    _load(net, state, f"xrv:{name}")
    thresholds = [op[i] if op[i] == op[i] else DEFAULT_THRESHOLD for i in kept]
    entry = xrv.models.model_urls[name]
    note = {
        "kind": "torchxrayvision",
        "name": name,
        "torchxrayvision": getattr(xrv, "__version__", None),
        "weights_url": entry["weights_url"],
        "weights_file": str(xrv_weights_path(name, cache_dir)[0].name),
        "dropped_outputs": [i for i in range(len(labels)) if i not in kept],
        "no_operating_point": [labels[i] for i in kept if op[i] != op[i]],
        "thresholds": "torchxrayvision's op_threshs",
    }
    meta = BundleMeta(
        image_size=int(getattr(model, "input_resolution", 224)),
        normalization="xrv",
        channels=1,
        resize_rule="xrv",
        architecture=arch,
        labels=[labels[i] for i in kept],
        thresholds=thresholds,
        threshold_rule="torchxrayvision op_threshs (its operating points)",
        source=note,
        card=_card(f"torchxrayvision {name}: {entry.get('description', '')}".strip()),
    )
    return _write(out, net, meta, note)


# ------------------------------------------------------------------------------- files


def import_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    arch: str | None = None,
    labels: Sequence[str] | None = None,
    trust_pickle: bool = False,
    image_size: int = 224,
    resize_to: int | None = None,
    normalization: str = "imagenet",
) -> Imported:
    """Write a CheXNet checkpoint (arnoweng/CheXNet's ``model.pth.tar``, jrzech's
    ``checkpoint``) or a plain state dict for ``arch`` as a cxr bundle in ``out``.

    Without ``labels`` a 14-output checkpoint is taken to be CheXNet's (its label order); any
    other needs them. arnoweng's CheXNet resized to 256 and cropped 224 (the centre one of its
    ten crops), so that is the default for its format; ``resize_to`` overrides it.
    """
    path = Path(path)
    loaded = read_checkpoint(path, trust_pickle=trust_pickle)
    state, kind = _state_dict(loaded, path)
    state, wrapped = _canonical_keys(state)
    if wrapped:
        kind = "arnoweng-chexnet"
    arch = arch or _guess_arch(state, path)
    get_architecture(arch)
    outputs, channels = _outputs_and_channels(arch, state, path)
    if labels is None:
        if outputs != len(CHEXNET_LABELS):
            raise ModelError(
                f"{path}: {outputs} outputs; give their labels in order with --labels FILE"
            )
        labels = CHEXNET_LABELS
    labels = list(labels)
    if len(labels) != outputs:
        raise ModelError(f"{path}: {outputs} outputs but {len(labels)} labels were given")
    net = build(arch, outputs, channels=channels)
    _load(net, state, str(path))
    if resize_to is None and kind == "arnoweng-chexnet":
        resize_to = 256
    note = {
        "kind": kind,
        "file": path.name,
        "sha256": weights_digest(path),
        "unpickled": bool(trust_pickle and kind == "pickled-model"),
    }
    meta = BundleMeta(
        image_size=image_size,
        normalization=normalization,
        channels=channels,
        resize_to=resize_to if resize_to and resize_to != image_size else None,
        architecture=arch,
        labels=labels,
        source=note,
        card=_card(f"a {kind} checkpoint imported from {path.name} (trained outside cxr)"),
    )
    return _write(out, net, meta, note)


def read_checkpoint(path: Path, *, trust_pickle: bool = False) -> Any:
    """The file's content by ``torch.load(weights_only=True)``; a file that needs full
    unpickling is refused (nothing in it runs) unless ``trust_pickle``."""
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ModelError(
                f"{path}: refused: {PICKLE_RISK}. torch.load(weights_only=True) stopped at: "
                f"{first[:200]}. If you trust where this file came from, pass --trust-pickle "
                "(or re-save it as a state dict: torch.save(model.state_dict(), 'weights.pt'))."
            ) from None
    except Exception as exc:
        raise ModelError(f"{path}: not a PyTorch checkpoint ({exc.__class__.__name__})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelError(f"{path}: cannot be unpickled ({exc.__class__.__name__}: {exc})") from None


def _state_dict(loaded: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(loaded, nn.Module):
        return loaded.state_dict(), "pickled-model"
    if isinstance(loaded, dict):
        model = loaded.get("model")
        if isinstance(model, nn.Module):  # jrzech/reproduce-chexnet's checkpoint
            return model.state_dict(), "pickled-model"
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(loaded.get(key), dict):
                return dict(loaded[key]), "checkpoint"
        if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
            return dict(loaded), "state-dict"
    raise ModelError(f"{path}: no state dict in it (expected tensors, or a 'state_dict' entry)")


def _canonical_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """torchvision's key names: no DataParallel ``module.``, no CheXNet wrapper
    ``densenet121.``, ``norm1`` for ``norm.1``, ``classifier`` for ``classifier.0`` (the
    Linear before CheXNet's Sigmoid); and whether the CheXNet wrapper was there."""
    renamed, wrapped = {}, False
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if key.startswith("densenet121."):
            key, wrapped = key[len("densenet121.") :], True
        key = rename_old_densenet_key(key)  # torchvision 0.2's names
        if key.startswith("classifier.0."):
            key = "classifier." + key[len("classifier.0.") :]
        renamed[key] = value
    return renamed, wrapped


def _guess_arch(state: dict[str, torch.Tensor], path: Path) -> str:
    if any(k.startswith("features.denseblock") for k in state):
        return "densenet121"
    raise ModelError(
        f"{path}: say which architecture it is with --arch ({', '.join(ARCHITECTURES)})"
    )


def _outputs_and_channels(arch: str, state: dict[str, torch.Tensor], path: Path) -> tuple[int, int]:
    probe = build(arch, 1, channels=3)
    head = _head_key(probe)
    weight = state.get(f"{head}.weight")
    if weight is None or weight.ndim != 2:
        raise ModelError(f"{path}: no {head}.weight (the final linear layer of {arch})")
    first = next(k for k, v in probe.state_dict().items() if v.ndim == 4)
    channels = int(state[first].shape[1]) if first in state else 3
    if channels not in (1, 3):
        raise ModelError(f"{path}: its first layer reads {channels} channels (1 or 3 supported)")
    return int(weight.shape[0]), channels


def _head_key(model: nn.Module) -> str:
    from cxr.model.bundle import classifier_key

    return classifier_key(model)


def _load(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        text = str(exc).replace("\n", " ")
        raise ModelError(f"{source}: weights do not fit the architecture ({text[:400]})") from None


def _card(description: str) -> ModelCard:
    from cxr import __version__

    return ModelCard(
        training_data=TrainingData(origin="other", synthetic=False, description=description),
        limitations=[
            "Trained outside cxr: its training data, split and method are as its authors "
            "describe them; cxr has not measured it until `cxr evaluate` is run on "
            "labelled data.",
            *COMMON_LIMITATIONS[:2],
        ],
        cxr_version=__version__,
    )


def _write(out: str | os.PathLike, net: nn.Module, meta: BundleMeta, note: dict) -> Imported:
    """The bundle, laid out as a run folder without splits (config.json, split/dataset.json
    with layout ``imported``, run.json): the commands that take a run (evaluate --data,
    calibrate, thresholds, report, card) then take an imported model as they are."""
    from cxr.config import TrainConfig
    from cxr.data.split import write_split_info
    from cxr.run import RunFolder

    folder = save_bundle(out, net, meta).parent
    run = RunFolder(folder)
    config = TrainConfig(
        image_size=meta.image_size, normalization=meta.normalization, arch=meta.architecture,
        weights="none",
    )  # fmt: skip
    run.write_json(run.config, config.to_dict())
    run.split_dir.mkdir(exist_ok=True)
    write_split_info(run.split_dir, {"layout": IMPORTED_LAYOUT, "labels": list(meta.labels)})
    run.write_json(run.info, {"init": {"init": "imported", **note}})
    return Imported(folder, meta, note)


def describe(imported: Imported) -> str:
    return json.dumps({"bundle": str(imported.bundle), **imported.note}, indent=2)
