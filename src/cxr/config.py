"""One typed training configuration; defaults follow the CheXNet-style method."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 has no tomllib; the tomli backport is a dependency there
    import tomli as tomllib

NORMALIZATIONS = ("imagenet", "sample", "xrv")
CHECK_MODES = ("header", "full", "none")
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
# The input sizes a model may be trained and run at: below 32 px DenseNet121's feature map
# vanishes; above 1024 px (NIH's own size) an image is only upsampled, and one image costs
# gigabytes (a bundle's image_size is checked against the same range).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024


@dataclass
class TrainConfig:
    # Input
    image_size: int = 224
    normalization: str = "imagenet"  # ImageNet mean/std, or "sample": each image to mean 0 / std 1
    scale_min: float = 1.0  # random scaling before the centre crop (training only)
    scale_max: float = 1.15
    hflip: bool = True
    # Model
    weights: str = "imagenet"  # "imagenet", "none", a local weights file, or a bundle / run
    arch: str = "densenet121"  # a name of cxr.model.registry.ARCHITECTURES (timm for the others)
    freeze_backbone: bool = False  # train only the classifier (linear probing)
    # Uncertain (-1) labels in training (Irvin et al. 2019): "ignore" leaves them out of the
    # loss (U-Ignore), "zeros" / "ones" count them negative / positive (U-Zeros / U-Ones).
    uncertain: str = "ignore"
    # Optimisation
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_factor: float = 0.1  # ReduceLROnPlateau on validation loss
    plateau_patience: int = 1
    max_epochs: int = 20
    max_plateaus: int = 3  # stop once the lr has been divided this many times and plateaus again
    # Runtime
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when present, else CPU
    amp: bool = True  # mixed precision: CUDA, and bf16 on CPUs that compute it natively
    workers: int | None = None  # DataLoader workers; None: one per core but one, at most 16
    channels_last: bool = True  # NHWC memory layout (faster convolutions on CUDA and CPU)
    compile: bool = False
    drop_missing: bool = False
    cache: str | None = None  # a `cxr data cache` folder to read pre-decoded images from
    # Before training: "header" reads each image's header (nearly free), "full" decodes each
    # one, "none" skips the check (a cache's build decoded every image already).
    check_images: str = "header"
    skip_bad_images: bool = False  # train without unreadable images (warned) instead of refusing
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> TrainConfig:
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"normalization must be one of {', '.join(NORMALIZATIONS)}, "
                f"not {self.normalization!r}"
            )
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(
                f"image_size must be from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels, "
                f"not {self.image_size}"
            )
        if not 0 < self.scale_min <= self.scale_max:
            raise ConfigError("need 0 < scale_min <= scale_max")
        for name in ("batch_size", "max_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.lr <= 0:
            raise ConfigError("lr must be positive")
        if self.workers is not None and (
            not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 0
        ):
            raise ConfigError(f"workers must be a whole number >= 0, not {self.workers!r}")
        if self.cache is not None and not isinstance(self.cache, str):
            raise ConfigError(f"cache must be a folder path, not {self.cache!r}")
        if isinstance(self.check_images, bool):  # config files of cxr 0.1: true / false
            self.check_images = "header" if self.check_images else "none"
        if self.check_images not in CHECK_MODES:
            raise ConfigError(
                f"check_images must be one of {', '.join(CHECK_MODES)}, not {self.check_images!r}"
            )
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise ConfigError(
                f"uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, not {self.uncertain!r}"
            )
        if self.cache == "":
            self.cache = None
        # The architecture's name is checked against the model registry where a run starts
        # (cxr.workflows.train.create_run): the configuration sits below the model layer.
        if not self.arch or not isinstance(self.arch, str):
            raise ConfigError("arch must name an architecture (e.g. densenet121)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        defaults = cls()
        converted = {}
        for key, value in values.items():
            default = getattr(defaults, key)
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ConfigError(f"{source}: {key} must be true or false, not {value!r}")
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                try:
                    value = type(default)(value)
                except (TypeError, ValueError):
                    raise ConfigError(f"{source}: {key} must be a number, not {value!r}") from None
            converted[key] = value
        return cls(**converted).validate()

    def updated(self, **overrides: Any) -> TrainConfig:
        values = self.to_dict()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return TrainConfig.from_dict(values, source="options")


def load_config(path: str | Path) -> TrainConfig:
    """Read a JSON or TOML config file (keys are TrainConfig's fields)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    try:
        values = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except Exception as exc:
        raise ConfigError(
            f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'} ({exc})"
        ) from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a table of settings")
    values = values.get("train", values)
    return TrainConfig.from_dict(values, source=str(path))
