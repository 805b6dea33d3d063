"""``cxr data stats`` on the real NIH table and on bad input."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from cxr.cli import app

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
    "No Finding": 60_361,
}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def stats(runner: CliRunner, *args: str):
    return runner.invoke(app, ["data", "stats", *map(str, args)])


def test_stats_on_v2020_table(runner, v2020_csv):
    result = stats(runner, v2020_csv)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert str(v2020_csv) in out
    assert "images: 112,120" in out
    assert "patients: 30,805" in out
    assert "views: PA 67,310, AP 44,810" in out
    assert "sex: M 63,340, F 48,780" in out
    lines = out.splitlines()
    for name, count in PUBLISHED_COUNTS.items():
        row = [line for line in lines if re.search(rf"\b{re.escape(name)}\b", line)]
        assert len(row) == 1, (name, out)
        assert re.search(rf"\b{count:,}\b", row[0]), (name, row[0])
        assert f"{count / 112_120:.2%}" in row[0]
    # Rows are sorted by count, most frequent first.
    order = [
        name
        for line in lines
        for name in PUBLISHED_COUNTS
        if re.search(rf"\b{re.escape(name)}\b", line)
    ]
    assert order == sorted(PUBLISHED_COUNTS, key=lambda n: -PUBLISHED_COUNTS[n])
    assert result.stderr == ""


def test_stats_json(runner, v2020_csv):
    result = stats(runner, v2020_csv, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["images"] == 112_120
    assert data["patients"] == 30_805
    assert {name: entry["count"] for name, entry in data["labels"].items()} == PUBLISHED_COUNTS
    assert data["labels"]["Infiltration"]["prevalence"] == pytest.approx(19_894 / 112_120)
    assert data["views"] == {"PA": 67_310, "AP": 44_810}
    assert data["sex"] == {"M": 63_340, "F": 48_780}
    assert data["age_years"]["min"] == 0.0


def test_stats_on_folder_finds_metadata_table(runner, nih_dir, v2020_csv):
    result = stats(runner, nih_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 112_120


def test_stats_on_sample_csv(runner, sample_csv):
    result = stats(runner, sample_csv, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["images"], data["patients"]) == (264, 260)
    assert data["labels"]["Hernia"]["count"] == 16


def test_stats_missing_path(runner, tmp_path):
    # A long path must come out whole (no wrapping at the console width).
    missing = tmp_path / ("a-rather-long-folder-name-" * 4) / "Data_Entry_2017.csv"
    result = stats(runner, missing)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"error: {missing}: no such file or folder" in result.stderr
    assert result.stdout == ""


def test_stats_unknown_label(runner, write_csv, sample_lines):
    fields = sample_lines[2].split(",")
    fields[1] = "Effusion|Lung_Opacity"
    path = write_csv("Data_Entry_2017.csv", [*sample_lines[:2], ",".join(fields)])
    result = stats(runner, path)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert f"{path}, line 3: unknown label 'Lung_Opacity'" in result.stderr


def test_stats_error_text_is_not_rich_markup(runner, write_csv):
    # Brackets in NIH's header and in labels must be printed as they are.
    header = "Image Index,Patient ID,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
    path = write_csv("no_labels.csv", [header, "00000001_000.png,1,2500,2048,0.168,0.168"])
    result = stats(runner, path)
    assert result.exit_code == 2
    assert "missing column(s) 'Finding Labels'" in result.stderr
    assert "'OriginalImagePixelSpacing[x', 'y]'" in result.stderr

    path = write_csv("markup.csv", ["Image Index,Finding Labels", "00000001_000.png,[bold]Mass"])
    result = stats(runner, path)
    assert result.exit_code == 2
    assert "unknown label '[bold]Mass'" in result.stderr


def test_stats_empty_table(runner, tmp_path):
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text("")
    result = stats(runner, path)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert f"{path}: the table is empty" in result.stderr
