"""CheXpert's label table (issue 15's first step): read, checked and counted without images."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cxr.cli import app
from cxr.data.layouts.chexpert import chexpert_stats, is_chexpert_table, read_chexpert
from cxr.errors import DataError

HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
    "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
    "Pleural Effusion,Pleural Other,Fracture,Support Devices"
)
ROW = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,"


@pytest.fixture(scope="module")
def real_table(shared_data):
    return shared_data / "chexpert" / "train.csv.gz"


def test_the_real_training_table_gives_the_published_figures(real_table):
    stats = chexpert_stats(read_chexpert(real_table))
    # Irvin et al. 2019 (CheXpert), training set.
    assert (stats["images"], stats["patients"], stats["frontal"]) == (223_414, 64_540, 191_027)
    assert stats["labels"]["Cardiomegaly"] == {
        "positive": 27_000, "negative": 11_116, "uncertain": 8_087, "blank": 177_211,
    }  # fmt: skip
    effusion = stats["labels"]["Pleural Effusion"]
    assert (effusion["positive"], effusion["uncertain"]) == (86_187, 11_628)
    assert stats["labels"]["No Finding"]["positive"] == 22_381
    for counts in stats["labels"].values():
        assert sum(counts.values()) == 223_414


@pytest.mark.slow
def test_cxr_data_stats_reads_a_chexpert_table_without_its_images(real_table):
    result = CliRunner().invoke(app, ["data", "stats", str(real_table), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["layout"] == "chexpert" and stats["images"] == 223_414
    table = CliRunner().invoke(app, ["data", "stats", str(real_table)], env={"COLUMNS": "160"})
    assert "images: 223,414   patients: 64,540   frontal: 191,027" in table.stdout


def test_bad_chexpert_tables_name_the_file_line_and_problem(tmp_path):
    blanks = "," * 12  # after the first label: 13 more, blank
    cases = {
        "missing.csv": (
            f"{HEADER.replace(',Fracture', '')}\n{ROW}1.0,{blanks[1:]}",
            "missing column(s) 'Fracture'",
        ),
        "value.csv": (
            f"{HEADER}\n{ROW}1.0,{blanks}\n{ROW}2.0,{blanks}",
            "line 3: label 'No Finding' is '2.0'; expected 1 (positive), 0 (negative), -1",
        ),
        "patient.csv": (
            f"{HEADER}\n{ROW.replace('patient00001/', '')}1.0,{blanks}",
            "line 2: no patient in the path",
        ),
    }
    for name, (text, problem) in cases.items():
        path = tmp_path / name
        path.write_text(text + "\n")
        assert is_chexpert_table(path)
        with pytest.raises(DataError) as info:
            read_chexpert(path)
        assert str(info.value).startswith(f"{path}") and problem in str(info.value), name
    (tmp_path / "nih.csv").write_text("Image Index,Finding Labels\n")
    assert not is_chexpert_table(tmp_path / "nih.csv")
