"""Issue 22: readers create nothing, odd but valid input gets the right answer, and a
backup holds every row. References: Python's sqlite3 on the files themselves, the HTTP
status codes, the file system."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from support.media import png_bytes, untrained_bundle
from typer.testing import CliRunner

from cxr.cli import app
from cxr.engine.inference import load_predictor
from cxr.results import open_store
from cxr.serve.app import create_app

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


@pytest.mark.slow
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


def digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_another_split_and_two_external_sets_called_images_replace_nothing(trained_run, tmp_path):
    """A run's own test results stay byte for byte when another table named test.csv is
    evaluated, and two external sets whose folders are both called ``images`` keep their
    own results; the report builds on the whole mixture."""
    import json
    import shutil

    import pandas as pd

    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    fast = ["--workers", "0", "--device", "cpu"]
    assert run_cli("evaluate", run, *fast)[0] == 0
    own = digest(run / "predictions-test.csv")
    own_test = json.loads((run / "metrics.json").read_text())["test"]
    test = pd.read_csv(run / "split" / "test.csv", dtype=str, keep_default_na=False)
    other = tmp_path / "other" / "test.csv"
    other.parent.mkdir()
    test.head(len(test) // 2).to_csv(other, index=False)
    code, output = run_cli("evaluate", run, "--split", other, *fast)
    assert code == 0, output
    metrics = json.loads((run / "metrics.json").read_text())
    assert digest(run / "predictions-test.csv") == own
    assert metrics["test"] == own_test
    (key,) = [k for k in metrics if k.startswith("split-test-")]
    assert metrics[key]["images"] == len(test) // 2
    assert (run / f"predictions-{key}.csv").is_file()

    # Two hospitals' tables of the run's unseen test patients, each in a folder "images".
    from cxr.labels import PATHOLOGIES

    table = test[["path", "Patient ID", *PATHOLOGIES]].rename(
        columns={"path": "image", "Patient ID": "patient"}
    )
    sources = []
    for site, rows in (("site-a", table.head(20)), ("site-b", table.tail(20))):
        folder = tmp_path / site / "images"
        folder.mkdir(parents=True)
        rows.to_csv(folder / "labels.csv", index=False)
        sources.append(folder / "labels.csv")
        code, output = run_cli("evaluate", run, "--data", folder / "labels.csv", "--split",
                               "all", "--image-col", "image", "--patient-col", "patient",
                               *fast)  # fmt: skip
        assert code == 0, output
    external = json.loads((run / "metrics.json").read_text())["external"]
    assert len(external) == 2 and "labels.csv" in external
    assert sorted(r["data"] for r in external.values()) == sorted(str(s) for s in sources)
    assert len({r["predictions"] for r in external.values()}) == 2
    code, output = run_cli("report", run, *fast, "--resamples", 20)
    assert code == 0, output
    page = (run / "report.html").read_text()
    assert all(str(source) in page for source in sources)


def generic_table(tmp_path: Path, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / "labels.csv"
    path.write_bytes(text.encode(encoding))
    return path


def test_generic_tables_keep_other_columns_and_refuse_what_is_ambiguous(tmp_path):
    from cxr.data.datasets import DatasetSpec, read_dataset
    from cxr.errors import DataError
    from cxr.subgroups import build_groupings

    spec = DatasetSpec(image_col="file", patient_col="mrn", labels=("Effusion",))
    rows = "".join(f"img{n}.png,P{n},{n % 2},{'AB'[n % 2]}\n" for n in range(6))
    data = read_dataset(
        generic_table(tmp_path, "file,mrn,Effusion,site\n" + rows), spec, require_images=False
    )
    assert data.table["site"].tolist() == ["A", "B"] * 3
    (grouping,) = [g for g in build_groupings(data.table, ["site"]) if g.column == "site"]
    assert grouping.names == ("A", "B") and grouping.codes.tolist() == [0, 1] * 3

    with pytest.raises(DataError, match=r"line 1: the column 'site' appears more than once"):
        read_dataset(generic_table(tmp_path, "file,mrn,Effusion,site,site\n" + rows.replace(
            "\n", ",x\n")), spec, require_images=False)  # fmt: skip
    latin = "file,mrn,Effusion\na.png,P1,1\nb.png,Ren\xe9e,0\n"
    with pytest.raises(DataError, match=r"labels\.csv, line 3: not UTF-8"):
        read_dataset(generic_table(tmp_path, latin, "latin-1"), spec, require_images=False)


def test_results_csv_has_empty_cells_for_times_not_reached(store_file):
    code, output = run_cli("results", store_file, "--csv")
    assert code == 0 and "NaT" not in output and "None" not in output
