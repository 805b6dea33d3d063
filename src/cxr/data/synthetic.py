"""Generate a SYNTHETIC chest X-ray dataset laid out exactly like NIH ChestX-ray14.

The demo and the tests use it as their embedded default: it needs no download, and every
image carries a known, visible pattern for each of its labels, so a model can learn it and a
Grad-CAM heatmap can be scored against a box. It is not NIH data and not medical data.

Layout written into ``out`` (the same names and formats as NIH's release):

- ``Data_Entry_2017.csv``: NIH's 11-column header and v2020-style rows (integer age, M/F,
  PA/AP). ``OriginalImage[Width,Height]`` is the written image size and the pixel spacing
  is that of a ~366 mm field of view at that size.
- ``images/NNNNNNNN_NNN.png``: 8-bit grayscale, ``image_size`` x ``image_size``.
- ``BBox_List_2017.csv``: NIH's header and one ``name,label,x,y,w,h`` row per planted
  finding of every image (all 14 classes; ``Infiltrate`` spelled as NIH spells it). Unlike
  NIH's boxes, which are in the pixels of the 1024 px images, these are in the pixels of the
  written ``image_size`` images.
- ``train_val_list.txt`` / ``test_list.txt``: a patient-level split, ~20% of patients in test.
- ``README.txt``: says that the data is synthetic and how it was generated.

The images come from :mod:`cxr.data.synthetic_render` (deterministic for a seed whatever the
number of workers). ``layout="chexpert"`` or ``"mimic"`` writes the same kind of images in
CheXpert's or MIMIC-CXR-JPG's layout instead (:mod:`cxr.data.synthetic_layouts`); the
rendering, the workers and the overwrite guard are shared.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr import __version__
from cxr.data import synthetic_layouts
from cxr.data.synthetic_render import (  # noqa: F401  (the generator's names, importable here)
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    README_MARKER,
    README_NAME,
    Box,
    SynthSummary,
    _check_arguments,
    render_all,
    render_image,
    sample_population,
    write_atomically,
)
from cxr.errors import ConfigError
from cxr.labels import NO_FINDING, PATHOLOGIES

NIH_LAYOUT = "nih"
# The layouts the generator writes: NIH's here, the others in cxr.data.synthetic_layouts.
SYNTHETIC_LAYOUTS = (NIH_LAYOUT, *synthetic_layouts.LAYOUTS)
TABLE_NAME = "Data_Entry_2017.csv"
BOX_NAME = "BBox_List_2017.csv"
TRAIN_VAL_NAME = "train_val_list.txt"
TEST_NAME = "test_list.txt"
IMAGE_DIR = "images"
TABLE_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
BOX_LABEL_SPELLING = {"Infiltration": "Infiltrate"}


@dataclass(frozen=True)
class PlantedEffect:
    """A subgroup whose findings are drawn fainter: a known gap for the subgroup analysis to
    find (``cxr data synth --plant-effect``). ``sex`` and the inclusive age band select the
    images (by the patient's sex and age at the image); their findings change the image by
    ``contrast`` times as much as elsewhere (0: invisible, 1: no effect)."""

    contrast: float
    sex: str | None = None
    age: tuple[int, int] | None = None  # inclusive, years

    def applies(self, sex: str, age: float) -> bool:
        if self.sex is not None and sex != self.sex:
            return False
        return self.age is None or self.age[0] <= age <= self.age[1]

    def _band(self) -> str:
        low, high = self.age or (0, 0)
        return f"{low}+" if high >= _OPEN_AGE else f"{low}-{high}"

    def spec(self) -> str:
        """The ``--plant-effect`` text that gives this effect."""
        parts = [f"sex={self.sex}"] if self.sex else []
        if self.age:
            parts.append(f"age={self._band()}")
        return ",".join([*parts, f"contrast={self.contrast:g}"])

    def describe(self) -> str:
        who = [f"sex {self.sex}"] if self.sex else []
        if self.age:
            who.append(f"age {self._band()}")
        return f"findings drawn at {self.contrast:g} x their contrast for {', '.join(who)}"


_OPEN_AGE = 200  # the top of an open age band ("80+")
_EXAMPLE = (
    "e.g. 'sex=F,age=60-79,contrast=0.5' (sex M or F, age LOW-HIGH or LOW+, contrast 0 to <1)"
)
PLANT_EFFECT_HELP = (
    "sex=F,age=60-79,contrast=0.5: the findings of images of female patients aged 60 to 79 "
    "are drawn at half their contrast (sex M or F; age LOW-HIGH or LOW+; at least one of them; "
    "contrast from 0, invisible, to below 1)"
)


def _age_band(text: str) -> tuple[int, int]:
    """``60-79`` -> (60, 79); ``80+`` -> (80, 200); anything else raises ValueError."""
    if text.endswith("+"):
        return int(text[:-1]), _OPEN_AGE
    low, dash, high = text.partition("-")
    if not dash:
        raise ValueError(text)
    return int(low), int(high)


def parse_planted_effect(text: str) -> PlantedEffect:
    """``sex=F,age=60-79,contrast=0.5`` as a :class:`PlantedEffect` (:data:`PLANT_EFFECT_HELP`)."""
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("sex", "age", "contrast") or key in fields:
            raise ConfigError(f"planted effect {text!r}: cannot read {part!r}; write {_EXAMPLE}")
        fields[key] = value.strip()
    try:
        contrast = float(fields["contrast"])
        age = None
        if "age" in fields:
            age = _age_band(fields["age"])
    except (KeyError, ValueError):
        raise ConfigError(f"planted effect {text!r} not understood; write {_EXAMPLE}") from None
    sex = fields["sex"].upper() if "sex" in fields else None
    if not 0.0 <= contrast < 1.0 or sex not in (None, "M", "F") or (sex is None and age is None):
        raise ConfigError(f"planted effect {text!r} not understood; write {_EXAMPLE}")
    if age is not None and not 0 <= age[0] <= age[1]:
        raise ConfigError(f"planted effect {text!r}: age band {fields['age']!r} is empty")
    return PlantedEffect(contrast=contrast, sex=sex, age=age)


def write_synthetic_dataset(
    out: str | os.PathLike,
    *,
    patients: int = 400,
    image_size: int = 256,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    layout: str = "nih",
    plant_effect: PlantedEffect | None = None,
) -> SynthSummary:
    """Write a synthetic dataset in NIH's layout into ``out`` (see the module docstring).

    Everything is built in a temporary folder beside ``out`` and moved into place at the
    end, so an interrupted run leaves no half-written dataset. ``out`` may not exist yet, be
    empty, or hold an earlier synthetic dataset (which is replaced); anything else is
    refused. ``progress(done, total)`` is called as images are written. ``workers`` is the
    number of rendering processes (default: one per CPU, up to 8, for large runs).
    ``layout`` ``"chexpert"`` or ``"mimic"`` writes the same kind of images in CheXpert's or
    MIMIC-CXR-JPG's layout instead (:mod:`cxr.data.synthetic_layouts`). ``plant_effect``
    draws the findings of one subgroup fainter (NIH's layout only); the table and every other
    image are the same as without it.
    """
    _check_arguments(patients, image_size, seed)
    if layout not in SYNTHETIC_LAYOUTS:
        raise ConfigError(
            f"unknown layout {layout!r}; expected one of {', '.join(SYNTHETIC_LAYOUTS)}"
        )
    if plant_effect is not None and layout != NIH_LAYOUT:
        raise ConfigError("a planted subgroup effect is written in NIH's layout only")
    if layout != NIH_LAYOUT:
        return synthetic_layouts.write_layout(
            out,
            layout,
            patients=patients,
            image_size=image_size,
            seed=seed,
            progress=progress,
            workers=workers,
        )
    table = sample_population(patients, seed, image_size)

    def fill(staging: Path) -> SynthSummary:
        (staging / IMAGE_DIR).mkdir()
        boxes = _render_images(
            table, staging / IMAGE_DIR, seed, image_size, workers, progress, plant_effect
        )
        summary = _write_tables(staging, Path(out), table, boxes, seed, image_size, patients)
        if plant_effect is not None:
            _note_planted_effect(staging / README_NAME, table, plant_effect)
        return summary

    return write_atomically(out, fill)


def _render_images(
    table: pd.DataFrame,
    image_dir: Path,
    seed: int,
    image_size: int,
    workers: int | None,
    progress: Callable[[int, int], None] | None,
    plant_effect: PlantedEffect | None = None,
) -> list[dict[str, Box]]:
    """Render every image of ``table`` into ``image_dir``; returns each image's boxes."""
    names = table["Image Index"].tolist()
    flags = table[list(PATHOLOGIES)].to_numpy(dtype=np.int64)
    fainter = _planted_rows(table, plant_effect)
    # A partial of a module-level function still pickles for the spawned workers.
    faint = plant_effect and functools.partial(render_image, contrast=plant_effect.contrast)
    jobs = [
        (
            i,
            (seed, 1, i),
            tuple(int(x) for x in flags[i]),
            image_size,
            str(image_dir / names[i]),
            faint if fainter[i] else render_image,
        )
        for i in range(len(table))
    ]
    return render_all(jobs, workers, progress)


def _planted_rows(table: pd.DataFrame, plant_effect: PlantedEffect | None) -> np.ndarray:
    """Which images of ``table`` the planted effect draws fainter."""
    if plant_effect is None:
        return np.zeros(len(table), dtype=bool)
    return np.array(
        [
            plant_effect.applies(sex, age)
            for sex, age in zip(table["Patient Gender"], table["Patient Age"])
        ],
        dtype=bool,
    )


def _note_planted_effect(readme: Path, table: pd.DataFrame, plant_effect: PlantedEffect) -> None:
    rows = _planted_rows(table, plant_effect)
    with_finding = int((table.loc[rows, list(PATHOLOGIES)].to_numpy().sum(axis=1) > 0).sum())
    note = (
        f"\nPLANTED SUBGROUP EFFECT: {plant_effect.describe()}: {int(rows.sum())} images, "
        f"{with_finding} of them with findings.\nThe table does not say which; the subgroup "
        "analysis of cxr evaluate should find them. Regenerate with the same arguments and\n"
        f"plant_effect=parse_planted_effect({plant_effect.spec()!r}) (cxr data synth "
        f"--plant-effect {plant_effect.spec()!r}).\n"
    )
    _write_text(readme, readme.read_text(encoding="utf-8") + note)


def _write_tables(
    staging: Path,
    out: Path,
    table: pd.DataFrame,
    boxes: list[dict[str, Box]],
    seed: int,
    image_size: int,
    patients: int,
) -> SynthSummary:
    """The label table, the box file, the official lists and the README, into ``staging``."""
    names = table["Image Index"].tolist()
    _write_text(staging / TABLE_NAME, _table_text(table))
    box_lines = [BOX_HEADER]
    for name, found in zip(names, boxes):
        for label, (x, y, w, h) in found.items():
            spelled = BOX_LABEL_SPELLING.get(label, label)
            box_lines.append(f"{name},{spelled},{x:g},{y:g},{w:g},{h:g}")
    _write_text(staging / BOX_NAME, "\n".join(box_lines) + "\n")
    is_test = (table["split"] == "test").to_numpy()
    _write_text(
        staging / TRAIN_VAL_NAME, "".join(f"{n}\n" for n, t in zip(names, is_test) if not t)
    )
    _write_text(staging / TEST_NAME, "".join(f"{n}\n" for n, t in zip(names, is_test) if t))
    flags = table[list(PATHOLOGIES)].to_numpy(dtype=np.int64)
    counts = {name: int(table[name].sum()) for name in PATHOLOGIES}
    counts[NO_FINDING] = int((flags.sum(axis=1) == 0).sum())
    summary = SynthSummary(
        out=out,
        images=len(table),
        patients=patients,
        image_size=image_size,
        boxes=len(box_lines) - 1,
        label_counts=counts,
    )
    _write_text(staging / README_NAME, _readme_text(summary, seed, table))
    return summary


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def _table_text(table: pd.DataFrame) -> str:
    lines = [TABLE_HEADER]
    for row in table.itertuples(index=False):
        spacing = f"{row[9]:.6g}"
        fields = [row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8]]
        lines.append(",".join(str(x) for x in fields) + f",{spacing},{spacing}")
    return "\n".join(lines) + "\n"


def _readme_text(summary: SynthSummary, seed: int, table: pd.DataFrame) -> str:
    counts = "\n".join(f"  {name}: {count}" for name, count in summary.label_counts.items())
    test_images = int((table["split"] == "test").sum())
    return f"""{README_MARKER} {__version__}.

THIS IS NOT NIH DATA AND NOT MEDICAL DATA. Every image is a drawing made by a program: a
stylised chest radiograph with a planted pattern for each of its labels. Use it to try the
pipeline and to run tests, never to judge a model meant for real radiographs.

Layout: the same as NIH ChestX-ray14 (Data_Entry_2017.csv, images/*.png, BBox_List_2017.csv,
train_val_list.txt, test_list.txt). Boxes are given for every planted finding of every image,
in pixels of the {summary.image_size} px images (NIH's are in pixels of 1024 px images).

Generation parameters:
  patients: {summary.patients}
  image_size: {summary.image_size}
  seed: {seed}

Contents:
  images: {summary.images} ({test_images} in test_list.txt, split by patient)
  boxes: {summary.boxes}
Images per label:
{counts}

Regenerate with cxr.data.synthetic.write_synthetic_dataset(out, patients={summary.patients},
image_size={summary.image_size}, seed={seed}); the files come out byte-identical.
"""
