"""The layout registry: a layout is one module that registers itself, and read_dataset reads
it by name or by detection; the built-in layouts answer the questions other modules ask."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr.data.datasets import DatasetSpec, read_dataset
from cxr.data.layouts import Layout, get_layout, layout_names, register, unregister
from cxr.data.schema import IMAGE_COLUMN, PATH_COLUMN, PATIENT_COLUMN
from cxr.data.table import LabeledData
from cxr.errors import DataError
from cxr.labels import CHEXPERT_LABELS, MIMIC_LABELS, PATHOLOGIES

TOY_TABLE = "toy-labels.tsv"


# The whole toy layout: its reader, its detection and its registration, as a new file would
# hold them. A tab-separated table: image, patient, one 1/0 column per finding.
def _read_toy(source, spec):
    path = source / TOY_TABLE if source.is_dir() else source
    raw = pd.read_csv(path, sep="\t", dtype=str)
    table = pd.DataFrame({IMAGE_COLUMN: raw["file"], PATIENT_COLUMN: raw["who"]})
    for label in ("Cat", "Dog"):
        table[label] = raw[label].astype(np.float32)
    return LabeledData(table, ("Cat", "Dog"), "toy", path, image_root=path.parent / "pics")


TOY = Layout(
    name="toy",
    title="Toy pets",
    read=_read_toy,
    detect=lambda source, spec: source.is_dir() and (source / TOY_TABLE).is_file(),
    labels=("Cat", "Dog"),
)


@pytest.fixture
def toy_layout():
    register(TOY)
    yield TOY
    unregister(TOY.name)


@pytest.fixture
def toy_folder(tmp_path):
    (tmp_path / "pics").mkdir()
    rows = ["file\twho\tCat\tDog", "a.png\tp1\t1\t0", "b.png\tp1\t0\t1", "c.png\tp2\t1\t1"]
    (tmp_path / TOY_TABLE).write_text("\n".join(rows) + "\n")
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / "pics" / name).write_bytes(b"not read here")
    return tmp_path


def test_a_registered_layout_is_read_by_name_and_detected(toy_layout, toy_folder):
    assert "toy" in layout_names()
    for spec in (DatasetSpec(layout="toy"), DatasetSpec()):
        data = read_dataset(toy_folder, spec)
        assert data.layout == "toy" and get_layout(data.layout) is toy_layout
        assert data.labels == ("Cat", "Dog")
        assert data.table["Cat"].tolist() == [1, 0, 1]
        assert data.table[PATH_COLUMN].tolist() == [
            str((toy_folder / "pics" / n).resolve()) for n in ("a.png", "b.png", "c.png")
        ]


def test_an_unregistered_layout_is_refused_naming_the_known_ones(toy_folder):
    with pytest.raises(DataError, match="unknown dataset layout 'toy'; choose auto, nih, "):
        read_dataset(toy_folder, DatasetSpec(layout="toy"))


def test_a_name_is_registered_once(toy_layout):
    with pytest.raises(ValueError, match="already registered"):
        register(toy_layout)


def test_the_built_in_layouts_and_their_facts():
    assert layout_names()[:4] == ("nih", "chexpert", "mimic", "generic")
    nih, chexpert, mimic, generic = (get_layout(n) for n in layout_names()[:4])
    assert nih.labels == PATHOLOGIES and nih.official_lists and nih.bounding_boxes
    assert not (chexpert.official_lists or mimic.official_lists or generic.official_lists)
    # One order for the CheXpert labeller's observations, whichever dataset they come from.
    assert chexpert.labels == mimic.labels == CHEXPERT_LABELS == MIMIC_LABELS
    assert generic.labels is None and generic.description is None
    assert [layout.short_name for layout in (nih, chexpert, mimic)] == [
        "NIH",
        "CheXpert",
        "MIMIC-CXR-JPG",
    ]
