"""The :class:`Layout` description and the registry of layouts (:func:`register`,
:func:`get_layout`, :func:`layout_names`, :func:`detect_layout`).

Kept apart from the package's ``__init__`` so that a layout module imports this one and
nothing imports back: the package imports the built-in layouts, each of which registers
itself here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cxr.data.spec import AUTO, DatasetSpec
from cxr.data.table import LabeledData, resolve_paths
from cxr.errors import DataError

# Detection order of a layout that does not choose one: after the layouts with a distinctive
# file (MIMIC's, CheXpert's), before NIH's, which claims any folder as the last resort.
DEFAULT_PRIORITY = 50


def find_images_by_path(
    tables: Sequence[LabeledData], *, drop_missing: bool = False
) -> list[LabeledData]:
    """Each table's images by their names, relative to its image root (or absolute)."""
    return [resolve_paths(data, drop_missing=drop_missing) for data in tables]


@dataclass(frozen=True)
class Layout:
    """What cxr knows about one dataset layout: how to tell it, read it and describe it.

    Everything that differs between layouts is a field here, so that the rest of cxr asks
    the layout (``layout.official_lists``) instead of comparing names.

    Reading:

    - ``read(source, spec)``: the dataset at ``source`` (a folder or a table; ``spec`` is the
      merged :class:`~cxr.data.spec.DatasetSpec`) as a :class:`LabeledData` in the canonical
      table of :mod:`cxr.data.schema`, images not yet looked for. It sets the image root
      (where the table's image names are relative to: ``spec.image_root`` when given).
    - ``find_images(tables, drop_missing=...)``: the same tables with each image's file in
      ``path``; several at once, so that a layout whose images are found by a walk of the
      tree (NIH's) walks it once. By default, names relative to the image root.
    - ``detect(source, spec)``: whether ``source`` is in this layout, for ``--layout auto``;
      ``None``: only chosen by name. Layouts are asked by ascending ``priority``.
    - ``labels``: its fixed label set in output order (``None``: the table names them).
    - ``read_split_file(table, path)`` / ``write_split_file(frame)``: a split table as read
      back (from text cells) and as written, where the layout keeps more than its label
      columns (NIH's ``Finding Labels``); ``None``: the label columns as written.
    - ``stats(table)``: the numbers ``cxr data stats`` shows when the layout has its own
      (NIH's published counts: ``images``, ``patients``, ``labels`` with ``count`` and
      ``prevalence``); ``None``: :func:`cxr.data.datasets.dataset_summary`.

    Facts:

    - ``title`` ("NIH ChestX-ray14"), ``short_name`` ("NIH", as in "not NIH data") and
      ``files`` ("NIH's Data_Entry_2017", in the message for an unknown table);
    - ``official_lists``: its test images are named by NIH-style ``train_val_list.txt`` /
      ``test_list.txt`` (else by ``source_split``, where it has one);
    - ``bounding_boxes``: it ships NIH's ``BBox_List_2017.csv``;
    - ``google2019_labels``: its images are those Majkowska et al. (2019) relabelled;
    - ``folder_has_images``: a folder of it is the download with its images, so a command
      that needs only the table still checks them (NIH's);
    - ``partial_download``: its download comes in parts that are often fetched alone (NIH's
      12 image archives), so scoring a model on it leaves out the images not on disk;
    - the model card's ``description`` of the data, its labels' ``label_source`` and their
      known ``limitation`` (a layout without a description is "other" on the card).
    """

    name: str
    title: str
    read: Callable[[Path, DatasetSpec], LabeledData]
    short_name: str = ""
    files: str | None = None
    detect: Callable[[Path, DatasetSpec], bool] | None = None
    priority: int = DEFAULT_PRIORITY
    labels: tuple[str, ...] | None = None
    find_images: Callable[..., list[LabeledData]] = find_images_by_path
    read_split_file: Callable[[pd.DataFrame, Path], pd.DataFrame] | None = None
    write_split_file: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    stats: Callable[[pd.DataFrame], dict[str, Any]] | None = None
    official_lists: bool = False
    bounding_boxes: bool = False
    google2019_labels: bool = False
    folder_has_images: bool = False
    partial_download: bool = False
    description: str | None = None
    label_source: str | None = None
    limitation: str | None = None

    def __post_init__(self):
        if not self.name or not self.name.isidentifier() or self.name == AUTO:
            raise ValueError(f"layout name {self.name!r}: expected a Python identifier, not auto")
        if not self.short_name:
            object.__setattr__(self, "short_name", self.title)

    def info(self) -> dict[str, Any]:
        """What a split folder records of a dataset in this layout with its fixed labels."""
        if self.labels is None:
            raise ValueError(f"layout {self.name!r} has no fixed label set")
        return {"layout": self.name, "labels": list(self.labels)}


_LAYOUTS: dict[str, Layout] = {}


def register(layout: Layout, *, replace: bool = False) -> Layout:
    """Add ``layout`` to the registry (``replace``: over one of the same name); returns it,
    so that a layout module can end with ``LAYOUT = register(Layout(...))``."""
    if layout.name in _LAYOUTS and not replace:
        raise ValueError(f"a dataset layout named {layout.name!r} is already registered")
    _LAYOUTS[layout.name] = layout
    return layout


def unregister(name: str) -> None:
    """Take the layout ``name`` out of the registry (a test's own layout, afterwards)."""
    _LAYOUTS.pop(name, None)


def layout_names() -> tuple[str, ...]:
    """The registered layouts' names, in registration order."""
    return tuple(_LAYOUTS)


def is_layout(name: str) -> bool:
    return name in _LAYOUTS


def get_layout(name: str) -> Layout:
    """The registered layout ``name`` (e.g. :attr:`LabeledData.layout`)."""
    try:
        return _LAYOUTS[name]
    except (KeyError, TypeError):
        raise DataError(
            f"unknown dataset layout {name!r}; choose {AUTO}, {', '.join(_LAYOUTS)}"
        ) from None


def detect_layout(source: Path, spec: DatasetSpec) -> Layout:
    """Which layout a folder or file is in, asking the layouts by ascending priority."""
    candidates = sorted(
        (layout for layout in _LAYOUTS.values() if layout.detect is not None),
        key=lambda layout: layout.priority,
    )
    for layout in candidates:
        if layout.detect(source, spec):
            return layout
    if source.is_file():
        known = ", ".join(layout.files for layout in _LAYOUTS.values() if layout.files)
        raise DataError(
            f"{source}: not a table cxr knows ({known}); for your own table pass --image-col, "
            "--patient-col and --labels, or a dataset file"
        )
    raise DataError(f"{source}: not a dataset layout cxr knows ({', '.join(_LAYOUTS)})")
