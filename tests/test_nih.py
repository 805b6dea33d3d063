"""NIH Data_Entry tables (v2017 and v2020) and image discovery, on the real NIH metadata."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr.data.datasets import label_matrix
from cxr.data.layouts.nih import (
    NIH_COLUMNS,
    dataset_stats,
    find_table,
    index_images,
    load_nih,
    parse_age_years,
    read_table,
)
from cxr.data.schema import PATH_COLUMN
from cxr.errors import DataError
from cxr.labels import NO_FINDING, PATHOLOGIES

# NIH's published label counts for ChestX-ray14 (112,120 images, 30,805 patients).
PUBLISHED_COUNTS = {
    "Infiltration": 19_894,
    "Effusion": 13_317,
    "Atelectasis": 11_559,
    "Nodule": 6_331,
    "Mass": 5_782,
    "Pneumothorax": 5_302,
    "Consolidation": 4_667,
    "Pleural_Thickening": 3_385,
    "Cardiomegaly": 2_776,
    "Emphysema": 2_516,
    "Edema": 2_303,
    "Fibrosis": 1_686,
    "Pneumonia": 1_431,
    "Hernia": 227,
    NO_FINDING: 60_361,
}
# Label counts of the 264-image sample nih/images.csv (from shared/data/README.md).
SAMPLE_COUNTS = {
    "Atelectasis": 37,
    "Cardiomegaly": 32,
    "Effusion": 40,
    "Infiltration": 39,
    "Mass": 32,
    "Nodule": 38,
    "Pneumonia": 25,
    "Pneumothorax": 14,
    "Consolidation": 39,
    "Edema": 15,
    "Emphysema": 16,
    "Fibrosis": 28,
    "Pleural_Thickening": 32,
    "Hernia": 16,
    NO_FINDING: 39,
}
RGBA_NAMES = ["00001369_000", "00002578_000", "00004934_000", "00005224_000", "00005813_000"]


def replace_field(line: str, index: int, value: str) -> str:
    fields = line.split(",")
    fields[index] = value
    return ",".join(fields)


# ------------------------------------------------------------------ the full v2020 table


def test_v2020_matches_nih_published_counts(v2020_table):
    stats = dataset_stats(v2020_table)
    assert stats["images"] == 112_120
    assert stats["patients"] == 30_805
    counts = {name: entry["count"] for name, entry in stats["labels"].items()}
    assert counts == PUBLISHED_COUNTS
    assert list(counts)[: len(PATHOLOGIES)] == list(PATHOLOGIES)
    assert stats["labels"]["Hernia"]["prevalence"] == pytest.approx(227 / 112_120)
    assert stats["views"] == {"PA": 67_310, "AP": 44_810}
    assert stats["sex"] == {"M": 63_340, "F": 48_780}


def test_v2020_label_columns_and_matrix(v2020_table):
    matrix = label_matrix(v2020_table)
    assert matrix.shape == (112_120, 14)
    assert matrix.dtype == np.float32
    assert set(np.unique(matrix)) == {0.0, 1.0}
    assert matrix.sum(axis=0).astype(int).tolist() == [PUBLISHED_COUNTS[n] for n in PATHOLOGIES]
    # "No Finding" never comes with another label: those rows are exactly the all-zero rows.
    no_finding = (v2020_table["Finding Labels"] == NO_FINDING).to_numpy()
    assert np.array_equal(no_finding, matrix.sum(axis=1) == 0)


def test_v2020_bracketed_header_columns_survive(v2020_table):
    assert list(v2020_table.columns[: len(NIH_COLUMNS)]) == list(NIH_COLUMNS)
    row = v2020_table.set_index("Image Index").loc["00000003_000.png"]
    assert row["OriginalImage[Width"] == "2582"
    assert row["Height]"] == "2991"
    assert row["OriginalImagePixelSpacing[x"] == "0.14300000000000002"
    assert row["y]"] == "0.14300000000000002"


def test_patient_comes_from_patient_id_not_follow_up(v2020_table):
    row = v2020_table.set_index("Image Index").loc["00000003_000.png"]
    assert row["Follow-up #"] == "7"
    assert row["Patient ID"] == 3
    assert row["Hernia"] == 1
    assert v2020_table["Patient ID"].dtype == np.int64
    # The README's quirk: 24,106 rows have a Follow-up # unlike the name's suffix; the
    # patient always agrees with the name's first 8 digits.
    suffix = v2020_table["Image Index"].str.slice(9, 12).astype(int)
    assert int((suffix != v2020_table["Follow-up #"].astype(int)).sum()) == 24_106
    from_name = v2020_table["Image Index"].str.slice(0, 8).astype(np.int64)
    assert (from_name == v2020_table["Patient ID"]).all()


def test_v2020_ages_are_years(v2020_table):
    ages = v2020_table["age_years"]
    assert ages.notna().all()
    assert np.array_equal(ages.to_numpy(), v2020_table["Patient Age"].astype(float).to_numpy())


# ------------------------------------------------------------------ the 264-image sample


def test_sample_table_stats(sample_csv):
    stats = dataset_stats(read_table(sample_csv))
    assert stats["images"] == 264
    assert stats["patients"] == 260
    assert {k: v["count"] for k, v in stats["labels"].items()} == SAMPLE_COUNTS
    assert stats["views"] == {"PA": 213, "AP": 51}
    assert stats["sex"] == {"M": 144, "F": 120}
    assert (stats["age_years"]["min"], stats["age_years"]["max"]) == (2.0, 86.0)


def test_sample_rows_equal_v2020_rows(sample_csv, v2020_table):
    sample = read_table(sample_csv)
    full = v2020_table.set_index("Image Index").loc[sample["Image Index"]].reset_index()
    pd.testing.assert_frame_equal(sample, full)


# ------------------------------------------------------------------ v2017 format


def to_v2017(lines: list[str], *, trailing_comma_header: bool = True) -> list[str]:
    """NIH's first release: ages like ``058Y`` and a trailing comma on every line."""
    header = lines[0] + ("," if trailing_comma_header else "")
    rows = []
    for i, line in enumerate(lines[1:]):
        age = f"{int(line.split(',')[4]):03d}Y"
        if i == 0:
            age = "011M"
        elif i == 1:
            age = "020D"
        rows.append(replace_field(line, 4, age) + ",")
    return [header, *rows]


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_v2017_format_reads_like_v2020(tmp_path, sample_lines, sample_csv, suffix):
    path = tmp_path / f"Data_Entry_2017{suffix}"
    text = "\n".join(to_v2017(sample_lines)) + "\n"
    if suffix == ".csv.gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    v2017 = read_table(path)
    v2020 = read_table(sample_csv)

    assert len(v2017) == 264
    assert list(v2017.columns[: len(NIH_COLUMNS)]) == list(NIH_COLUMNS)
    assert v2017["Patient Age"].iloc[:3].tolist() == ["011M", "020D", "060Y"]
    for column in ["Image Index", "Finding Labels", "Patient ID", *PATHOLOGIES]:
        assert v2017[column].tolist() == v2020[column].tolist(), column
    assert v2017["age_years"].iloc[0] == pytest.approx(11 / 12)
    assert v2017["age_years"].iloc[1] == pytest.approx(20 / 365.25)
    assert v2017["age_years"].iloc[2:].tolist() == v2020["age_years"].iloc[2:].tolist()
    stats = dataset_stats(v2017)
    assert {k: v["count"] for k, v in stats["labels"].items()} == SAMPLE_COUNTS


@pytest.mark.filterwarnings("ignore::pandas.errors.ParserWarning")
def test_trailing_comma_rows_do_not_shift_columns(write_csv, sample_lines, sample_csv):
    # Header without the trailing comma but rows with one: pandas must not take the
    # first column as the index (which would shift every column one place left).
    path = write_csv("Data_Entry_2017.csv", to_v2017(sample_lines, trailing_comma_header=False))
    table = read_table(path)
    expected = read_table(sample_csv)
    assert table["Image Index"].tolist() == expected["Image Index"].tolist()
    assert table["Finding Labels"].tolist() == expected["Finding Labels"].tolist()
    assert table["Patient ID"].tolist() == expected["Patient ID"].tolist()


@pytest.mark.parametrize(
    ("text", "years"),
    [
        ("58", 58.0),
        ("058Y", 58.0),
        ("058y", 58.0),
        ("011M", 11 / 12),
        ("020D", 20 / 365.25),
        ("002W", 14 / 365.25),
        (" 7 ", 7.0),
    ],
)
def test_parse_age_years(text, years):
    assert parse_age_years(text) == pytest.approx(years)


def test_parse_age_years_missing_and_bad():
    assert np.isnan(parse_age_years(None))
    assert np.isnan(parse_age_years(float("nan")))
    with pytest.raises(ValueError, match="unreadable age 'old'"):
        parse_age_years("old")


def test_table_without_patient_id_uses_name_digits(write_csv):
    path = write_csv(
        "labels.csv",
        [
            "Image Index,Finding Labels",
            "00000003_000.png,Hernia",
            "00030805_000.png,No Finding",
            "00000013_035.png,Effusion|Mass",
        ],
    )
    table = read_table(path)
    assert table["Patient ID"].tolist() == [3, 30805, 13]
    assert "age_years" not in table.columns
    assert table[["Hernia", "Effusion", "Mass"]].to_numpy().tolist() == [
        [1, 0, 0],
        [0, 0, 0],
        [0, 1, 1],
    ]
    stats = dataset_stats(table)
    assert stats["patients"] == 3
    assert stats["labels"][NO_FINDING]["count"] == 1


def test_patient_id_column_wins_over_name(write_csv, sample_lines):
    # An empty Patient ID is recovered from the name; a given one is used as written.
    lines = [
        sample_lines[0],
        replace_field(sample_lines[1], 3, ""),
        replace_field(sample_lines[2], 3, "424242"),
    ]
    table = read_table(write_csv("t.csv", lines))
    assert table["Image Index"].tolist() == ["00000003_000.png", "00000013_004.png"]
    assert table["Patient ID"].tolist() == [3, 424242]


# ------------------------------------------------------------------ malformed tables


def test_unknown_label_names_label_file_and_line(write_csv, sample_lines):
    bad = replace_field(sample_lines[3], 1, "Effusion|Pneumonitis")
    path = write_csv("bad.csv", [*sample_lines[:3], bad, *sample_lines[4:10]])
    with pytest.raises(DataError) as info:
        read_table(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 4" in message
    assert "'Pneumonitis'" in message
    assert "Hernia" in message  # the expected labels are listed


def test_box_file_spelling_is_not_a_table_label(write_csv):
    path = write_csv("t.csv", ["Image Index,Finding Labels", "00000001_000.png,Infiltrate"])
    with pytest.raises(DataError, match=r"line 2: unknown label 'Infiltrate'"):
        read_table(path)


@pytest.mark.parametrize(
    ("header", "missing"),
    [
        ("Image Index,Patient ID", ["'Finding Labels'"]),
        ("Finding Labels,Patient ID", ["'Image Index'"]),
        ("Patient ID,Patient Age", ["'Image Index'", "'Finding Labels'"]),
    ],
)
def test_missing_columns_are_named(write_csv, header, missing):
    path = write_csv("t.csv", [header, "1,2"])
    with pytest.raises(DataError) as info:
        read_table(path)
    message = str(info.value)
    assert str(path) in message
    assert "missing column" in message
    for column in missing:
        assert column in message.split("; found")[0]


def test_duplicate_image_names(write_csv, sample_lines):
    path = write_csv("t.csv", [*sample_lines[:6], sample_lines[2], sample_lines[4]])
    with pytest.raises(DataError) as info:
        read_table(path)
    message = str(info.value)
    assert str(path) in message
    assert "'00000013_004.png' is listed more than once (lines 3, 7)" in message
    assert "2 image name(s) are duplicated" in message


def test_one_image_with_two_patients(write_csv, sample_lines):
    other = replace_field(sample_lines[2], 3, "77")
    path = write_csv("t.csv", [*sample_lines[:6], other])
    with pytest.raises(DataError) as info:
        read_table(path)
    message = str(info.value)
    assert str(path) in message
    assert "'00000013_004.png' is listed with different patients 13, 77 (lines 3, 7)" in message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="the table is empty") as info:
        read_table(path)
    assert str(path) in str(info.value)


def test_header_without_rows(write_csv, sample_lines):
    path = write_csv("t.csv", sample_lines[:1])
    with pytest.raises(DataError, match="header but no rows") as info:
        read_table(path)
    assert str(path) in str(info.value)


def test_non_numeric_patient_id(write_csv, sample_lines):
    path = write_csv("t.csv", [*sample_lines[:3], replace_field(sample_lines[3], 3, "P-13")])
    with pytest.raises(DataError) as info:
        read_table(path)
    assert f"{path}, line 4: 'Patient ID' is 'P-13', not a number" in str(info.value)


def test_unreadable_age(write_csv, sample_lines):
    path = write_csv("t.csv", [*sample_lines[:5], replace_field(sample_lines[5], 4, "old")])
    with pytest.raises(DataError) as info:
        read_table(path)
    assert f"{path}, line 6: unreadable age 'old' in 'Patient Age'" in str(info.value)


def test_empty_finding_labels(write_csv, sample_lines):
    path = write_csv("t.csv", [*sample_lines[:2], replace_field(sample_lines[2], 1, "")])
    with pytest.raises(DataError, match=r"line 3: empty 'Finding Labels'") as info:
        read_table(path)
    assert str(path) in str(info.value)


def test_empty_image_name(write_csv, sample_lines):
    path = write_csv("t.csv", [*sample_lines[:2], replace_field(sample_lines[2], 0, " ")])
    with pytest.raises(DataError, match=r"line 3: empty 'Image Index'"):
        read_table(path)


def test_no_patient_id_and_non_nih_name(write_csv):
    path = write_csv("t.csv", ["Image Index,Finding Labels", "a.png,Hernia", "scan.png,Mass"])
    with pytest.raises(DataError) as info:
        read_table(path)
    message = str(info.value)
    assert f"{path}, line 2:" in message
    assert "'a.png' does not start with an 8-digit patient number" in message


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "Data_Entry_2017.csv.gz"
    path.write_bytes(gzip.compress(b"Image Index,Finding Labels\n" * 50)[:30])
    with pytest.raises(DataError, match="not a readable CSV table") as info:
        read_table(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_table(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="no such file or folder") as info:
        load_nih(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_folder_without_table(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"no Data_Entry_2017\*\.csv") as info:
        find_table(tmp_path)
    assert str(tmp_path) in str(info.value)


# ------------------------------------------------------------------ finding tables and images


def test_find_table_in_shared_folder(nih_dir, v2020_csv):
    # images.csv does not match Data_Entry_2017*; the metadata table is found below.
    assert find_table(nih_dir) == v2020_csv
    assert find_table(v2020_csv) == v2020_csv


def test_find_table_prefers_shallowest(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for path in ["a/b/Data_Entry_2017.csv", "a/Data_Entry_2017_v2020.csv.gz"]:
        (tmp_path / path).write_bytes(b"")
    assert find_table(tmp_path) == tmp_path / "a" / "Data_Entry_2017_v2020.csv.gz"


def test_shared_folder_reports_missing_images(nih_dir, v2020_csv):
    # The folder's table lists all 112,120 images but only the 264 sample PNGs are there.
    with pytest.raises(DataError) as info:
        load_nih(nih_dir)
    message = str(info.value)
    assert str(v2020_csv) in message
    assert "111,856 of 112,120 listed image(s) are not on disk" in message
    assert "00000001_000.png, 00000001_001.png, 00000001_002.png, 00000002_000.png" in message
    assert "--drop-missing" in message


def test_shared_folder_drop_missing(nih_dir, v2020_csv, sample_csv, sample_images):
    data = load_nih(nih_dir, drop_missing=True)
    assert data.table_path == v2020_csv
    assert data.image_root == nih_dir
    assert len(data.table) == 264
    assert len(data.dropped_missing) == 111_856
    assert sorted(data.table["Image Index"]) == sorted(read_table(sample_csv)["Image Index"])
    for name, path in zip(data.table["Image Index"], data.table[PATH_COLUMN]):
        assert Path(path) == sample_images / name


def test_mini_nih_archive_layout(mini_nih, sample_images):
    # images_001/images is a symlink to the real image folder: it must be followed.
    data = load_nih(mini_nih)
    assert data.table_path == mini_nih / "Data_Entry_2017.csv"
    assert len(data.table) == 264
    assert data.dropped_missing == []
    expected = [mini_nih / "images_001" / "images" / n for n in data.table["Image Index"]]
    assert [Path(p) for p in data.table[PATH_COLUMN]] == expected
    assert all(Path(p).is_file() for p in data.table[PATH_COLUMN])


def test_symlink_loop_does_not_hang(mini_nih):
    os.symlink(mini_nih, mini_nih / "images_001" / "loop", target_is_directory=True)
    found = index_images(mini_nih)
    assert len(found) == 264
    assert len(load_nih(mini_nih).table) == 264


def test_csv_with_image_root(tmp_path, sample_csv, sample_images):
    csv = tmp_path / "Data_Entry_2017.csv"
    csv.write_text(sample_csv.read_text())
    data = load_nih(csv, image_root=sample_images)
    assert data.image_root == sample_images
    assert len(data.table) == 264
    assert (
        data.table[PATH_COLUMN] == [str(sample_images / n) for n in data.table["Image Index"]]
    ).all()


def test_csv_without_images_required(sample_csv):
    data = load_nih(sample_csv, require_images=False)
    assert data.image_root is None
    assert PATH_COLUMN not in data.table.columns
    assert len(data.table) == 264


def test_csv_alone_looks_beside_it(tmp_path, sample_csv):
    csv = tmp_path / "Data_Entry_2017.csv"
    csv.write_text(sample_csv.read_text())
    with pytest.raises(DataError) as info:
        load_nih(csv)
    message = str(info.value)
    assert f"{csv}: 264 of 264 listed image(s) are not on disk below {tmp_path}" in message
    assert "(first: 00000003_000.png, 00000013_004.png, 00000013_018.png," in message


def test_missing_images_count_and_first_names(mini_nih, sample_lines):
    extra = [
        replace_field(replace_field(sample_lines[1], 0, f"0000000{i}_999.png"), 3, str(i))
        for i in range(1, 8)
    ]
    table = mini_nih / "Data_Entry_2017.csv"
    table.write_text("\n".join([*sample_lines, *extra]) + "\n")
    with pytest.raises(DataError) as info:
        load_nih(mini_nih)
    message = str(info.value)
    assert str(table) in message
    assert "7 of 271 listed image(s) are not on disk" in message
    assert "(first: 00000001_999.png, 00000002_999.png, 00000003_999.png, " in message
    assert "00000005_999.png, ...)" in message
    assert "00000006_999.png" not in message

    data = load_nih(mini_nih, drop_missing=True)
    assert len(data.table) == 264
    assert data.dropped_missing == [f"0000000{i}_999.png" for i in range(1, 8)]


def test_drop_missing_with_nothing_on_disk(tmp_path, sample_csv):
    (tmp_path / "Data_Entry_2017.csv").write_text(sample_csv.read_text())
    with pytest.raises(DataError, match="none of the listed images is on disk"):
        load_nih(tmp_path, drop_missing=True)


def test_index_images(sample_images, tmp_path):
    found = index_images(sample_images)
    assert len(found) == 264
    assert found["00001369_000.png"] == sample_images / "00001369_000.png"
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "a.dcm").write_bytes(b"")
    (tmp_path / "b.JPG").write_bytes(b"")
    assert sorted(index_images(tmp_path)) == ["a.dcm", "b.JPG"]


def test_rgba_images_are_in_the_sample(sample_csv, sample_images):
    names = set(read_table(sample_csv)["Image Index"])
    for stem in RGBA_NAMES:
        assert f"{stem}.png" in names
        assert (sample_images / f"{stem}.png").is_file()
