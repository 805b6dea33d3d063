"""The results store, the same tests against SQLite and against a real PostgreSQL (Debian's
package, a temporary cluster on a loopback port started here). What was written is checked
with plain SQL on the database itself, not only through the store's own reading."""

from __future__ import annotations

import io
import itertools
import threading
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import sqlalchemy as sa
from support.services import running_postgres
from typer.testing import CliRunner

from cxr.cli import app
from cxr.results import StoreError, open_store

_databases = itertools.count()


@pytest.fixture(scope="session")
def postgres_server():
    with running_postgres() as url:
        yield url


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)],
)
def store_url(request, tmp_path) -> str:
    """A fresh, empty store's URL: an SQLite file, or a new database in the cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.sqlite'}"
    server = request.getfixturevalue("postgres_server")
    name = f"results_{next(_databases)}"
    admin = sa.create_engine(
        server.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(sa.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return server.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def store(store_url):
    with open_store(store_url) as opened:
        yield opened


def raw_rows(url: str) -> list[dict]:
    """The table as the database holds it, read with plain SQL."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT * FROM results ORDER BY id")).mappings().all()
    engine.dispose()
    return [dict(row) for row in rows]


def test_an_instance_goes_received_predicted_sent(store, store_url):
    before = datetime.now(timezone.utc)
    assert store.admit("1.2.3", study_instance_uid="1.2", calling_ae="PACS")
    probabilities = {"Effusion": 0.1234567890123456789, "Mass": 1 / 3}
    calls = {"Effusion": False, "Mass": True}
    store.predicted("1.2.3", model_digest="ab" * 32, probabilities=probabilities, calls=calls)
    store.sent("1.2.3")
    after = datetime.now(timezone.utc)

    (raw,) = raw_rows(store_url)
    assert raw["sop_instance_uid"] == "1.2.3" and raw["status"] == "sent"
    assert raw["study_instance_uid"] == "1.2" and raw["model_digest"] == "ab" * 32
    (row,) = store.query()
    assert row["probabilities"] == probabilities  # floats kept to the last bit
    assert row["calls"] == calls
    for key in ("received_at", "finished_at", "sent_at"):
        assert row[key].tzinfo is not None
        assert before - timedelta(seconds=1) <= row[key] <= after + timedelta(seconds=1)
    assert row["received_at"] <= row["finished_at"] <= row["sent_at"]
    # Stored as naive UTC: the raw value is the UTC wall time.
    stored = raw["received_at"]  # SQLite gives the text, PostgreSQL a datetime
    stored = datetime.fromisoformat(stored) if isinstance(stored, str) else stored
    assert stored == row["received_at"].replace(tzinfo=None)


def test_a_resent_instance_is_kept_once_but_a_refused_one_is_retried(store, store_url):
    assert store.admit("1.2.3")
    assert not store.admit("1.2.3")  # pending: the first copy is being worked on
    store.predicted("1.2.3", model_digest="d", probabilities={"A": 0.5}, calls={"A": True})
    store.sent("1.2.3")
    assert not store.admit("1.2.3")
    store.refuse("1.2.3", "a later copy was refused")  # must not undo the result
    assert [r["status"] for r in raw_rows(store_url)] == ["sent"]

    store.refuse("9.8.7", "view LL is not frontal")
    assert store.admit("9.8.7")  # corrected and sent again
    rows = {r["sop_instance_uid"]: r for r in raw_rows(store_url)}
    assert rows["9.8.7"]["status"] == "received" and rows["9.8.7"]["reason"] is None
    assert len(rows) == 2


def test_the_database_enforces_one_row_per_instance(store, store_url):
    store.admit("1.2.3")
    engine = sa.create_engine(store_url.replace("postgresql://", "postgresql+psycopg://"))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO results (sop_instance_uid, status, received_at, attempts) "
                "VALUES ('1.2.3', 'received', '2024-01-01 00:00:00', 0)"
            )
        )
    engine.dispose()


def test_refused_associations_are_rows_without_an_instance(store, store_url):
    store.refuse(None, "association from 'EVIL' refused", calling_ae="EVIL")
    store.refuse(None, "association from 'EVIL' refused", calling_ae="EVIL")
    rows = raw_rows(store_url)
    assert [(r["sop_instance_uid"], r["status"], r["calling_ae"]) for r in rows] == [
        (None, "refused", "EVIL")
    ] * 2
    assert store.query(status="refused")[0]["reason"] == "association from 'EVIL' refused"


def test_query_filters_by_time_status_and_limit(store):
    base = datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc)
    for n in range(5):
        store.admit(f"1.{n}", received_at=base + timedelta(hours=n))
    store.failed("1.4", "cannot decode")
    assert [r["sop_instance_uid"] for r in store.query()] == [f"1.{n}" for n in range(5)]
    since = store.query(since=base + timedelta(hours=2))
    assert [r["sop_instance_uid"] for r in since] == ["1.2", "1.3", "1.4"]
    # The same moment in another time zone selects the same rows.
    paris = timezone(timedelta(hours=1))
    assert store.query(since=(base + timedelta(hours=2)).astimezone(paris)) == since
    assert [r["sop_instance_uid"] for r in store.query(status="failed")] == ["1.4"]
    assert store.query(status="failed")[0]["reason"] == "cannot decode"
    assert [r["sop_instance_uid"] for r in store.query(limit=2)] == ["1.0", "1.1"]
    with pytest.raises(StoreError, match="unknown status"):
        store.query(status="lost")
    with pytest.raises(StoreError, match="limit"):
        store.query(limit=-1)


def test_pending_lists_what_a_restart_must_finish(store):
    for uid in ("1.1", "1.2", "1.3", "1.4"):
        store.admit(uid)
    store.predicted("1.2", model_digest="d", probabilities={}, calls={})
    store.predicted("1.3", model_digest="d", probabilities={}, calls={})
    store.sent("1.3")
    store.failed("1.4", "x")
    assert store.pending() == [
        {"sop_instance_uid": "1.1", "status": "received"},
        {"sop_instance_uid": "1.2", "status": "predicted"},
    ]


def test_failed_deliveries_are_counted(store):
    store.admit("1.1")
    store.predicted("1.1", model_digest="d", probabilities={}, calls={})
    assert store.attempt_failed("1.1", "unreachable") == 1
    assert store.attempt_failed("1.1", "still unreachable") == 2
    (row,) = store.query()
    assert (row["status"], row["attempts"], row["reason"]) == ("predicted", 2, "still unreachable")


def test_patient_references_are_salted_hashes_kept_across_reopening(store_url, tmp_path):
    with open_store(store_url) as first:
        ref = first.patient_ref("MRN-0042")
        assert ref == first.patient_ref("MRN-0042") != first.patient_ref("MRN-0043")
        assert "0042" not in ref and len(ref) == 32
        assert first.patient_ref(None) is None
    with open_store(store_url) as again:
        assert again.patient_ref("MRN-0042") == ref
    with open_store(str(tmp_path / "other.sqlite")) as other:
        assert other.patient_ref("MRN-0042") != ref  # another store, another salt


def test_threads_share_one_store(store, store_url):
    def admit(worker: int) -> None:
        for n in range(25):
            assert store.admit(f"2.{worker}.{n}")

    threads = [threading.Thread(target=admit, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(raw_rows(store_url)) == 200


def test_a_bad_url_is_one_clear_error(tmp_path):
    with pytest.raises(StoreError, match="not a usable database URL"):
        open_store("nosuchdb://x/y")
    with pytest.raises(StoreError, match="cannot open the results store"):
        open_store("postgresql://nobody:secret@127.0.0.1:1/none")


def test_cxr_results_reads_a_run_folder(tmp_path):
    run = tmp_path / "run"
    with open_store(str(run / "results.sqlite")) as store:
        old = datetime.now(timezone.utc) - timedelta(days=3)
        store.admit("1.1", received_at=old)
        store.admit("1.2")
        store.predicted("1.2", model_digest="d", probabilities={"Mass": 0.75}, calls={"Mass": True})
        store.refuse("1.3", "view LL is not frontal (PA or AP expected)")
    runner = CliRunner()
    result = runner.invoke(app, ["results", str(run), "--csv"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout), dtype={"sop_instance_uid": str})
    assert list(table["sop_instance_uid"]) == ["1.1", "1.2", "1.3"]
    assert list(table["status"]) == ["received", "predicted", "refused"]
    assert table.loc[1, "probabilities"] == '{"Mass": 0.75}'

    today = runner.invoke(app, ["results", str(run), "--since", "today", "--csv"])
    assert list(pd.read_csv(io.StringIO(today.stdout))["status"]) == [
        "predicted",
        "refused",
    ]
    refused = runner.invoke(app, ["results", str(run), "--status", "refused"])
    assert refused.exit_code == 0 and "1 row(s)" in refused.stdout
    assert "refused" in refused.stdout and "predicted" not in refused.stdout
    missing = runner.invoke(app, ["results", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no results store here" in missing.output
    assert not (tmp_path / "nothing").exists()


def test_racing_claims_of_one_uid_first_wins(store_url):
    """Stores opened separately (as two listeners would) claim one UID at the same moment,
    round after round: the database's unique constraint lets exactly one win."""
    from cxr.results.store import CLAIMED, HELD_ALREADY, OTHER_PATIENT

    stores = [open_store(store_url) for _ in range(4)]

    def claim(n: int, uid: str, barrier: threading.Barrier, answers: dict) -> None:
        barrier.wait(timeout=120)
        answers[n] = stores[n].claim(uid, patient_ref=f"patient-{n}")

    try:
        for round_ in range(10):
            uid, answers = f"3.{round_}", {}
            barrier = threading.Barrier(len(stores))
            threads = [
                threading.Thread(target=claim, args=(n, uid, barrier, answers))
                for n in range(len(stores))
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            winners = [n for n, answer in answers.items() if answer == CLAIMED]
            assert len(winners) == 1 and len(answers) == len(stores), answers
            assert sorted(answers.values()) == sorted([CLAIMED] + [OTHER_PATIENT] * 3)
            (row,) = [r for r in raw_rows(store_url) if r["sop_instance_uid"] == uid]
            assert row["patient_ref"] == f"patient-{winners[0]}"
            assert row["status"] == "receiving"
            stores[0].confirm(uid)
            assert stores[1].claim(uid, patient_ref=f"patient-{winners[0]}") == HELD_ALREADY
    finally:
        for opened in stores:
            opened.close()


def test_a_withdrawn_or_refused_uid_can_be_claimed_again(store, store_url):
    from cxr.results.store import BEING_RECEIVED, CLAIMED

    assert store.claim("4.1", patient_ref="p") == CLAIMED
    assert store.claim("4.1", patient_ref="p") == BEING_RECEIVED  # not yet spooled
    store.withdraw("4.1")
    assert raw_rows(store_url) == []
    store.refuse("4.2", "view LL is not frontal")
    assert store.claim("4.2", patient_ref="q") == CLAIMED  # corrected and sent again
    assert store.drop_claims() == 1  # what an ended listener left
    assert [r["sop_instance_uid"] for r in raw_rows(store_url)] == []
