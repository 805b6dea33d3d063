"""``GET /v1/results``: cxr serve reads the DICOM listener's results store (SQLite here; the
store's own tests run it against PostgreSQL too). Rows are written by the test through the
store's API and must come back as written."""

from __future__ import annotations

from datetime import datetime

import pytest
from fastapi.testclient import TestClient
from support.results import DAY, write_three_instances

from cxr.engine.inference import load_predictor
from cxr.errors import ConfigError
from cxr.results import DEFAULT_STORE_NAME
from cxr.serve.app import create_app

KEY = "results-test-key-0123456789"


@pytest.fixture(scope="module")
def predictor(untrained_bundle):
    return load_predictor(untrained_bundle, backend="torch", device="cpu")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder whose results.sqlite holds three instances: sent, refused, received."""
    folder = tmp_path_factory.mktemp("run")
    write_three_instances(str(folder / DEFAULT_STORE_NAME))
    return folder


def test_results_come_back_as_written_and_filter(predictor, run_folder):
    client = TestClient(create_app(predictor=predictor, results_db=str(run_folder)))
    every = client.get("/v1/results")
    assert every.status_code == 200, every.text
    body = every.json()
    assert body["count"] == 3 and body["limit"] == 100
    sent = next(r for r in body["results"] if r["sop_instance_uid"] == "1.2.3.1")
    assert sent["status"] == "sent" and sent["study_instance_uid"] == "1.2.3"
    assert sent["probabilities"] == {"Effusion": 0.75, "Mass": 0.125}
    assert sent["calls"] == {"Effusion": True, "Mass": False}
    assert sent["model_digest"] == "ab" * 32
    assert datetime.fromisoformat(sent["received_at"]) == DAY

    refused = client.get("/v1/results", params={"status": "refused"}).json()["results"]
    assert [(r["sop_instance_uid"], r["reason"]) for r in refused] == [
        ("1.2.3.2", "lateral view (ViewPosition LL)")
    ]
    later = client.get("/v1/results", params={"since": "2026-11-28T12:00:00+00:00"}).json()
    assert [r["sop_instance_uid"] for r in later["results"]] == ["1.2.3.3"]
    first = client.get("/v1/results", params={"limit": 1}).json()
    assert first["count"] == 1 and first["results"][0]["sop_instance_uid"] == "1.2.3.1"


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"status": "lost"}, "status: choose one of"),
        ({"since": "yesterday"}, "since: not an ISO 8601 time"),
        ({"since": "2026-11-27" + "0" * 100}, "since: not an ISO 8601 time"),
        ({"limit": 0}, "limit: invalid value"),
        ({"limit": 100_000}, "limit: invalid value"),
    ],
)
def test_bad_queries_are_422(predictor, run_folder, params, says):
    client = TestClient(create_app(predictor=predictor, results_db=str(run_folder)))
    response = client.get("/v1/results", params=params)
    assert response.status_code == 422 and says in response.json()["detail"]


def test_without_a_store_404_and_a_missing_store_is_refused_at_start(predictor, tmp_path):
    response = TestClient(create_app(predictor=predictor)).get("/v1/results")
    assert response.status_code == 404 and "--results-db" in response.json()["detail"]
    with pytest.raises(ConfigError, match="no results store here"):
        create_app(predictor=predictor, results_db=str(tmp_path / "typo.sqlite"))
    assert not (tmp_path / "typo.sqlite").exists()  # reading never creates a store


def test_results_need_the_key_when_there_is_one(predictor, run_folder):
    client = TestClient(create_app(predictor=predictor, results_db=str(run_folder), api_key=KEY))
    assert client.get("/v1/results").status_code == 401
    response = client.get("/v1/results", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and response.json()["count"] == 3
