"""The run folder: one per training run, holding everything needed to reproduce and use it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.config import TrainConfig
from cxr.data.schema import PATH_COLUMN
from cxr.data.split import read_split_info, read_split_table, write_split_info
from cxr.errors import DataError
from cxr.utils import atomic_write_csv, atomic_write_text

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.json")
    info = property(lambda self: self.root / "run.json")
    split_dir = property(lambda self: self.root / "split")
    log_csv = property(lambda self: self.root / "log.csv")
    tensorboard = property(lambda self: self.root / "tensorboard")
    checkpoint = property(lambda self: self.root / "checkpoint.pt")
    metrics = property(lambda self: self.root / "metrics.json")

    def predictions(self, split: str) -> Path:
        return self.root / f"predictions-{split}.csv"

    def split_file(self, name: str) -> Path:
        return self.split_dir / f"{name}.csv"

    def exists(self) -> bool:
        return self.config.exists()

    def require(self) -> RunFolder:
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such run folder")
        if not self.config.exists():
            raise DataError(f"{self.root}: not a cxr run folder (no config.json)")
        return self

    def load_config(self) -> TrainConfig:
        return TrainConfig.from_dict(json.loads(self.config.read_text()), source=str(self.config))

    def load_info(self) -> dict[str, Any]:
        return json.loads(self.info.read_text()) if self.info.exists() else {}

    def write_json(self, path: Path, values: dict[str, Any]) -> None:
        atomic_write_text(path, json_text(values))

    def read_split(self, name: str) -> pd.DataFrame:
        """A split table of this run, with image paths, validated like any table of its
        layout."""
        path = self.split_file(name)
        if not path.exists():
            raise DataError(f"{path}: split file not found")
        return read_split_table(path, self.dataset_info())

    def dataset_info(self) -> dict[str, Any]:
        """The layout and label names the run was trained on (``split/dataset.json``)."""
        return read_split_info(self.split_dir)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.dataset_info()["labels"])

    def write_split(self, frames: dict[str, pd.DataFrame], info: dict[str, Any]) -> None:
        for name, frame in frames.items():
            atomic_write_csv(frame, self.split_file(name))
        write_split_info(self.split_dir, info)

    def clear_stale_temp_files(self) -> list[Path]:
        """Remove what an atomic write killed before its rename left behind."""
        stale = sorted(self.root.glob(".*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def read_metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics.read_text()) if self.metrics.exists() else {}


def require_paths(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    if PATH_COLUMN not in frame.columns or (frame[PATH_COLUMN] == "").any():
        raise DataError(f"{source}: images have no resolved paths")
    return frame


def json_text(values: dict[str, Any]) -> str:
    """``values`` as the run folder's JSON files hold them (numpy numbers and paths as JSON)."""
    return json.dumps(values, indent=2, default=_json_default) + "\n"


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")
