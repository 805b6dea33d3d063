"""Issue 22: readers create nothing, odd but valid input gets the right answer, and a
backup holds every row. References: Python's sqlite3 on the files themselves, the HTTP
status codes, the file system."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cxr.cli import app
from cxr.engine.inference import load_predictor
from cxr.results import open_store
from cxr.serve.app import create_app
from cxr.testing import png_bytes, untrained_bundle

DAY = datetime(2026, 11, 27, 8, 0, tzinfo=timezone.utc)


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


@pytest.fixture
def store_file(tmp_path) -> Path:
    path = tmp_path / "results.sqlite"
    store = open_store(str(path))
    for n in range(5):
        store.admit(f"1.2.3.{n}", received_at=DAY, calling_ae="PACS")
    yield path
    store.close()


def test_a_reader_never_creates_a_store(tmp_path):
    for source in (f"sqlite:///{tmp_path}/typo.sqlite", str(tmp_path / "typo.sqlite")):
        code, output = run_cli("results", source)
        assert code != 0 and "no results store here" in output
    assert not any(tmp_path.iterdir())
    empty = tmp_path / "other.sqlite"
    sqlite3.connect(empty).execute("CREATE TABLE t (x)").connection.close()
    code, output = run_cli("results", empty)
    assert code != 0 and "no cxr results table" in output
    with sqlite3.connect(empty) as connection:
        tables = [r[0] for r in connection.execute("SELECT name FROM sqlite_master")]
    assert tables == ["t"]


def test_a_backup_holds_every_row_while_the_store_is_open(store_file, tmp_path):
    code, output = run_cli("results", "backup", store_file, tmp_path / "backup.sqlite")
    assert code == 0 and "5 row(s)" in output
    with sqlite3.connect(tmp_path / "backup.sqlite") as connection:
        uids = sorted(r[0] for r in connection.execute("SELECT sop_instance_uid FROM results"))
    assert uids == [f"1.2.3.{n}" for n in range(5)]
    code, output = run_cli("results", "backup", store_file, tmp_path / "backup.sqlite")
    assert code != 0 and "already exists" in output
    code, output = run_cli("results", store_file, "--csv")  # the old spelling still works
    assert code == 0 and output.count("1.2.3.") == 5


def test_closing_a_store_folds_its_log_into_the_file(store_file, tmp_path):
    store = open_store(str(store_file))
    store.admit("1.2.3.9", received_at=DAY)
    store.close()
    copied = tmp_path / "copied.sqlite"
    copied.write_bytes(store_file.read_bytes())
    with sqlite3.connect(copied) as connection:
        assert connection.execute("SELECT count(*) FROM results").fetchone()[0] == 6


@pytest.mark.parametrize("since", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_since_out_of_range_is_422_and_a_clear_cli_error(store_file, since):
    predictor = load_predictor(untrained_bundle_for(store_file.parent), backend="torch")
    client = TestClient(create_app(predictor=predictor, results_db=str(store_file)))
    response = client.get("/v1/results", params={"since": since})
    assert response.status_code == 422 and "out of range" in response.json()["detail"]
    code, output = run_cli("results", store_file, "--since", since)
    assert code != 0 and "out of range" in output


def untrained_bundle_for(folder: Path, labels=None) -> Path:
    extra = {} if labels is None else {"labels": labels}
    return untrained_bundle(folder / "bundle", 32, **extra)


def test_explain_names_labels_as_the_bundle_writes_them(tmp_path):
    labels = ["Pleural Effusion", "Pleural_Thickening", "Épanchement", "No Finding"]
    predictor = load_predictor(untrained_bundle_for(tmp_path, labels), backend="torch")
    client = TestClient(create_app(predictor=predictor))
    image = png_bytes(__import__("numpy").full((48, 48), 128, dtype="uint8"))
    for name in ("Pleural Effusion", "pleural effusion", "PLEURAL_EFFUSION",
                 "pleural thickening", "épanchement", "3"):  # fmt: skip
        response = client.post(
            "/v1/explain", files={"file": ("x.png", image, "image/png")}, data={"pathology": name}
        )
        assert response.status_code == 200, (name, response.text)
    response = client.post(
        "/v1/explain", files={"file": ("x.png", image, "image/png")}, data={"pathology": "Mass"}
    )
    assert response.status_code == 422
    assert all(label in response.json()["detail"] for label in labels)
