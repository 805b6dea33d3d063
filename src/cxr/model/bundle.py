"""The model bundle: ``model.safetensors`` (weights) + ``model.json`` (:class:`BundleMeta`).

A bundle is everything needed to use a trained model on new images. Its description is one
typed object whose defaults live here and nowhere else; every consumer (evaluate, calibrate,
predict, the ONNX export, the service, the report) reads it through :func:`read_bundle_meta`
or :func:`load_bundle`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticUndefined
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from cxr.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, NORMALIZATIONS
from cxr.data.transforms import RESIZE_RULES, Preprocess
from cxr.errors import ModelError
from cxr.labels import PATHOLOGIES, label_name_problem
from cxr.model.card import ModelCard
from cxr.model.network import unwrap
from cxr.model.registry import ARCHITECTURES, DEFAULT_ARCHITECTURE, architecture_of, build
from cxr.utils import atomic_write_bytes, atomic_write_text

BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_META = "model.json"
BUNDLE_FORMAT = "cxr-bundle/1"
OUTPUTS = ("sigmoid",)
DEFAULT_THRESHOLD = 0.5
# Written only when set: a bundle gains them as it is trained, calibrated and thresholded.
_OPTIONAL = (
    "epoch",
    "val_loss",
    "val_auroc_mean",
    "training_data",
    "calibration",
    "threshold_fit",
    "card",
    "ood",
    "source",
)
# Preprocessing beyond image_size and normalization, written only when not the default, so a
# bundle made before they existed has the same description (and meta_digest) as before.
_PREPROCESSING_DEFAULTS = {"channels": 3, "resize_to": None, "resize_rule": "shorter-side"}
# What describes the model without changing what it computes: left out of meta_digest, so
# that refreshing the card neither re-exports ONNX nor makes predictions stale.
_DESCRIPTIVE = ("card", "ood", "source")
# A model.json must say these itself: a default would guess which output is which pathology
# and what input the weights were trained on.
_REQUIRED_IN_FILE = ("labels", "image_size")
# Fields code may give as numpy scalars and arrays or tuples (PATHOLOGIES is one); made plain
# Python before the strict checks. JSON has none of these, so a file is judged as written.
_FROM_CODE = ("image_size", "labels", "thresholds", "temperature", "epoch", "val_loss")
_FROM_CODE += ("val_auroc_mean",)

Threshold = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class OodEntry(BaseModel):
    """``model.json``'s ``ood``: the out-of-distribution summary beside the weights
    (:mod:`cxr.model.ood`). The file name is fixed, so a description can never point a
    reader at another path."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    file: Literal["ood.safetensors"]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    method: Literal["mahalanobis-ledoitwolf"]
    features: Annotated[int, Field(ge=1, le=2048)]
    reference_images: Annotated[int, Field(ge=4)]
    flag_percentile: Annotated[float, Field(gt=0, lt=100, allow_inf_nan=False)]


class BundleMeta(BaseModel):
    """What ``model.json`` holds: the labels and their order, the input the model expects,
    the decision thresholds and the calibration, and how the model was trained.

    Validated when made (strict types: ``image_size`` ``"224"``, ``224.0`` or ``true`` is
    refused, not converted), so a description that exists is one the model can run with.
    Made from a file with :meth:`from_dict`, whose errors name the file and the field.
    """

    # Strict: JSON's "224" is not 224. Frozen: a change goes through updated(), which checks.
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    image_size: Annotated[int, Field(ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)]
    normalization: str = "imagenet"
    labels: list[str] = Field(default_factory=lambda: list(PATHOLOGIES))
    thresholds: list[Threshold] | None = None  # None: DEFAULT_THRESHOLD for every label
    threshold_rule: str | None = None
    temperature: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    format: str = BUNDLE_FORMAT
    architecture: str = DEFAULT_ARCHITECTURE  # a name of cxr.model.registry.ARCHITECTURES
    channels: Literal[1, 3] = 3  # what the first layer reads: the grey image once or thrice
    resize_to: Annotated[int, Field(ge=MIN_IMAGE_SIZE, le=4 * MAX_IMAGE_SIZE)] | None = None
    resize_rule: str = "shorter-side"  # cxr.data.transforms.RESIZE_RULES
    output: str = "sigmoid"
    epoch: Annotated[int, Field(ge=0)] | None = None
    val_loss: float | None = None
    val_auroc_mean: float | None = None
    training_data: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    threshold_fit: dict[str, Any] | None = None
    card: ModelCard | None = None  # what the model is for and was trained on (cxr.model.card)
    ood: OodEntry | None = None
    source: dict[str, Any] | None = None  # where an imported model came from (cxr model import)
    extra: dict[str, Any] = Field(default_factory=dict)  # keys of newer versions, kept

    def __init__(self, image_size: Any = PydanticUndefined, /, **values: Any):
        # ``BundleMeta(224, ...)`` as well as ``BundleMeta(image_size=224, ...)``.
        if image_size is not PydanticUndefined:
            values["image_size"] = image_size
        try:
            super().__init__(**_plain(values))
        except ValidationError as exc:
            raise _InvalidMeta(_problems(exc)) from None

    @field_validator("normalization", "format", "architecture", "output", "resize_rule")
    @classmethod
    def _known_name(cls, value: str, info: ValidationInfo) -> str:
        known = {
            "normalization": NORMALIZATIONS,
            "format": (BUNDLE_FORMAT,),
            "architecture": tuple(ARCHITECTURES),
            "output": OUTPUTS,
            "resize_rule": RESIZE_RULES,
        }
        return _one_of(value, known[info.field_name])

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: list[str]) -> list[str]:
        # A blank or repeated label would collapse two outputs into one JSON key or CSV column.
        if not labels:
            raise ValueError("expected at least one label, got none")
        blank = [i for i, label in enumerate(labels) if not label.strip()]
        if blank:
            raise ValueError(f"expected non-empty labels, got {_shown(labels[blank[0]])}")
        for label in labels:
            problem = label_name_problem(label)
            if problem:
                raise ValueError(f"label {_shown(label)} cannot be used: {problem}")
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"expected distinct labels, got repeated {', '.join(repeated)}")
        return labels

    @field_validator("thresholds")
    @classmethod
    def _one_threshold_per_label(cls, thresholds: list[float] | None, info) -> list[float] | None:
        labels = info.data.get("labels")  # absent when the labels themselves were refused
        if thresholds is not None and labels is not None and len(thresholds) != len(labels):
            raise ValueError(
                f"expected {len(labels)} values (one per label), got {len(thresholds)}"
            )
        return thresholds

    @property
    def decision_thresholds(self) -> list[float]:
        """One threshold per label: the stored ones, else the default."""
        if self.thresholds is not None:
            return [float(v) for v in self.thresholds]
        return [DEFAULT_THRESHOLD] * len(self.labels)

    @property
    def effective_temperature(self) -> float:
        return float(self.temperature)

    @property
    def preprocess(self) -> Preprocess:
        """What every consumer (predict, evaluate, explain, serve, the DICOM node) does to an
        image before this model sees it."""
        return Preprocess(
            self.image_size,
            self.normalization,
            channels=self.channels,
            resize_to=self.resize_to,
            resize_rule=self.resize_rule,
        )

    def to_dict(self) -> dict[str, Any]:
        values = {
            "format": self.format,
            "architecture": self.architecture,
            "labels": list(self.labels),
            "image_size": int(self.image_size),
            "normalization": self.normalization,
            "output": self.output,
            "thresholds": self.thresholds,
            "threshold_rule": self.threshold_rule,
            "temperature": self.temperature,
        }
        values.update(
            {
                k: getattr(self, k)
                for k, default in _PREPROCESSING_DEFAULTS.items()
                if getattr(self, k) != default
            }
        )
        values.update(
            {
                k: v.model_dump() if isinstance(v, BaseModel) else v
                for k in _OPTIONAL
                if (v := getattr(self, k)) is not None
            }
        )
        values.update(self.extra)
        return values

    @classmethod
    def from_dict(cls, values: Any, *, source: str = BUNDLE_META) -> BundleMeta:
        """A checked description from ``model.json``'s content; :class:`ModelError` names
        ``source`` and each field that is wrong."""
        if not isinstance(values, dict):
            raise ModelError(
                f"{source}: expected a JSON object describing the model, got {_json_type(values)}"
            )
        for key in _REQUIRED_IN_FILE:
            if key not in values:
                raise ModelError(f"{source}: {key}: missing (every {BUNDLE_META} states it)")
        names = set(cls.model_fields) - {"extra"}
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names}
        # null says "not scaled", as a missing key does; 0 or a negative one is refused.
        if known.get("temperature", 1.0) is None:
            known["temperature"] = 1.0
        try:
            return cls(**known, extra=extra)
        except _InvalidMeta as exc:
            raise ModelError(f"{source}: {exc.problems}") from None

    def updated(self, **changes: Any) -> BundleMeta:
        return BundleMeta.from_dict({**self.to_dict(), **changes})


class _InvalidMeta(ModelError):
    """A description that fails the checks; :meth:`BundleMeta.from_dict` names its file."""

    def __init__(self, problems: str):
        super().__init__(f"{BUNDLE_META}: {problems}")
        self.problems = problems


def meta_digest(meta: BundleMeta) -> str:
    """SHA-256 of the description's canonical JSON (sorted keys, no spaces), without the
    parts that only describe the model (its card, its out-of-distribution summary)."""
    values = {k: v for k, v in meta.to_dict().items() if k not in _DESCRIPTIVE}
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _one_of(value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}, got {_shown(value)}")
    return value


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """numpy values and tuples in the fields of :data:`_FROM_CODE` as Python numbers and
    lists, so that the strict checks judge the value (np.float32(0.3) is a number, a tuple of
    labels is a list of them) and not its type."""
    plain = dict(values)
    for key in _FROM_CODE:
        value = plain.get(key)
        if isinstance(value, (np.ndarray, np.generic)):
            plain[key] = value.tolist()
        elif isinstance(value, (list, tuple)):
            plain[key] = [v.item() if isinstance(v, np.generic) else v for v in value]
    return plain


# Pydantic's wording for the checks a bundle fails, in the "expected ..., got ..." form.
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "an object",
    "finite_number": "a finite number",
}


def _problems(exc: ValidationError) -> str:
    """One line: ``field: expected ..., got ...`` for each error, separated by ``; ``."""
    return "; ".join(_problem(error) for error in exc.errors(include_url=False))


def _problem(error: dict[str, Any]) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
    kind, ctx, got = error["type"], error.get("ctx") or {}, _shown(error.get("input"))
    if kind == "value_error":
        text = str(ctx.get("error", error["msg"]))
    elif kind == "missing":
        text = "missing"
    elif kind == "extra_forbidden":
        text = "not a field of a bundle description"
    elif kind in _EXPECTED:
        text = f"expected {_EXPECTED[kind]}, got {got}"
    elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        bound = {"ge": "at least", "le": "at most", "gt": "more than", "lt": "less than"}
        (name, limit), *_ = ctx.items()
        text = f"expected {bound[name]} {limit:g}, got {got}"
    else:
        text = f"{error['msg'][:1].lower()}{error['msg'][1:]}, got {got}"
    return f"{where or 'description'}: {text}"


def _shown(value: Any, limit: int = 40) -> str:
    """A value as the JSON file spells it (NaN as nan), shortened."""
    if isinstance(value, float) and not math.isfinite(value):
        text = str(value)
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    names = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else "a value")


@dataclass
class Bundle:
    """A trained model and its description."""

    model: nn.Module
    meta: BundleMeta

    @property
    def labels(self) -> list[str]:
        return list(self.meta.labels)

    @property
    def image_size(self) -> int:
        return self.meta.image_size

    @property
    def normalization(self) -> str:
        return self.meta.normalization

    @property
    def thresholds(self) -> list[float]:
        return self.meta.decision_thresholds

    @property
    def temperature(self) -> float:
        return self.meta.effective_temperature

    @property
    def preprocess(self) -> Preprocess:
        return self.meta.preprocess


def resolve_bundle(path: str | Path) -> tuple[Path, Path]:
    """Accept a run folder, a bundle folder, ``model.json`` or ``model.safetensors``."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights, meta = directory / BUNDLE_WEIGHTS, directory / BUNDLE_META
    if not path.exists():
        raise ModelError(f"{path}: no such model (expected a run folder or a bundle)")
    if not weights.exists() or not meta.exists():
        raise ModelError(
            f"{directory}: no model bundle here (need {BUNDLE_WEIGHTS} and {BUNDLE_META}; "
            "a run gets them after its first validated epoch)"
        )
    return weights, meta


def read_bundle_meta(path: str | Path) -> BundleMeta:
    """The bundle's description, without loading the weights."""
    meta_path = resolve_bundle(path)[1]
    try:
        values = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{meta_path}: unreadable bundle description ({exc})") from None
    return BundleMeta.from_dict(values, source=str(meta_path))


def save_bundle(directory: str | Path, model: nn.Module, meta: BundleMeta) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (each atomically) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    atomic_write_bytes(directory / BUNDLE_WEIGHTS, save(state, metadata={"format": "cxr"}))
    write_bundle_meta(directory, meta)
    return directory / BUNDLE_META


def write_bundle_meta(directory: str | Path, meta: BundleMeta) -> None:
    atomic_write_text(Path(directory) / BUNDLE_META, json.dumps(meta.to_dict(), indent=2) + "\n")


def update_bundle_meta(directory: str | Path, **changes: Any) -> BundleMeta:
    """Change some entries of ``model.json`` (atomically); returns the new description.

    The result is checked like a file being read, so a bad change raises :class:`ModelError`
    and the file on disk stays as it was.
    """
    meta_path = resolve_bundle(directory)[1]
    values = {**read_bundle_meta(directory).to_dict(), **changes}
    meta = BundleMeta.from_dict(values, source=f"{meta_path} (update)")
    write_bundle_meta(meta_path.parent, meta)
    return meta


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: unreadable safetensors file ({exc})") from None


def load_bundle(path: str | Path, *, device: str | torch.device = "cpu") -> Bundle:
    """The model in eval mode on ``device``, with its description."""
    weights, meta_path = resolve_bundle(path)
    meta = read_bundle_meta(path)  # checked first: nothing is built for a bad description
    state = _read_weights(weights)
    model = build(meta.architecture, len(meta.labels), meta.channels, image_size=meta.image_size)
    key = classifier_key(model) + ".weight"
    if key in state and state[key].ndim >= 1:
        check_outputs(meta, int(state[key].shape[0]), meta_path, f"{weights.name}'s {key}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{weights}: weights do not fit the model ({exc})") from None
    model.to(device).eval()
    return Bundle(model=model, meta=meta)


def check_outputs(meta: BundleMeta, outputs: int | None, source: str | Path, model: str) -> None:
    """One label per model output; ``outputs`` None (unknown) passes."""
    if outputs is not None and outputs != len(meta.labels):
        raise ModelError(
            f"{source}: labels: expected {outputs} labels (one per output of {model}), "
            f"got {len(meta.labels)}"
        )


def shift_classifier_bias(directory: str | Path, shift: np.ndarray) -> None:
    """Add ``shift`` to the classifier's bias in ``model.safetensors`` (atomically)."""
    path = resolve_bundle(directory)[0]
    meta = read_bundle_meta(directory)
    key = classifier_key(build(meta.architecture, len(meta.labels), meta.channels)) + ".bias"
    state = _read_weights(path)
    bias = state.get(key)
    if bias is None or bias.shape != (len(shift),):
        raise ModelError(f"{path}: no classifier bias of {len(shift)} outputs to calibrate")
    state[key] = (bias.double() + torch.from_numpy(shift)).to(bias.dtype)
    atomic_write_bytes(path, save(state, metadata={"format": "cxr"}))


def classifier_key(model: nn.Module) -> str:
    """The state-dict prefix of the model's final linear layer (``classifier``, ``fc``,
    ``head``, ``head.fc``, ...: each family names it its own way)."""
    model = unwrap(model)
    target = architecture_of(model).classifier(model)
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ModelError(f"{type(model).__name__}: its classifier is not one of its modules")


def weights_digest(weights: str | Path) -> str:
    """SHA-256 of a weights file, read in blocks."""
    digest = hashlib.sha256()
    with Path(weights).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
