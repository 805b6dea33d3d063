"""``GET /v1/results``: the DICOM listener's results store (:mod:`cxr.results`), read-only.

``cxr serve --results-db`` names the store as ``cxr results`` does: a run folder (its
``results.sqlite``), an SQLite file, or a database URL. A file that is not there is an error
when the service starts: reading must never create an empty store in its place.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, HTTPException, Query

from cxr.serve.problems import InvalidField, error_responses
from cxr.serve.schemas import ResultsPage

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# ISO 8601 with time zone and fractions fits well within this; longer is not a time.
MAX_SINCE_CHARS = 40
log = logging.getLogger("cxr.serve")


def open_results(location: str):
    """The :class:`~cxr.results.ResultsStore` at ``location`` (see the module's description);
    :class:`ConfigError` when a path holds no store."""
    from cxr.results import open_existing_store

    return open_existing_store(location)


def add_results_route(app: FastAPI, store, keyed: tuple[int, ...] = ()) -> None:
    """``GET /v1/results`` over ``store`` (``None``: the route answers 404 and says why);
    ``keyed``: (401,) when the service has an API key."""
    from cxr.results import STATUSES, StoreError

    @app.get(
        "/v1/results",
        response_model=ResultsPage,
        responses=error_responses(*keyed, 404, 422, 500, 503),
    )
    def results(
        since: str = Query(  # not str | None: a query value is never null
            None,
            description="ISO 8601 date or time (e.g. 2026-11-27 or 2026-11-27T08:00:00+01:00; "
            "without a zone: the server's): rows received from then.",
            json_schema_extra={"maxLength": MAX_SINCE_CHARS},
        ),
        status: str = Query(
            None,
            description=f"Only rows with this status: {', '.join(STATUSES)}.",
            json_schema_extra={"enum": list(STATUSES)},
        ),
        limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="Most rows returned."),
    ) -> dict[str, Any]:
        """The listener's results, one row per DICOM instance, oldest first."""
        if store is None:
            raise HTTPException(404, "no results store: start cxr serve with --results-db")
        if status is not None and status not in STATUSES:
            choices = f"choose one of {', '.join(STATUSES)}"
            raise InvalidField("status", "query", f"status: {choices}", choices)
        try:
            rows = store.query(since=_since(since), status=status, limit=limit)
        except StoreError as exc:
            log.error("results store: %s", exc)
            raise HTTPException(
                503, "the results store cannot be read now; try again later",
                headers={"Retry-After": "5"},
            ) from None  # fmt: skip
        return {"count": len(rows), "limit": limit, "results": rows}


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        if len(text) > MAX_SINCE_CHARS:
            raise ValueError
        moment = datetime.fromisoformat(text.strip())
        if moment.tzinfo is None:
            moment = moment.astimezone()
        moment.astimezone(timezone.utc)  # 0001-01-01T00:00+14:00 has no UTC time
        return moment
    except OverflowError:
        raise InvalidField("since", "query", f"since: {text[:40]!r} is out of range") from None
    except ValueError:
        raise InvalidField(
            "since",
            "query",
            "since: not an ISO 8601 time (e.g. 2026-11-27 or 2026-11-27T08:00:00+01:00)",
            "not an ISO 8601 time",
        ) from None
