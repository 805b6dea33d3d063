"""A results store holding three instances (sent, refused, received), for the tests of
``GET /v1/results``: rows of every status, on two days."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from cxr.results import open_store

DAY = datetime(2026, 11, 27, 8, 0, tzinfo=timezone.utc)


def write_three_instances(path: str) -> None:
    """1.2.3.1 predicted and sent, 1.2.3.2 refused (a lateral view) on ``DAY``; 1.2.3.3
    received 30 hours later."""
    store = open_store(path)
    try:
        store.admit("1.2.3.1", received_at=DAY, study_instance_uid="1.2.3", calling_ae="PACS")
        store.predicted(
            "1.2.3.1",
            model_digest="ab" * 32,
            probabilities={"Effusion": 0.75, "Mass": 0.125},
            calls={"Effusion": True, "Mass": False},
        )
        store.sent("1.2.3.1")
        store.refuse(
            "1.2.3.2", "lateral view (ViewPosition LL)", received_at=DAY, calling_ae="PACS"
        )
        store.admit("1.2.3.3", received_at=DAY + timedelta(hours=30), calling_ae="PACS")
    finally:
        store.close()
