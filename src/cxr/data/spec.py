"""How to read a dataset (:class:`DatasetSpec`): its layout, and for a table of the user's own
images which columns hold what. Whether the layout is one cxr knows is asked of the registry
(:func:`cxr.data.layouts.get_layout`) when the dataset is read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from cxr.errors import DataError

AUTO = "auto"
ALL_VIEWS = "all"
DATASET_FILES = ("dataset.toml", "dataset.json")


@dataclass(frozen=True)
class DatasetSpec:
    """How to read a dataset: its layout (``auto`` tells it from the files) and, for a
    generic table, which columns hold what. ``views``: ``None`` keeps the frontal views where
    the table says which they are; ``("all",)`` keeps every view."""

    layout: str = AUTO
    table: str | None = None
    image_col: str | None = None
    patient_col: str | None = None
    labels: tuple[str, ...] | None = None
    view_col: str | None = None
    sex_col: str | None = None
    age_col: str | None = None
    image_root: str | None = None
    views: tuple[str, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.layout, str) or not self.layout.strip():
            raise DataError(f"dataset layout {self.layout!r}: expected a layout name or auto")
        for name in ("labels", "views"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, split_names(value))
            elif value is not None:
                object.__setattr__(self, name, tuple(str(v) for v in value))

    @property
    def describes_table(self) -> bool:
        return any((self.image_col, self.patient_col, self.labels, self.table))

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def merged(self, other: DatasetSpec) -> DatasetSpec:
        """``other``'s settings where given, this one's elsewhere (options over a file)."""
        values = asdict(self)
        for f in fields(other):
            value = getattr(other, f.name)
            if value is not None and not (f.name == "layout" and value == AUTO):
                values[f.name] = value
        return DatasetSpec(**values)


def split_names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())
