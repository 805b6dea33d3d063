"""The synthetic CheXpert- and MIMIC-CXR-JPG-layout writers (issue 15), and the NIH layout's
output unchanged by them."""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxr.cli import app
from cxr.data.layouts.chexpert import chexpert_stats, read_chexpert
from cxr.data.synthetic import render_image, write_synthetic_dataset
from cxr.errors import ConfigError, DataError

SEED = 4
PATIENTS = 40
SIZE = 64
ROOT = "CheXpert-v1.0-small"
# The 14 observations as the real tables spell them.
OBSERVATIONS = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
# The map from NIH findings to CheXpert observations, written out independently.
MAP = {
    "Cardiomegaly": {"Cardiomegaly"},
    "Effusion": {"Pleural Effusion"},
    "Edema": {"Edema", "Lung Opacity"},
    "Consolidation": {"Consolidation", "Lung Opacity"},
    "Pneumonia": {"Pneumonia", "Lung Opacity"},
    "Atelectasis": {"Atelectasis", "Lung Opacity"},
    "Pneumothorax": {"Pneumothorax"},
    "Mass": {"Lung Lesion", "Lung Opacity"},
    "Nodule": {"Lung Lesion"},
    "Infiltration": {"Lung Opacity"},
    "Pleural_Thickening": {"Pleural Other"},
    "Emphysema": set(),
    "Fibrosis": set(),
    "Hernia": set(),
}
NIH_ORDER = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
]
# What drawn findings say about each observation: 1, 0, or None (never drawn: no claim).
NEVER_DRAWN = {"Enlarged Cardiomediastinum", "Fracture", "Support Devices"}


def expected_observations(finding_labels: str) -> dict[str, int | None]:
    findings = [] if finding_labels == "No Finding" else finding_labels.split("|")
    positive = set().union(*(MAP[name] for name in findings)) if findings else set()
    result = {name: int(name in positive) for name in OBSERVATIONS}
    result["No Finding"] = int(not findings)
    for name in NEVER_DRAWN:
        result[name] = None
    return result


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layouts") / "chexpert"
    summary = write_synthetic_dataset(
        out, layout="chexpert", patients=PATIENTS, image_size=SIZE, seed=SEED
    )
    assert summary.layout == "chexpert" and summary.patients == PATIENTS
    return out


@pytest.fixture(scope="module")
def mimic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layouts") / "mimic"
    write_synthetic_dataset(out, layout="mimic", patients=PATIENTS, image_size=SIZE, seed=SEED)
    return out


def read_labels(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def findings(out: Path) -> dict[str, str]:
    table = pd.read_csv(out / "synthetic_findings.csv", dtype=str, keep_default_na=False)
    return dict(zip(table["path"], table["Finding Labels"]))


def tree_digest(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------------
# NIH: unchanged


# Written by the NIH writer before the layouts existed (commit 2c49b2e), patients=6,
# image_size=64, seed=5: the tables' sha256 and one sha256 over every image's name and pixels.
NIH_REFERENCE = {
    "Data_Entry_2017.csv": "b6d4d0395bc66572d67b6b198a32a6915d41a9855e2545b4c01fd1ec9c6b6a2e",
    "BBox_List_2017.csv": "45efcece7d2c0056ccbe277e8f84ad567a429e6c0659e933f50341723fa93bc2",
    "train_val_list.txt": "a6ab3e474e4cbfdc8e2a8c0f20f50fbf7bf66022bb8bb99d769fa57d13c1e79e",
    "test_list.txt": "0b3612896bec550bcb0da70a5066e86c80830da4364e2cc39cde87ce0416e477",
}
NIH_PIXELS = "671a69a3d4350538ae7bb5ecc9655f9f37e20b303df0fecadee3174acc394fb4"


@pytest.mark.parametrize("layout", [None, "nih"])
def test_nih_layout_output_is_unchanged(tmp_path, layout):
    options = {} if layout is None else {"layout": layout}
    out = tmp_path / "nih"
    write_synthetic_dataset(out, patients=6, image_size=64, seed=5, **options)
    for name, digest in NIH_REFERENCE.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    pixels = hashlib.sha256()
    images = sorted((out / "images").glob("*.png"))
    assert len(images) == 17
    for path in images:
        pixels.update(path.name.encode())
        pixels.update(np.asarray(Image.open(path)).tobytes())
    assert pixels.hexdigest() == NIH_PIXELS


# ---------------------------------------------------------------------------------------------
# CheXpert


def test_chexpert_headers_are_the_real_tables(chexpert, shared_data):
    with gzip.open(shared_data / "chexpert" / "train.csv.gz", "rt", encoding="utf-8") as f:
        real_header = f.readline().rstrip("\n")
    for name in ("train.csv", "valid.csv"):
        lines = (chexpert / ROOT / name).read_text(encoding="utf-8").splitlines()
        assert lines[0] == real_header
        assert len(lines) > 1


def test_chexpert_rows_and_paths(chexpert):
    pattern = re.compile(
        rf"{ROOT}/(train|valid)/patient(\d{{5}})/study(\d+)/view(\d)_(frontal|lateral)\.jpg"
    )
    lateral_rows = 0
    for folder in ("train", "valid"):
        table = read_labels(chexpert / ROOT / f"{folder}.csv")
        assert not table["Path"].duplicated().any()
        for row in table.itertuples(index=False):
            path, sex, age, frontal_lateral, ap_pa = row[:5]
            match = pattern.fullmatch(path)
            assert match and match[1] == folder, path
            assert frontal_lateral == match[5].capitalize()
            if frontal_lateral == "Frontal":
                assert ap_pa in {"AP", "PA"}
            else:
                assert ap_pa == ""
                lateral_rows += 1
            assert sex in {"Male", "Female"} and age.isdigit() and 0 < int(age) <= 90
            image = Image.open(chexpert / path)
            assert (image.format, image.mode, image.size) == ("JPEG", "L", (SIZE, SIZE))
    assert lateral_rows > 0
    on_disk = {str(p.relative_to(chexpert)) for p in (chexpert / ROOT).rglob("*.jpg")}
    listed = set(findings(chexpert))
    assert on_disk == listed


def test_chexpert_frontal_images_show_the_listed_findings(chexpert):
    """The findings file is the renderer's truth: image i is rendered from it."""
    for i, (path, labels) in enumerate(list(findings(chexpert).items())[:12]):
        if "lateral" in path:
            continue
        flags = [int(name in labels.split("|")) for name in NIH_ORDER]
        expected, _ = render_image(flags, np.random.default_rng([SEED, 2, 1, i]), SIZE)
        written = np.asarray(Image.open(chexpert / path), dtype=np.float64)
        assert np.abs(written - expected).mean() < 3  # JPEG's loss only


def check_labels_follow_findings(rows: pd.DataFrame, truth: list[str], *, exact: bool) -> dict:
    """Every 1 / 0 cell agrees with the drawn findings through MAP; returns the counts of what
    the positives and the drawable negatives became."""
    became = {"positive": [], "negative": []}
    for labels, (_, row) in zip(truth, rows.iterrows()):
        expected = expected_observations(labels)
        for name in OBSERVATIONS:
            cell, want = row[name], expected[name]
            if exact:
                assert cell in {"1.0", "0.0"}
                if want is not None:
                    assert float(cell) == want, (name, labels)
                continue
            assert cell in {"1.0", "0.0", "-1.0", ""}
            if cell in {"1.0", "0.0"} and want is not None:
                assert float(cell) == want, (name, labels, cell)
            if want is None:
                assert cell in {"0.0", ""}  # never drawn: not mentioned or negative
            elif name != "No Finding":
                became["positive" if want else "negative"].append(cell)
    return became


def test_chexpert_labels_follow_the_findings_and_the_labeller(chexpert, shared_data):
    truth = findings(chexpert)
    train = read_labels(chexpert / ROOT / "train.csv")
    became = check_labels_follow_findings(train, [truth[p] for p in train["Path"]], exact=False)
    positives, negatives = np.array(became["positive"]), np.array(became["negative"])
    assert len(positives) > 50 and len(negatives) > 500
    assert 0.02 <= np.mean(positives == "-1.0") <= 0.2  # asked: 0.10
    assert 0.8 <= np.mean(negatives == "") <= 0.92  # asked: 0.86
    assert 0.02 <= np.mean(negatives == "-1.0") <= 0.1  # asked: 0.06
    # Roughly the real table's mix of blank and uncertain cells.
    real = pd.read_csv(shared_data / "chexpert" / "train.csv.gz", usecols=OBSERVATIONS)
    ours = train[OBSERVATIONS]
    assert abs((ours == "").to_numpy().mean() - real.isna().to_numpy().mean()) < 0.1
    assert abs((ours == "-1.0").to_numpy().mean() - (real == -1).to_numpy().mean()) < 0.03

    valid = read_labels(chexpert / ROOT / "valid.csv")
    check_labels_follow_findings(valid, [truth[p] for p in valid["Path"]], exact=True)


def test_chexpert_valid_patients_are_not_in_train(chexpert):
    def patients(name):
        paths = read_labels(chexpert / ROOT / name)["Path"]
        return set(paths.str.extract(r"(patient\d+)/", expand=False))

    train, valid = patients("train.csv"), patients("valid.csv")
    assert train and valid and not train & valid
    assert len(train | valid) == PATIENTS


def test_chexpert_tables_read_back_with_the_reader(chexpert):
    stats = chexpert_stats(read_chexpert(chexpert / ROOT / "train.csv"))
    train = read_labels(chexpert / ROOT / "train.csv")
    assert stats["images"] == len(train)
    assert stats["lateral"] == int((train["Frontal/Lateral"] == "Lateral").sum()) > 0
    assert stats["labels"]["Fracture"]["positive"] == 0


# ---------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG

MIMIC_LABEL_HEADER = (
    "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,"
    "Enlarged Cardiomediastinum,Fracture,Lung Lesion,Lung Opacity,No Finding,"
    "Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices"
)
MIMIC_METADATA_HEADER = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,"
    "Columns,StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,"
    "ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning"
)
MIMIC_SPLIT_HEADER = "dicom_id,study_id,subject_id,split"


def mimic_table(out: Path, kind: str, header: str) -> pd.DataFrame:
    path = out / f"mimic-cxr-2.0.0-{kind}.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        assert f.readline().rstrip("\n") == header
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_mimic_tables_join(mimic):
    labels = mimic_table(mimic, "chexpert", MIMIC_LABEL_HEADER)
    metadata = mimic_table(mimic, "metadata", MIMIC_METADATA_HEADER)
    split = mimic_table(mimic, "split", MIMIC_SPLIT_HEADER)
    assert not labels["study_id"].duplicated().any()
    assert not metadata["dicom_id"].duplicated().any()
    study_subject = dict(zip(labels["study_id"], labels["subject_id"]))
    for row in metadata.itertuples(index=False):
        assert study_subject[row.study_id] == row.subject_id
    assert set(metadata["study_id"]) == set(labels["study_id"])
    joined = metadata.merge(split, on=["dicom_id", "study_id", "subject_id"], how="outer")
    assert len(joined) == len(metadata) == len(split)
    assert metadata["subject_id"].nunique() == PATIENTS
    assert set(metadata["ViewPosition"]) <= {"PA", "AP", "LATERAL", "LL"}
    assert {"LATERAL", "LL"} & set(metadata["ViewPosition"])
    assert set(metadata["Rows"]) == set(metadata["Columns"]) == {str(SIZE)}
    for date in metadata["StudyDate"]:
        assert re.fullmatch(r"2[12]\d\d(0[1-9]|1[0-2])\d\d", date)


def test_mimic_paths_follow_the_layout(mimic):
    metadata = mimic_table(mimic, "metadata", MIMIC_METADATA_HEADER)
    hexes = r"[0-9a-f]{8}(-[0-9a-f]{8}){4}"
    for row in metadata.itertuples(index=False):
        assert re.fullmatch(r"1\d{7}", row.subject_id) and re.fullmatch(r"5\d{7}", row.study_id)
        assert re.fullmatch(hexes, row.dicom_id)
        path = mimic / "files" / f"p{row.subject_id[:2]}" / f"p{row.subject_id}"
        path = path / f"s{row.study_id}" / f"{row.dicom_id}.jpg"
        image = Image.open(path)
        assert (image.format, image.mode, image.size) == ("JPEG", "L", (SIZE, SIZE))
    assert len(list((mimic / "files").rglob("*.jpg"))) == len(metadata)


def test_mimic_split_is_by_subject(mimic):
    split = mimic_table(mimic, "split", MIMIC_SPLIT_HEADER)
    assert set(split["split"]) == {"train", "validate", "test"}
    assert (split.groupby("subject_id")["split"].nunique() == 1).all()


def test_mimic_labels_follow_the_findings(mimic):
    labels = mimic_table(mimic, "chexpert", MIMIC_LABEL_HEADER)
    metadata = mimic_table(mimic, "metadata", MIMIC_METADATA_HEADER)
    truth = findings(mimic)
    by_study = {}
    for row in metadata.itertuples(index=False):
        path = f"files/p{row.subject_id[:2]}/p{row.subject_id}/s{row.study_id}/{row.dicom_id}.jpg"
        by_study.setdefault(row.study_id, set()).add(truth[path])
    assert all(len(found) == 1 for found in by_study.values())  # views share their study's
    study_truth = [by_study[s].pop() for s in labels["study_id"]]
    became = check_labels_follow_findings(labels, study_truth, exact=False)
    assert "-1.0" in became["positive"] and "" in became["negative"]


# ---------------------------------------------------------------------------------------------
# Both


@pytest.mark.parametrize("layout", ["chexpert", "mimic"])
def test_same_seed_same_bytes(tmp_path, layout, chexpert, mimic):
    again = tmp_path / "again"
    write_synthetic_dataset(again, layout=layout, patients=PATIENTS, image_size=SIZE, seed=SEED)
    first = chexpert if layout == "chexpert" else mimic
    assert tree_digest(again) == tree_digest(first)
    other = tmp_path / "other"
    write_synthetic_dataset(other, layout=layout, patients=PATIENTS, image_size=SIZE, seed=5)
    assert tree_digest(other) != tree_digest(first)


def test_workers_do_not_change_the_bytes(tmp_path, mimic):
    out = tmp_path / "workers"
    write_synthetic_dataset(
        out, layout="mimic", patients=PATIENTS, image_size=SIZE, seed=SEED, workers=2
    )
    assert tree_digest(out) == tree_digest(mimic)


@pytest.mark.parametrize("layout", ["chexpert", "mimic"])
def test_readme_and_overwrite_guard(tmp_path, layout):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a synthetic dataset"):
        write_synthetic_dataset(taken, layout=layout, patients=3, image_size=SIZE)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]

    out = tmp_path / "synth"
    write_synthetic_dataset(out, layout="nih", patients=3, image_size=SIZE)
    write_synthetic_dataset(out, layout=layout, patients=3, image_size=SIZE)  # replaces it
    readme = (out / "README.txt").read_text(encoding="utf-8")
    assert readme.startswith("SYNTHETIC chest X-ray dataset generated by cxr")
    assert "NOT MEDICAL DATA" in readme
    assert not (out / "Data_Entry_2017.csv").exists()


def test_unknown_layout_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="layout"):
        write_synthetic_dataset(tmp_path / "x", layout="padchest", patients=3, image_size=SIZE)
    assert not (tmp_path / "x").exists()


def test_cli_writes_each_layout(tmp_path):
    runner = CliRunner()
    for layout, table in (
        ("chexpert", f"{ROOT}/train.csv"),
        ("mimic", "mimic-cxr-2.0.0-metadata.csv.gz"),
    ):
        out = tmp_path / layout
        args = ["data", "synth", "--out", str(out), "--patients", "3", "--image-size", "32"]
        result = runner.invoke(app, [*args, "--layout", layout])
        assert result.exit_code == 0, result.output
        assert "SYNTHETIC" in result.output and (out / table).is_file()
