"""``cxr dicom listen`` (the DICOM node next to a PACS) and ``cxr results`` (what it did)."""

from __future__ import annotations

import signal
import sys
import threading
from datetime import date, datetime, time, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from typer.core import TyperGroup

from cxr.cli.common import RESULTS, SERVE, app, console, friendly_errors, shown
from cxr.cli.options import DeviceOption
from cxr.errors import CxrError
from cxr.extras import import_extra, require

dicom_app = typer.Typer(help="The DICOM node: receive radiographs, answer with reports.")
app.add_typer(dicom_app, name="dicom", rich_help_panel=SERVE)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PATIENT_ID_HELP = "How the store keeps Patient ID: hash (salted SHA-256), keep, or drop."


# The options of `cxr dicom listen` that take more than a line to declare.
AllowAeOption = Annotated[
    list[str] | None,
    typer.Option(help="A calling AE title allowed to send (repeat; default: any)."),
]
OverlaysOption = Annotated[
    bool, typer.Option(help="Also send a Grad-CAM overlay per positive finding.")
]
SpoolOption = Annotated[
    Path | None, typer.Option(help="Spool folder (default: MODEL/dicom-spool).")
]
DbOption = Annotated[
    str | None,
    typer.Option(help="Results store: a database URL or SQLite file (MODEL/results.sqlite)."),
]
MaxWaitOption = Annotated[
    float, typer.Option(help="How long a batch waits to fill (milliseconds).")
]
QueueOption = Annotated[int, typer.Option(help="Images admitted but not yet predicted, at most.")]
MaxDatasetOption = Annotated[
    float,
    typer.Option(help="Largest incoming dataset (MB); a larger one is refused (0xA700)."),
]
ForwardAssociationsOption = Annotated[
    int, typer.Option(help="Concurrent associations sending reports to --forward.")
]
AnyCalledOption = Annotated[
    bool, typer.Option(help="Accept any called AE title (default: only --ae-title).")
]
MaxAssociationsOption = Annotated[int, typer.Option(help="Concurrent incoming associations.")]
FirstPduOption = Annotated[
    float,
    typer.Option(help="Seconds a new connection may take to request an association (ARTIM)."),
]
IdleOption = Annotated[
    float, typer.Option(help="Seconds an association may stay silent before it is aborted.")
]
MetricsPortOption = Annotated[
    int | None, typer.Option(help="Serve Prometheus /metrics on 127.0.0.1 at this port.")
]


@dicom_app.command("listen")
@friendly_errors
def listen(
    model: Annotated[Path, typer.Argument(help="Run folder, model bundle, or exported .onnx.")],
    forward: Annotated[str, typer.Option(help="Where the reports go: HOST:PORT:AET (the PACS).")],
    ae_title: Annotated[str, typer.Option(help="This node's AE title.")] = "CXR",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (1-65535).")] = 11112,
    allow_ae: AllowAeOption = None,
    overlays: OverlaysOption = False,
    spool: SpoolOption = None,
    db: DbOption = None,
    backend: Annotated[str, typer.Option(help="auto, torch or onnx.")] = "auto",
    device: DeviceOption = "auto",
    workers: Annotated[int, typer.Option(help="Decoding and reporting threads.")] = 4,
    max_batch: Annotated[int, typer.Option(help="Images per forward pass, at most.")] = 16,
    max_wait_ms: MaxWaitOption = 10.0,
    queue_size: QueueOption = 64,
    forward_associations: ForwardAssociationsOption = 4,
    max_megapixels: Annotated[float, typer.Option(help="Largest accepted image.")] = 40.0,
    patient_ids: Annotated[str, typer.Option(help=PATIENT_ID_HELP)] = "hash",
    accept_any_called_ae: AnyCalledOption = False,
    max_associations: MaxAssociationsOption = 32,
    first_pdu_timeout: FirstPduOption = 10.0,
    idle_timeout: IdleOption = 60.0,
    metrics_port: MetricsPortOption = None,
    max_dataset_mb: MaxDatasetOption = 64.0,
):
    """A DICOM Storage SCP: each CR/DX frontal radiograph received is spooled, acknowledged,
    predicted, and answered with a structured report sent to --forward. Runs until stopped
    (SIGTERM or Ctrl+C); a restart resumes what the spool holds."""
    require("dicom", "cxr dicom listen")
    from cxr.dicom.forward import Destination
    from cxr.dicom.listen import build_node, default_spool, default_store
    from cxr.dicom.node import NodeOptions

    _check_listen_options(port, ae_title, allow_ae or [], host)
    _check_counts(workers, max_batch, queue_size, forward_associations, max_associations)
    _check_timeouts(first_pdu_timeout, idle_timeout, metrics_port)
    if not 0 < max_dataset_mb < 2**40:  # also refuses nan and inf
        raise CxrError(f"--max-dataset-mb {max_dataset_mb}: expected a positive number of MB")
    options = NodeOptions(
        ae_title=ae_title,
        host=host,
        port=port,
        allowed_ae=tuple(allow_ae or ()),
        overlays=overlays,
        workers=workers,
        senders=forward_associations,
        queue_size=queue_size,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_pixels=int(max_megapixels * 1_000_000),
        patient_ids=patient_ids,
        accept_any_called_ae=accept_any_called_ae,
        max_associations=max_associations,
        first_pdu_timeout_s=first_pdu_timeout,
        idle_timeout_s=idle_timeout,
        max_dataset_mb=max_dataset_mb,
    )
    node = build_node(
        model, Destination.parse(forward), options, spool=spool, db=db, backend=backend,
        device=device, load_in_background=True,
    )  # fmt: skip
    _log_to_stderr()

    def announce(address):
        console.print(
            f"listening on {shown(host)}:{address[1]} as {shown(ae_title)}, forwarding to "
            f"{shown(forward)}; spool {shown(spool or default_spool(model))}, results "
            f"{shown(node.store.url if db else default_store(model))}; loading the model",
            highlight=False,
        )
        sys.stdout.flush()

    if metrics_port is not None:
        _serve_metrics(node, metrics_port)
    _run_until_stopped(node, announce)


def _run_until_stopped(node, announce) -> None:
    """Start ``node``, run until SIGTERM or Ctrl+C (or a model that cannot load), stop it
    and say what it did."""
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    node.start(on_listening=announce)
    while not stopped.wait(0.5) and node.load_error is None:
        pass
    node.stop()
    node.store.close()
    counts = node.counts
    console.print(
        f"stopped: {counts.received} received, {counts.refused} refused, {counts.sent} sent, "
        f"{counts.failed} failed",
        highlight=False,
    )
    if node.load_error is not None:
        raise CxrError(f"the model cannot be loaded: {node.load_error}")


def _serve_metrics(node, port: int) -> None:
    from cxr.dicom.metrics import serve_metrics

    try:
        served = serve_metrics(node, port)
    except OSError as exc:
        raise CxrError(f"--metrics-port {port}: cannot listen on 127.0.0.1 ({exc})") from None
    console.print(
        f"metrics on http://127.0.0.1:{served.server_address[1]}/metrics", highlight=False
    )


def _log_to_stderr() -> None:
    """The node's own messages (refusals, failures, retries) at INFO; its libraries' at
    WARNING (pynetdicom logs every association at INFO)."""
    import logging

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    logging.getLogger("cxr").setLevel(logging.INFO)
    from cxr.safety import mask_secrets_in_logs

    mask_secrets_in_logs()


def _check_counts(workers, max_batch, queue_size, forward_associations, associations) -> None:
    for option, value in [
        ("--workers", workers),
        ("--max-associations", associations),
        ("--max-batch", max_batch),
        ("--queue-size", queue_size),
        ("--forward-associations", forward_associations),
    ]:
        if value < 1:
            raise CxrError(f"{option} {value}: expected 1 or more")


def _check_timeouts(first_pdu, idle, metrics_port) -> None:
    for option, value in [("--first-pdu-timeout", first_pdu), ("--idle-timeout", idle)]:
        if not 0 < value <= 3600:
            raise CxrError(f"{option} {value}: expected more than 0 and at most 3600 seconds")
    if metrics_port is not None and not 0 <= metrics_port <= 65535:
        raise CxrError(f"--metrics-port {metrics_port}: expected 0 to 65535")


def _check_listen_options(port, ae_title, allowed, host) -> None:
    if not 1 <= port <= 65535:
        raise CxrError(f"--port {port}: expected 1 to 65535")
    for title in (ae_title, *allowed):
        if not title.strip() or len(title) > 16 or not title.isascii() or "\\" in title:
            raise CxrError(f"AE title {title!r}: expected 1 to 16 ASCII characters")
    if host not in LOOPBACK and not allowed:
        # An AE title is no password, but an open port that stores whatever arrives from
        # anywhere is worse: name the senders.
        raise CxrError(
            f"--host {host}: listening beyond loopback needs --allow-ae naming the senders"
        )


class _ShowByDefault(TyperGroup):
    """``cxr results SOURCE ...`` shows the results (the ``show`` command) as it always did;
    ``cxr results backup SOURCE DEST`` is the other command. A run folder that is literally
    called ``backup`` is named ``./backup``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["show", *args]
        return super().parse_args(ctx, args)


results_app = typer.Typer(
    cls=_ShowByDefault,
    help="The DICOM listener's results: show them (cxr results SOURCE), or back them up.",
)
app.add_typer(results_app, name="results", rich_help_panel=RESULTS)


@results_app.command("backup")
@friendly_errors
def results_backup(
    source: Annotated[str, typer.Argument(help="Run folder, SQLite file or sqlite:/// URL.")],
    destination: Annotated[Path, typer.Argument(help="The backup file to write (a new file).")],
):
    """A consistent copy of an SQLite results store, taken while the listener writes
    (SQLite's online backup; a plain file copy can miss what the write-ahead log holds).
    For PostgreSQL, use pg_dump."""
    import_extra("sqlalchemy", "dicom", "cxr results backup")
    from cxr.results import open_existing_store

    with open_existing_store(source) as store:
        written = store.backup(destination)
        rows = len(store.query())
    console.print(f"backed up {rows:,} row(s) to {shown(written)}", highlight=False)


@results_app.command("show")
@friendly_errors
def results(
    source: Annotated[
        str,
        typer.Argument(help="Run folder (its results.sqlite), an SQLite file, or a database URL."),
    ],
    since: Annotated[
        str | None,
        typer.Option(help="Received at or after: today, YYYY-MM-DD or an ISO date-time."),
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(help="Only this status: received, predicted, sent, refused or failed."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many rows.")] = None,
    csv: Annotated[bool, typer.Option("--csv", help="CSV on standard output.")] = False,
):
    """The DICOM listener's results: one row per instance received (oldest first)."""
    import_extra("sqlalchemy", "dicom", "cxr results")
    from cxr.results import open_existing_store, rows_table

    with open_existing_store(source) as store:
        rows = store.query(since=_parse_since(since), status=status, limit=limit)
    if csv:
        from cxr.safety import csv_text

        sys.stdout.write(csv_text(rows_table(rows)))
        return
    console.print(_results_table(rows))
    console.print(f"{len(rows):,} row(s)", highlight=False)


def _parse_since(text: str | None) -> datetime | None:
    if text is None:
        return None
    if text == "today":
        return datetime.combine(date.today(), time()).astimezone()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CxrError(
            f"--since {text!r}: expected today, YYYY-MM-DD or an ISO date-time"
        ) from None
    try:
        moment = moment if moment.tzinfo else moment.astimezone()
        moment.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise CxrError(f"--since {text!r}: out of range") from None
    return moment


def _results_table(rows) -> Table:
    table = Table(title="results")
    for column in ("received (UTC)", "SOP Instance UID", "status", "positive calls", "reason"):
        table.add_column(column, overflow="fold")
    for row in rows:
        calls = row["calls"] or {}
        probabilities = row["probabilities"] or {}
        positive = ", ".join(f"{k} ({probabilities.get(k, 0):.2f})" for k, v in calls.items() if v)
        table.add_row(
            row["received_at"].astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            shown(row["sop_instance_uid"] or f"(association from {row['calling_ae']})"),
            row["status"],
            shown(positive or ("none" if calls else "")),
            shown(row["reason"] or ""),
        )
    return table
