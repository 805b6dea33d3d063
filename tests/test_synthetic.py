from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxr.data.layouts.nih import NIH_COLUMNS, load_nih
from cxr.data.synthetic import (
    BOX_HEADER,
    TABLE_HEADER,
    render_image,
    sample_population,
    write_synthetic_dataset,
)
from cxr.errors import ConfigError, DataError
from cxr.labels import NO_FINDING, PATHOLOGIES

NIH_TABLE_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
NIH_BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "nih"
    calls = []
    summary = write_synthetic_dataset(
        out, patients=24, image_size=64, seed=3, progress=lambda d, t: calls.append((d, t))
    )
    return out, summary, calls


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def test_table_header_and_rows_are_nih_format(dataset):
    out, summary, _ = dataset
    lines = _lines(out / "Data_Entry_2017.csv")
    assert lines[0] == NIH_TABLE_HEADER == TABLE_HEADER
    assert lines[0].split(",") == list(NIH_COLUMNS)
    assert len(lines) - 1 == summary.images
    with_findings = 0
    for line in lines[1:]:
        fields = line.split(",")
        assert len(fields) == 11
        name, labels, follow_up, patient, age, sex, view, width, height, sx, sy = fields
        assert name == f"{int(patient):08d}_{int(follow_up):03d}.png"
        assert 1 <= int(age) <= 90
        assert sex in {"M", "F"} and view in {"PA", "AP"}
        assert width == height == "64"
        assert float(sx) == float(sy) > 0
        names = labels.split("|")
        if names != [NO_FINDING]:
            with_findings += 1
            assert all(n in PATHOLOGIES for n in names)
            assert names == sorted(names, key=PATHOLOGIES.index)
    assert 0 < with_findings < summary.images  # both kinds of row were checked


def test_round_trip_through_load_nih(dataset):
    out, summary, _ = dataset
    data = load_nih(out)
    table = data.table
    assert len(table) == summary.images and not data.dropped_missing
    assert table["Patient ID"].nunique() == summary.patients == 24
    expected = sample_population(24, 3, 64)
    assert table["Image Index"].tolist() == expected["Image Index"].tolist()
    for name in PATHOLOGIES:
        assert table[name].tolist() == expected[name].tolist()
        assert summary.label_counts[name] == int(expected[name].sum())
    no_finding = int((expected[list(PATHOLOGIES)].sum(axis=1) == 0).sum())
    assert summary.label_counts[NO_FINDING] == no_finding


def test_images_are_8bit_gray_of_requested_size(dataset):
    out, summary, calls = dataset
    files = sorted((out / "images").glob("*.png"))
    assert len(files) == summary.images
    for path in files[:5]:
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (64, 64)
    assert calls[-1] == (summary.images, summary.images)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_boxes_one_per_finding_inside_the_image(dataset):
    out, summary, _ = dataset
    lines = _lines(out / "BBox_List_2017.csv")
    assert lines[0] == NIH_BOX_HEADER == BOX_HEADER
    table = sample_population(24, 3, 64).set_index("Image Index")
    seen: dict[str, set[str]] = {}
    for line in lines[1:]:
        fields = line.split(",")
        assert len(fields) == 6
        name, label = fields[0], fields[1]
        assert label != "Infiltration"
        label = "Infiltration" if label == "Infiltrate" else label
        x, y, w, h = map(float, fields[2:])
        assert w > 0 and h > 0
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
        assert label not in seen.setdefault(name, set())
        seen[name].add(label)
    assert len(lines) - 1 == summary.boxes
    for name, row in table.iterrows():
        positive = {p for p in PATHOLOGIES if row[p]}
        assert seen.get(name, set()) == positive
    # Seed 3 with 24 patients has Infiltration images, so NIH's box spelling is exercised:
    # each Infiltration image has one box, labelled "Infiltrate" as in NIH's BBox_List.
    infiltration = int(table["Infiltration"].sum())
    assert infiltration > 0
    assert sum(",Infiltrate," in line for line in lines) == infiltration


def test_split_is_by_patient_disjoint_and_complete(dataset):
    out, _, _ = dataset
    train = _lines(out / "train_val_list.txt")
    test = _lines(out / "test_list.txt")
    assert train and test
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(p.name for p in (out / "images").glob("*.png"))
    patients = {name[:8] for name in train}
    assert not patients & {name[:8] for name in test}
    assert len({name[:8] for name in test}) == round(0.2 * 24)


def test_readme_says_synthetic(dataset):
    out, _, _ = dataset
    text = (out / "README.txt").read_text(encoding="utf-8")
    assert "SYNTHETIC" in text and "NOT NIH DATA" in text
    assert "seed: 3" in text and "image_size: 64" in text and "patients: 24" in text
    assert not list(out.parent.glob(".nih.*"))


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, dataset):
    out, _, _ = dataset
    again = write_synthetic_dataset(tmp_path / "again", patients=24, image_size=64, seed=3)
    for name in ("Data_Entry_2017.csv", "BBox_List_2017.csv", "test_list.txt", "README.txt"):
        assert (again.out / name).read_bytes() == (out / name).read_bytes()
    for image in ("00000001_000.png", "00000024_000.png"):
        assert (again.out / "images" / image).read_bytes() == (out / "images" / image).read_bytes()
    other = write_synthetic_dataset(tmp_path / "other", patients=24, image_size=64, seed=4)
    assert (other.out / "Data_Entry_2017.csv").read_bytes() != (
        out / "Data_Entry_2017.csv"
    ).read_bytes()
    assert (other.out / "images" / "00000001_000.png").read_bytes() != (
        out / "images" / "00000001_000.png"
    ).read_bytes()


def test_worker_processes_give_the_same_bytes(tmp_path, dataset):
    out, _, _ = dataset
    pooled = write_synthetic_dataset(tmp_path / "p", patients=24, image_size=64, seed=3, workers=2)
    for name in ("BBox_List_2017.csv", "images/00000002_000.png"):
        assert (pooled.out / name).read_bytes() == (out / name).read_bytes()


def test_rewrites_a_synthetic_dataset_but_refuses_other_folders(tmp_path):
    out = tmp_path / "d"
    write_synthetic_dataset(out, patients=3, image_size=32, seed=0)
    summary = write_synthetic_dataset(out, patients=2, image_size=32, seed=0)
    assert len(list((out / "images").glob("*.png"))) == summary.images
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a synthetic dataset"):
        write_synthetic_dataset(foreign, patients=2, image_size=32)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError):
        write_synthetic_dataset(tmp_path / "x", patients=0)
    with pytest.raises(ConfigError):
        write_synthetic_dataset(tmp_path / "x", image_size=8)


def test_default_population_has_learnable_positives_of_every_class():
    table = sample_population()
    images = len(table)
    assert 900 <= images <= 1300
    counts = {name: int(table[name].sum()) for name in PATHOLOGIES}
    assert all(count >= 40 for count in counts.values()), counts
    assert max(counts, key=counts.get) == "Infiltration"
    assert min(counts.values()) >= 0.03 * images
    no_finding = (table[list(PATHOLOGIES)].sum(axis=1) == 0).mean()
    assert 0.4 <= no_finding <= 0.5
    assert (table[list(PATHOLOGIES)].sum(axis=1) >= 2).any()
    assert set(table["View Position"]) == {"PA", "AP"}
    assert set(table["Patient Gender"]) == {"M", "F"}
    per_patient = table.groupby("Patient ID").size()
    assert per_patient.min() >= 1 and per_patient.max() <= 5
    assert 2.3 <= per_patient.mean() <= 3.2
    test_patients = table.loc[table["split"] == "test", "Patient ID"].nunique()
    assert test_patients == 80


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("index", range(len(PATHOLOGIES)))
def test_each_pattern_changes_its_box_far_more_than_elsewhere(index, size):
    name = PATHOLOGIES[index]
    for case in range(3):
        flags = [0] * len(PATHOLOGIES)
        plain, none = render_image(flags, np.random.default_rng([11, case]), size)
        flags[index] = 1
        marked, boxes = render_image(flags, np.random.default_rng([11, case]), size)
        assert plain.dtype == np.uint8 and plain.shape == (size, size)
        assert none == {} and list(boxes) == [name]
        x, y, w, h = (int(v) for v in boxes[name])
        assert w >= 1 and h >= 1 and x + w <= size and y + h <= size
        diff = np.abs(marked.astype(np.int16) - plain.astype(np.int16))
        inside = np.zeros_like(diff, dtype=bool)
        inside[y : y + h, x : x + w] = True
        mean_in = diff[inside].mean()
        mean_out = diff[~inside].mean() if (~inside).any() else 0.0
        # Clearly visible (gray levels; fibrosis is a sparse net of lines), and local to the box.
        assert np.percentile(diff[inside], 90) >= 15, name
        assert mean_in >= 5, (name, mean_in)
        assert mean_in >= 10 * mean_out, (name, mean_in, mean_out)
