"""Patient-level splits on the real NIH v2020 table, the 264-image mini-dataset and small tables."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr.data.layouts.nih import read_table
from cxr.data.schema import IMAGE_COLUMN, PATIENT_COLUMN
from cxr.data.split import (
    SPLITS,
    Split,
    check_split,
    find_official_lists,
    read_name_list,
    read_split,
    split_by_patients,
    split_official,
    write_split,
)
from cxr.errors import DataError, LeakageError
from cxr.labels import PATHOLOGIES

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
METADATA = DATA / "nih" / "metadata"
FULL_TABLE = METADATA / "Data_Entry_2017_v2020.csv.gz"
TRAIN_VAL_LIST = METADATA / "train_val_list.txt.gz"
TEST_LIST = METADATA / "test_list.txt.gz"
MINI_TABLE = DATA / "nih" / "images.csv"


@pytest.fixture(scope="module")
def full() -> pd.DataFrame:
    return read_table(FULL_TABLE)


@pytest.fixture(scope="module")
def mini() -> pd.DataFrame:
    return read_table(MINI_TABLE)


@pytest.fixture(scope="module")
def chexnet_split(full) -> Split:
    return split_by_patients(full, val_patients=1672, test_patients=389, seed=0)


def synthetic(patients: int, rare: int = 0) -> pd.DataFrame:
    """One image per patient; the first ``rare`` patients have Hernia, every 3rd has Effusion."""
    table = pd.DataFrame(
        {
            IMAGE_COLUMN: [f"{p:08d}_000.png" for p in range(1, patients + 1)],
            PATIENT_COLUMN: np.arange(1, patients + 1, dtype=np.int64),
        }
    )
    for label in PATHOLOGIES:
        table[label] = np.zeros(patients, dtype=np.int8)
    table.loc[: rare - 1, "Hernia"] = 1
    table.loc[::3, "Effusion"] = 1
    return table


def patients_of(frame: pd.DataFrame) -> set[int]:
    return set(frame[PATIENT_COLUMN].tolist())


def assert_partition(split: Split, table: pd.DataFrame) -> None:
    frames = split.frames()
    names = pd.concat([f[IMAGE_COLUMN] for f in frames.values()])
    assert len(names) == len(table)
    assert set(names) == set(table[IMAGE_COLUMN])
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not patients_of(frames[a]) & patients_of(frames[b]), (a, b)
    position = pd.Series(np.arange(len(table)), index=table[IMAGE_COLUMN])
    for frame in frames.values():
        assert list(frame.columns) == list(table.columns)
        assert position[frame[IMAGE_COLUMN]].is_monotonic_increasing


# --- real v2020 table -------------------------------------------------------------------------


def test_chexnet_counts_are_exact_and_rare_labels_reach_every_set(full, chexnet_split):
    split = chexnet_split
    summary = split.summary()
    assert list(summary.index) == list(SPLITS)
    assert list(summary.columns) == ["images", "patients", *PATHOLOGIES]
    assert summary.loc["val", "patients"] == 1672
    assert summary.loc["test", "patients"] == 389
    assert summary.loc["train", "patients"] == full[PATIENT_COLUMN].nunique() - 1672 - 389
    assert summary["images"].sum() == len(full) == 112_120
    assert (summary.loc[:, list(PATHOLOGIES)] > 0).all().all()
    assert summary["Hernia"].sum() == 227
    assert split.method == "patients"
    assert split.seed == 0
    assert_partition(split, full)


def test_same_seed_same_split_other_seed_other_split(full, chexnet_split):
    again = split_by_patients(full, val_patients=1672, test_patients=389, seed=0)
    for name in SPLITS:
        assert again.frames()[name][IMAGE_COLUMN].tolist() == (
            chexnet_split.frames()[name][IMAGE_COLUMN].tolist()
        )
    other = split_by_patients(full, val_patients=1672, test_patients=389, seed=1)
    assert other.test[IMAGE_COLUMN].tolist() != chexnet_split.test[IMAGE_COLUMN].tolist()
    assert other.summary().loc["test", "patients"] == 389


def test_default_fractions(full):
    split = split_by_patients(full, seed=3)
    patients = full[PATIENT_COLUMN].nunique()
    summary = split.summary()
    assert split.method == "fractions"
    # 30,805 patients: 10% is 3,080.5, rounded half up.
    assert summary.loc["val", "patients"] == 3081 == math.floor(0.1 * patients + 0.5)
    assert summary.loc["test", "patients"] == 6161
    assert_partition(split, full)


def test_official_split(full):
    split = split_official(full, DATA, seed=0)
    assert split.method == "official"
    assert len(split.test) == 25_596
    assert len(split.train) + len(split.val) == 86_524
    assert set(split.test[IMAGE_COLUMN]) == set(read_name_list(TEST_LIST))
    assert_partition(split, full)
    train_val_patients = len(patients_of(split.train) | patients_of(split.val))
    assert len(patients_of(split.val)) == math.floor(0.1 * train_val_patients + 0.5)
    assert (split.summary().loc[:, list(PATHOLOGIES)] > 0).all().all()


def test_official_lists_found_in_data_tree_and_given_as_files():
    assert find_official_lists(DATA) == (TRAIN_VAL_LIST, TEST_LIST)
    assert find_official_lists([DATA / "misc", METADATA]) == (TRAIN_VAL_LIST, TEST_LIST)


def test_read_name_list_gz_without_trailing_newline():
    with gzip.open(TEST_LIST, "rb") as handle:
        raw = handle.read()
    assert not raw.endswith(b"\n")
    names = read_name_list(TEST_LIST)
    assert len(names) == 25_596
    assert names[0] == "00000003_000.png"
    assert names[-1] == raw.rsplit(b"\n", 1)[-1].decode()


def test_read_name_list_plain_with_blank_lines_and_crlf(tmp_path):
    path = tmp_path / "names.txt"
    path.write_bytes(b"a.png\r\n\r\n  b.png  \n\nc.png")
    assert read_name_list(path) == ["a.png", "b.png", "c.png"]


# --- leakage, writing and reading -------------------------------------------------------------


def test_check_split_names_an_injected_shared_patient(chexnet_split):
    train = chexnet_split.train
    patient = int(train[PATIENT_COLUMN].value_counts().index[0])
    own = train[train[PATIENT_COLUMN] == patient]
    frames = {
        "train": train.drop(own.index[:2]),
        "val": chexnet_split.val,
        "test": pd.concat([chexnet_split.test, own.iloc[:2]]),
    }
    with pytest.raises(LeakageError) as caught:
        check_split(frames)
    kept = len(own) - 2
    assert caught.value.shared == {patient: {"train": kept, "test": 2}}
    assert str(caught.value) == (
        f"1 patient is in more than one set: patient {patient} "
        f"(train: {kept} images, test: 2 images)"
    )


def test_write_split_refuses_leaky_split(tmp_path, mini):
    leaky = Split(mini, mini.iloc[:0], mini.iloc[:3], method="fractions", seed=0)
    with pytest.raises(LeakageError):
        write_split(leaky, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.csv"))


def test_write_and_read_round_trip(tmp_path, mini):
    split = split_by_patients(mini, val_fraction=0.2, test_fraction=0.2, seed=5)
    written = write_split(split, tmp_path / "split")
    assert written == {name: tmp_path / "split" / f"{name}.csv" for name in SPLITS}
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == [
        "dataset.json",
        "test.csv",
        "train.csv",
        "val.csv",
    ]
    back = read_split(tmp_path / "split")
    for name, frame in split.frames().items():
        assert back[name][IMAGE_COLUMN].tolist() == frame[IMAGE_COLUMN].tolist()
        assert back[name][PATIENT_COLUMN].dtype == np.int64
        assert back[name][PATIENT_COLUMN].tolist() == frame[PATIENT_COLUMN].tolist()
        labels = list(PATHOLOGIES)
        assert (back[name][labels].to_numpy() == frame[labels].to_numpy()).all()


def test_read_split_names_missing_file(tmp_path, mini):
    split = split_by_patients(mini, seed=0)
    write_split(split, tmp_path)
    (tmp_path / "val.csv").unlink()
    with pytest.raises(DataError, match=r"val\.csv: missing"):
        read_split(tmp_path)
    with pytest.raises(DataError, match="no such split folder"):
        read_split(tmp_path / "nowhere")


def test_read_split_rejects_bad_file(tmp_path, mini):
    write_split(split_by_patients(mini, seed=0), tmp_path)
    (tmp_path / "test.csv").write_text("")
    with pytest.raises(DataError, match=r"test\.csv: the file is empty"):
        read_split(tmp_path)
    (tmp_path / "test.csv").write_text("Image Index\nx.png\n")
    with pytest.raises(DataError, match=r"test\.csv.*Finding Labels"):
        read_split(tmp_path)


# --- the 264-image mini-dataset ---------------------------------------------------------------


def test_mini_table_fractions_keep_patient_13_together(mini):
    assert (mini[PATIENT_COLUMN] == 13).sum() == 5
    split = split_by_patients(mini, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert_partition(split, mini)
    holding = [name for name, f in split.frames().items() if (f[PATIENT_COLUMN] == 13).any()]
    assert len(holding) == 1
    assert (split.frames()[holding[0]][PATIENT_COLUMN] == 13).sum() == 5
    summary = split.summary()
    assert summary.loc["val", "patients"] == 26
    assert summary.loc["test", "patients"] == 52
    assert (summary.loc[:, list(PATHOLOGIES)] > 0).all().all()


def test_mini_table_official_lists(mini):
    split = split_official(mini, (TRAIN_VAL_LIST, TEST_LIST), seed=0)
    assert_partition(split, mini)
    assert len(split.test) == 45
    assert len(split.train) + len(split.val) == 219
    holding = [name for name, f in split.frames().items() if (f[PATIENT_COLUMN] == 13).any()]
    assert len(holding) == 1
    with pytest.raises(DataError, match=r"not in the table \(first: "):
        split_official(mini, (TRAIN_VAL_LIST, TEST_LIST), allow_subset=False)


# --- small tables and errors ------------------------------------------------------------------


def test_rare_label_reaches_every_set_when_there_are_enough_patients():
    for seed in range(20):
        split = split_by_patients(
            synthetic(100, rare=3), val_patients=10, test_patients=10, seed=seed
        )
        summary = split.summary()
        assert summary["Hernia"].tolist() == [1, 1, 1], seed
        assert summary["patients"].tolist() == [80, 10, 10]


def test_counts_too_large():
    with pytest.raises(DataError, match="only 100 patients"):
        split_by_patients(synthetic(100), val_patients=60, test_patients=40)
    with pytest.raises(DataError, match="asked for 101 test patients"):
        split_by_patients(synthetic(100), test_patients=101)


def test_count_and_fraction_for_one_set():
    with pytest.raises(DataError, match="not both"):
        split_by_patients(synthetic(100), val_patients=10, val_fraction=0.1)
    with pytest.raises(DataError, match=r"test_fraction must be in \[0, 1\)"):
        split_by_patients(synthetic(100), test_fraction=1.5)


def test_mixed_count_and_fraction_and_empty_val(tmp_path):
    split = split_by_patients(synthetic(100, rare=3), val_patients=0, test_fraction=0.25)
    assert split.summary()["patients"].tolist() == [75, 0, 25]
    write_split(split, tmp_path)
    assert len(read_split(tmp_path)["val"]) == 0


def test_missing_lists_name_where_they_looked(tmp_path):
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "test_list.txt").write_text("a.png\n")
    with pytest.raises(DataError, match=rf"{tmp_path}.*found only .*test_list\.txt"):
        find_official_lists(tmp_path)


def test_official_lists_must_cover_the_table_and_be_disjoint_by_patient(tmp_path):
    table = synthetic(6)
    names = table[IMAGE_COLUMN].tolist()
    (tmp_path / "train_val_list.txt").write_text("\n".join(names[:3]))
    (tmp_path / "test_list.txt").write_text("\n".join(names[3:5]))
    with pytest.raises(DataError, match=r"1 of 6 table row\(s\) are in neither .*00000006_000"):
        split_official(table, tmp_path)

    table.loc[5, PATIENT_COLUMN] = 1
    (tmp_path / "test_list.txt").write_text("\n".join(names[3:]))
    with pytest.raises(LeakageError, match="share patients") as caught:
        split_official(table, tmp_path)
    assert caught.value.shared == {1: {"train_val": 1, "test": 1}}


@pytest.mark.slow
def test_nih_boxes_fall_in_the_test_set_only_with_the_official_split(shared_data):
    """What `cxr localize` warns about, on the real NIH table and box file."""
    from cxr.data.layouts.nih import load_nih
    from cxr.data.split import find_official_lists, split_by_patients, split_official
    from cxr.explain.localize import read_boxes

    meta = shared_data / "nih" / "metadata"
    table = load_nih(meta / "Data_Entry_2017_v2020.csv.gz", require_images=False).table
    boxed = set(read_boxes(meta / "BBox_List_2017.csv.gz")["image"])
    assert len(boxed) == 880

    def boxed_per_set(split) -> list[int]:
        return [len(set(f["Image Index"]) & boxed) for f in (split.train, split.val, split.test)]

    method = split_by_patients(table, val_patients=1672, test_patients=389, seed=0)
    assert boxed_per_set(method) == [825, 47, 8]
    official = split_official(table, find_official_lists([meta]), seed=0)
    assert boxed_per_set(official) == [0, 0, 880]
