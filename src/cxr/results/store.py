"""The results store: one row per received DICOM instance, in SQLite (the default, a file in
the run folder) or PostgreSQL (a database URL), through SQLAlchemy Core.

A row goes ``receiving`` (its SOP Instance UID claimed, the image being spooled) ->
``received`` (spooled and acknowledged) -> ``predicted`` (probabilities stored,
the structured report written to the spool) -> ``sent`` (the destination acknowledged it);
or ends ``refused`` (the instance failed a check; nothing was spooled) or ``failed``
(accepted, but it could not be decoded or its report could not be delivered). The row's
status and the spool's files together are what a restarted listener resumes from.

Times are stored as naive UTC (SQLite has no time zones) and returned as aware UTC.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from cxr.errors import CxrError
from cxr.extras import require
from cxr.safety import masked

STATUSES = ("receiving", "received", "predicted", "sent", "refused", "failed")
PENDING = ("received", "predicted")
HELD = ("receiving", *PENDING, "sent")  # an instance this store has (or is taking) in hand
# What claim() says of a SOP Instance UID.
CLAIMED = "claimed"  # this copy is the one: spool it, then confirm()
HELD_ALREADY = "held"  # the same patient's image is already held: a resend
BEING_RECEIVED = "busy"  # the same patient's image is being spooled on another association
OTHER_PATIENT = "other patient"  # the UID is held for another patient: first write wins
# A PostgreSQL URL without a driver means psycopg 3 here (SQLAlchemy's default is psycopg2,
# which cxr does not depend on).
_POSTGRES_PREFIXES = ("postgresql://", "postgres://")

_metadata = sa.MetaData()
results = sa.Table(
    "results",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # NULL for a refused association (no instance was ever read); unique otherwise.
    sa.Column("sop_instance_uid", sa.String(64), unique=True, nullable=True),
    sa.Column("study_instance_uid", sa.String(64)),
    sa.Column("sop_class_uid", sa.String(64)),
    sa.Column("patient_ref", sa.String(128)),
    sa.Column("calling_ae", sa.String(16)),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("reason", sa.Text),
    sa.Column("received_at", sa.DateTime, nullable=False, index=True),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("sent_at", sa.DateTime),
    sa.Column("model_digest", sa.String(64)),
    sa.Column("probabilities", sa.JSON),
    sa.Column("calls", sa.JSON),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
)
# The salt of the patient-reference hash: one per store, made when the store is created, so
# that a reference cannot be looked up in a table of hashed patient IDs made elsewhere.
settings = sa.Table(
    "settings",
    _metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
COLUMNS = [column.name for column in results.columns if column.name != "id"]


class StoreError(CxrError):
    """The results store cannot be opened, read or written."""


class ResultsStore:
    """Read and write the results table. Thread-safe: a server's threads may share one."""

    def __init__(self, engine: sa.Engine, *, create: bool = True):
        """``create=False`` opens an existing store for reading: nothing is created, and a
        database without the results table is refused."""
        self.engine = engine
        self.url = engine.url.render_as_string(hide_password=True)
        # SQLite allows one writer at a time; serialising here avoids 'database is locked'
        # between our own threads (another process still waits on the busy timeout).
        self._lock = threading.Lock()
        try:
            if create:
                _metadata.create_all(engine)
                self._salt = self._ensure_salt()
            elif not sa.inspect(engine).has_table(results.name):
                raise StoreError(f"{self.url}: holds no cxr results table (a mistyped URL?)")
        except SQLAlchemyError as exc:
            raise StoreError(f"{self.url}: cannot open the results store ({_short(exc)})") from None

    # ------------------------------------------------------------------ writing

    def admit(self, sop_instance_uid: str, *, received_at: datetime | None = None, **values):
        """Record an accepted instance as ``received``; returns False (and changes nothing)
        when the instance is already recorded as pending or sent, i.e. a resend of an image
        this store already holds. A refused or failed earlier attempt is replaced."""
        row = {
            "sop_instance_uid": sop_instance_uid,
            "status": "received",
            "received_at": _naive_utc(received_at),
            "reason": None,
            "attempts": 0,
            **values,
        }
        with self._write() as connection:
            existing = connection.execute(
                sa.select(results.c.status).where(results.c.sop_instance_uid == sop_instance_uid)
            ).scalar_one_or_none()
            if existing in HELD:
                return False
            if existing is not None:
                connection.execute(
                    results.update()
                    .where(results.c.sop_instance_uid == sop_instance_uid)
                    .values(**_cleared(row))
                )
            else:
                connection.execute(results.insert().values(**row))
        return True

    def claim(
        self,
        sop_instance_uid: str,
        *,
        patient_ref: str | None,
        received_at: datetime | None = None,
        **values,
    ) -> str:
        """Take ``sop_instance_uid`` for this copy before anything is spooled under its name:
        the unique constraint decides between racing senders (threads or processes, SQLite
        or PostgreSQL), so the first wins. Returns :data:`CLAIMED` (the row is now
        ``receiving``), :data:`HELD_ALREADY` or :data:`BEING_RECEIVED` (the same
        ``patient_ref`` holds it) or :data:`OTHER_PATIENT`. A refused or failed earlier
        attempt is replaced."""
        row = {
            "sop_instance_uid": sop_instance_uid,
            "status": "receiving",
            "received_at": _naive_utc(received_at),
            "patient_ref": patient_ref,
            "reason": None,
            "attempts": 0,
            **values,
        }
        for _ in range(3):  # a row replaced or withdrawn between the two steps: look again
            if self._insert_new(row):
                return CLAIMED
            with self._write() as connection:
                existing = connection.execute(
                    sa.select(results.c.status, results.c.patient_ref).where(
                        results.c.sop_instance_uid == sop_instance_uid
                    )
                ).one_or_none()
                if existing is None:
                    continue
                if existing.status not in HELD:
                    replaced = connection.execute(
                        results.update()
                        .where(results.c.sop_instance_uid == sop_instance_uid)
                        .where(results.c.status == existing.status)
                        .values(**_cleared(row))
                    )
                    if replaced.rowcount == 1:
                        return CLAIMED
                    continue
                if existing.patient_ref != patient_ref:
                    return OTHER_PATIENT
                return BEING_RECEIVED if existing.status == "receiving" else HELD_ALREADY
        raise StoreError(f"{self.url}: {sop_instance_uid} keeps changing; cannot claim it")

    def confirm(self, sop_instance_uid: str) -> None:
        """The claimed instance is spooled: ``receiving`` becomes ``received``."""
        self._update_if(sop_instance_uid, "receiving", status="received")

    def withdraw(self, sop_instance_uid: str) -> None:
        """Give up a claim whose spooling failed (nothing was acknowledged)."""
        with self._write() as connection:
            connection.execute(
                results.delete()
                .where(results.c.sop_instance_uid == sop_instance_uid)
                .where(results.c.status == "receiving")
            )

    def drop_claims(self) -> int:
        """Forget the claims an ended listener left (never acknowledged); returns how many.
        Only for a store no other listener is writing to."""
        with self._write() as connection:
            return connection.execute(
                results.delete().where(results.c.status == "receiving")
            ).rowcount

    def refuse(
        self,
        sop_instance_uid: str | None,
        reason: str,
        *,
        received_at: datetime | None = None,
        **values,
    ) -> None:
        """Record a refusal. An instance already stored as pending or sent keeps its row (a
        resend refused for another reason must not undo a result)."""
        row = {
            "sop_instance_uid": sop_instance_uid,
            "status": "refused",
            "reason": reason,
            "received_at": _naive_utc(received_at),
            **values,
        }
        with self._write() as connection:
            if sop_instance_uid is None:
                connection.execute(results.insert().values(**row))
                return
            existing = connection.execute(
                sa.select(results.c.status).where(results.c.sop_instance_uid == sop_instance_uid)
            ).scalar_one_or_none()
            if existing is None:
                connection.execute(results.insert().values(**row))
            elif existing not in HELD:
                connection.execute(
                    results.update()
                    .where(results.c.sop_instance_uid == sop_instance_uid)
                    .values(**_cleared(row))
                )

    def predicted(
        self,
        sop_instance_uid: str,
        *,
        model_digest: str,
        probabilities: dict[str, float],
        calls: dict[str, bool],
    ) -> None:
        self._update(
            sop_instance_uid,
            status="predicted",
            finished_at=_naive_utc(None),
            model_digest=model_digest,
            probabilities=probabilities,
            calls=calls,
        )

    def sent(self, sop_instance_uid: str) -> None:
        self._update(sop_instance_uid, status="sent", sent_at=_naive_utc(None), reason=None)

    def failed(self, sop_instance_uid: str, reason: str) -> None:
        self._update(sop_instance_uid, status="failed", reason=reason)

    def attempt_failed(self, sop_instance_uid: str, reason: str) -> int:
        """Count a failed delivery (the row stays pending); returns the attempts so far."""
        with self._write() as connection:
            connection.execute(
                results.update()
                .where(results.c.sop_instance_uid == sop_instance_uid)
                .values(attempts=results.c.attempts + 1, reason=reason)
            )
            return int(
                connection.execute(
                    sa.select(results.c.attempts).where(
                        results.c.sop_instance_uid == sop_instance_uid
                    )
                ).scalar_one()
            )

    def patient_ref(self, patient_id: str | None) -> str | None:
        """A salted SHA-256 of the patient ID (16 bytes, hex): the same patient gets the same
        reference in this store, and the ID cannot be read back from it."""
        if not patient_id:
            return None
        return hashlib.sha256(self._salt + patient_id.encode("utf-8")).hexdigest()[:32]

    # ------------------------------------------------------------------ reading

    def query(
        self,
        *,
        since: datetime | None = None,
        status: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Rows received at or after ``since`` (oldest first), of one ``status``, at most
        ``limit``; each a dict of :data:`COLUMNS` with aware UTC times."""
        if status is not None and status not in STATUSES:
            raise StoreError(f"unknown status {status!r}; choose from {', '.join(STATUSES)}")
        if limit is not None and limit < 0:
            raise StoreError(f"limit must be 0 or more (got {limit})")
        statement = sa.select(*[results.c[name] for name in COLUMNS]).order_by(
            results.c.received_at, results.c.id
        )
        if since is not None:
            statement = statement.where(results.c.received_at >= _naive_utc(since))
        if status is not None:
            statement = statement.where(results.c.status == status)
        if limit is not None:
            statement = statement.limit(limit)
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(statement).mappings().all()
        except SQLAlchemyError as exc:
            raise StoreError(f"{self.url}: cannot read results ({_short(exc)})") from None
        return [_row_dict(row) for row in rows]

    def pending(self) -> list[dict[str, Any]]:
        """Rows a restarted listener must finish: received or predicted, oldest first."""
        statement = (
            sa.select(results.c.sop_instance_uid, results.c.status)
            .where(results.c.status.in_(PENDING))
            .order_by(results.c.received_at, results.c.id)
        )
        try:
            with self.engine.connect() as connection:
                return [dict(row) for row in connection.execute(statement).mappings()]
        except SQLAlchemyError as exc:
            raise StoreError(f"{self.url}: cannot read results ({_short(exc)})") from None

    def status_of(self, sop_instance_uid: str) -> str | None:
        try:
            with self.engine.connect() as connection:
                return connection.execute(
                    sa.select(results.c.status).where(
                        results.c.sop_instance_uid == sop_instance_uid
                    )
                ).scalar_one_or_none()
        except SQLAlchemyError as exc:
            raise StoreError(f"{self.url}: cannot read results ({_short(exc)})") from None

    def close(self) -> None:
        """Fold the write-ahead log into the database file (SQLite), so that a plain copy of
        the file holds every row; then release the connections."""
        if self.engine.url.get_backend_name() == "sqlite":
            try:
                with self.engine.connect() as connection:
                    connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            except SQLAlchemyError:
                pass  # another process holds it: the log stays, and SQLite reads it
        self.engine.dispose()

    def backup(self, destination: str | os.PathLike) -> Path:
        """A consistent copy of an SQLite store at ``destination`` (a new file), taken with
        SQLite's online backup API while writers go on. PostgreSQL has pg_dump for this."""
        target = Path(destination)
        if self.engine.url.get_backend_name() != "sqlite":
            raise StoreError(f"{self.url}: back up a PostgreSQL store with pg_dump")
        if target.exists():
            raise StoreError(f"{target}: already exists; a backup never replaces a file")
        if not target.parent.is_dir():
            raise StoreError(f"{target.parent}: no such folder for the backup")
        import sqlite3

        partial = target.with_name(f".{target.name}.partial")
        source = self.engine.raw_connection()
        try:
            with sqlite3.connect(partial) as copy:
                source.driver_connection.backup(copy)
            copy.close()
            os.replace(partial, target)
        except (sqlite3.Error, OSError) as exc:
            partial.unlink(missing_ok=True)
            raise StoreError(f"{target}: backup failed ({exc})") from None
        finally:
            source.close()
        return target

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _write(self):
        return _Transaction(self)

    def _update(self, sop_instance_uid: str, **values) -> None:
        with self._write() as connection:
            connection.execute(
                results.update()
                .where(results.c.sop_instance_uid == sop_instance_uid)
                .values(**values)
            )

    def _insert_new(self, row: dict[str, Any]) -> bool:
        """Insert ``row``; False when its SOP Instance UID is already there. A transaction of
        its own: a failed INSERT ends a PostgreSQL transaction."""
        with self._lock:
            try:
                with self.engine.begin() as connection:
                    connection.execute(results.insert().values(**row))
                return True
            except IntegrityError:
                return False
            except SQLAlchemyError as exc:
                raise StoreError(f"{self.url}: cannot write results ({_short(exc)})") from None

    def _update_if(self, sop_instance_uid: str, current: str, **values) -> None:
        with self._write() as connection:
            connection.execute(
                results.update()
                .where(results.c.sop_instance_uid == sop_instance_uid)
                .where(results.c.status == current)
                .values(**values)
            )

    def _ensure_salt(self) -> bytes:
        select = sa.select(settings.c.value).where(settings.c.key == "patient_salt")
        with self.engine.connect() as connection:
            salt = connection.execute(select).scalar_one_or_none()
        if salt is None:
            try:
                with self.engine.begin() as connection:
                    salt = secrets.token_hex(16)
                    connection.execute(settings.insert().values(key="patient_salt", value=salt))
            except IntegrityError:  # another process created it first: use that one
                with self.engine.connect() as connection:
                    salt = connection.execute(select).scalar_one()
        return bytes.fromhex(salt)


class _Transaction:
    """One write transaction under the store's lock; database errors become StoreError."""

    def __init__(self, store: ResultsStore):
        self.store = store

    def __enter__(self) -> sa.Connection:
        self.store._lock.acquire()
        try:
            self.context = self.store.engine.begin()
            return self.context.__enter__()
        except BaseException:
            self.store._lock.release()
            raise

    def __exit__(self, kind, exc, traceback) -> bool:
        try:
            self.context.__exit__(kind, exc, traceback)
        except SQLAlchemyError as error:
            raise StoreError(f"{self.store.url}: cannot write results ({_short(error)})") from None
        finally:
            self.store._lock.release()
        if isinstance(exc, SQLAlchemyError):
            raise StoreError(f"{self.store.url}: cannot write results ({_short(exc)})") from None
        return False


def open_store(
    url_or_path: str, *, create: bool = True, busy_timeout_s: float = 30.0
) -> ResultsStore:
    """A store at a database URL (``sqlite:///...``, ``postgresql://user@host:port/db``) or
    at an SQLite file path (created with its folder if missing, unless ``create=False``: a
    reader's store must already be there). ``busy_timeout_s``: how long an SQLite write
    waits for another process's lock before it fails with StoreError."""
    text = str(url_or_path)
    if "://" not in text:
        path = Path(text)
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        text = f"sqlite:///{path}"
    for prefix in _POSTGRES_PREFIXES:
        if text.startswith(prefix):
            text = "postgresql+psycopg://" + text[len(prefix) :]
    if text.startswith("postgres"):
        require("postgres", "a PostgreSQL results store")
    try:
        url = _with_password(sa.make_url(text))
        if url.get_backend_name() == "sqlite":
            engine = sa.create_engine(
                url, connect_args={"check_same_thread": False, "timeout": busy_timeout_s}
            )
            sa.event.listen(engine, "connect", _sqlite_durable)
        else:
            engine = sa.create_engine(url, pool_pre_ping=True)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise StoreError(f"{_hidden(text)}: not a usable database URL ({_short(exc)})") from None
    return ResultsStore(engine, create=create)


PASSWORD_ENV = "CXR_DB_PASSWORD"
PASSWORD_FILE_ENV = "CXR_DB_PASSWORD_FILE"


def _with_password(url: sa.URL) -> sa.URL:
    """A URL without a password takes it from ``$CXR_DB_PASSWORD`` or from the file named
    by ``$CXR_DB_PASSWORD_FILE`` (a container secret), so that it need not sit on a command
    line or in a shell history."""
    if url.password or url.get_backend_name() == "sqlite":
        return url
    if os.environ.get(PASSWORD_FILE_ENV):
        path = Path(os.environ[PASSWORD_FILE_ENV])
        try:
            return url.set(password=path.read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(
                f"{path} (${PASSWORD_FILE_ENV}): cannot read the password ({exc})"
            ) from None
    if os.environ.get(PASSWORD_ENV):
        return url.set(password=os.environ[PASSWORD_ENV])
    return url


def _sqlite_durable(connection, _record) -> None:
    # WAL lets `cxr results` read while the listener writes; synchronous=FULL makes a
    # committed row survive a power cut, not only a killed process.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _naive_utc(moment: datetime | None) -> datetime:
    moment = moment or datetime.now(timezone.utc)
    if moment.tzinfo is None:  # a naive time is taken as local time, as datetime does
        moment = moment.astimezone()
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


def _aware(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.replace(tzinfo=timezone.utc)


def _row_dict(row) -> dict[str, Any]:
    values = dict(row)
    for key in ("received_at", "finished_at", "sent_at"):
        values[key] = _aware(values[key])
    return values


def _cleared(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` plus every other result column emptied: a retried instance starts afresh."""
    empty = dict.fromkeys(
        ("finished_at", "sent_at", "model_digest", "probabilities", "calls", "reason")
    )
    return {**empty, "attempts": 0, **row}


def _short(exc: BaseException, limit: int = 200) -> str:
    """The first line of a driver's error, passwords masked (drivers may quote the URL or
    the connection string)."""
    text = masked(str(exc).splitlines()[0]) if str(exc) else exc.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hidden(url: str) -> str:
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database URL>"


def rows_table(rows: Sequence[dict[str, Any]]):
    """The rows as a pandas table (JSON columns as JSON text), for CSV output."""
    import json

    import pandas as pd

    frame = pd.DataFrame(list(rows), columns=COLUMNS)
    for key in ("probabilities", "calls"):
        frame[key] = [None if v is None else json.dumps(v, sort_keys=False) for v in frame[key]]
    for key in ("received_at", "finished_at", "sent_at"):
        # pandas turns a column of times into datetime64, its blanks into NaT: an empty cell
        frame[key] = [None if pd.isna(v) else v.isoformat() for v in frame[key]]
    return frame
