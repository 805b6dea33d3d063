"""``cxr.open_dataset``: any dataset cxr reads, as one typed value a notebook can hold."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.data.datasets import DatasetSpec, dataset_summary, label_counts, read_dataset
from cxr.data.schema import PATH_COLUMN, PATIENT_COLUMN
from cxr.data.split import Split, dataset_split, split_by_patients
from cxr.data.table import LabeledData
from cxr.errors import DataError


@dataclass
class Dataset:
    """One row per image (:attr:`table`) and the labels in the dataset's order.

    ``table`` has the columns every layout shares (``Image Index``, ``Patient ID``, ``path``
    when the images were looked for, one column per label with 1 / 0 / -1 uncertain / NaN
    unknown, and ``Patient Gender``, ``age_years``, ``View Position`` where the dataset has
    them). ``layout`` is the reader that read it (``nih``, ``chexpert``, ``mimic`` or
    ``generic``); ``spec`` is how it was read, which a run records so that it can be read
    again. A filtered copy (:meth:`subset`) trains, splits and evaluates like the original.
    """

    table: pd.DataFrame
    labels: tuple[str, ...]
    layout: str
    source: Path
    spec: DatasetSpec = field(default_factory=DatasetSpec)
    image_root: Path | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return (
            f"Dataset(layout={self.layout!r}, images={len(self.table):,}, "
            f"patients={self.patients:,}, labels={len(self.labels)}, source={str(self.source)!r})"
        )

    @property
    def patients(self) -> int:
        return int(self.table[PATIENT_COLUMN].nunique())

    @property
    def has_images(self) -> bool:
        """Whether each row's image file was found (``open_dataset(require_images=True)``)."""
        return PATH_COLUMN in self.table.columns and bool((self.table[PATH_COLUMN] != "").all())

    def label_counts(self) -> pd.DataFrame:
        """Per label (rows, in order): positive, negative, uncertain and blank cells, and the
        share of images positive."""
        counts = pd.DataFrame.from_dict(label_counts(self.table, self.labels), orient="index")
        counts["prevalence"] = counts["positive"] / len(self.table) if len(self.table) else np.nan
        counts.index.name = "label"
        return counts

    def summary(self) -> dict[str, Any]:
        """What ``cxr data stats --json`` prints: images, patients, views, sex, age, labels."""
        return dataset_summary(self._labeled())

    def subset(self, rows: pd.Series | np.ndarray | list[bool] | slice) -> Dataset:
        """The images where ``rows`` (a boolean mask or a slice of the table) holds, e.g.
        ``ds.subset(ds.table["View Position"] == "PA")``."""
        table = self.table[rows] if not isinstance(rows, slice) else self.table.iloc[rows]
        if table.empty:
            raise DataError(f"{self.source}: the subset has no image")
        return replace(self, table=table.reset_index(drop=True), notes=list(self.notes))

    def split(
        self,
        *,
        val_patients: int | None = None,
        test_patients: int | None = None,
        val_fraction: float | None = None,
        test_fraction: float | None = None,
        seed: int = 0,
        official: bool = False,
        lists: str | os.PathLike | None = None,
    ) -> Split:
        """A patient-level split stratified on the labels (``cxr data split``): no patient is
        in two sets. Each set is sized by a patient count or a fraction (default val 0.1,
        test 0.2). ``cxr.train(ds, split=...)`` takes it, and
        :func:`cxr.data.split.write_split` writes it as a split folder.

        ``official=True`` is ``cxr data split --official``: the dataset's own test set (NIH's
        test_list.txt, found beside the table or in ``lists``; CheXpert's valid.csv; MIMIC's
        split table), validation carved out of the rest by patient."""
        if official:
            if test_patients is not None or test_fraction is not None:
                raise DataError("an official split has its own test set: no test size applies")
            return dataset_split(
                self.table, labels=self.labels, layout=self.layout,
                search=[lists] if lists else [self.source.parent, self.source],
                val_patients=val_patients, val_fraction=val_fraction, seed=seed,
            )  # fmt: skip
        return split_by_patients(
            self.table, val_patients=val_patients, test_patients=test_patients,
            val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
            labels=self.labels, layout=self.layout,
        )  # fmt: skip

    def _labeled(self) -> LabeledData:
        return LabeledData(
            table=self.table, labels=self.labels, layout=self.layout, source=self.source,
            image_root=self.image_root, notes=list(self.notes),
        )  # fmt: skip

    @classmethod
    def _from_labeled(cls, data: LabeledData, spec: DatasetSpec) -> Dataset:
        return cls(
            table=data.table, labels=tuple(data.labels), layout=data.layout,
            source=Path(data.source), spec=spec, image_root=data.image_root,
            notes=list(data.notes),
        )  # fmt: skip


def open_dataset(
    source: str | os.PathLike,
    *,
    layout: str = "auto",
    table: str | os.PathLike | None = None,
    image_col: str | None = None,
    patient_col: str | None = None,
    labels: str | list[str] | tuple[str, ...] | None = None,
    view_col: str | None = None,
    sex_col: str | None = None,
    age_col: str | None = None,
    image_root: str | os.PathLike | None = None,
    views: str | list[str] | tuple[str, ...] | None = None,
    require_images: bool = True,
    drop_missing: bool = False,
) -> Dataset:
    """Read the dataset at ``source``: an NIH ChestX-ray14, CheXpert or MIMIC-CXR-JPG folder
    or table (the layout is detected), or a table of your own images with ``image_col``,
    ``patient_col`` and ``labels`` (or a ``dataset.toml`` beside it). The options are
    ``cxr train``'s dataset options (``--layout``, ``--image-col``, ...).

    With ``require_images`` every listed image is looked for and a missing one raises
    :class:`cxr.errors.DataError` naming it, unless ``drop_missing``; without it only the
    table is read (statistics and splits need no images).
    """
    spec = DatasetSpec(
        layout=layout,
        table=None if table is None else str(table),
        image_col=image_col,
        patient_col=patient_col,
        labels=labels,
        view_col=view_col,
        sex_col=sex_col,
        age_col=age_col,
        image_root=None if image_root is None else str(image_root),
        views=views,
    )
    data = read_dataset(source, spec, require_images=require_images, drop_missing=drop_missing)
    return Dataset._from_labeled(data, spec)
