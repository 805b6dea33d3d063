"""``cxr predict``, ``cxr export`` and ``cxr serve``: using a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cxr.cli.common import (
    PREDICT,
    SERVE,
    app,
    console,
    err_console,
    friendly_errors,
    printable,
    progress_task,
    shown,
    warn,
)
from cxr.cli.options import BatchSizeOption, DeviceOption
from cxr.errors import ConfigError, CxrError
from cxr.extras import require

# The library modules behind these commands import torch (and captum, onnxruntime, FastAPI,
# matplotlib); each command imports them when it runs, so that `cxr --help` and the `cxr data`
# commands start in a fraction of a second instead of several seconds.

EXIT_SOME_FAILED = 1
# Skipped entries named one warning line each, then counted: a folder of 10,000 broken links
# must not bury the predictions.
SKIPPED_SHOWN = 20


@app.command("predict", rich_help_panel=PREDICT)
@friendly_errors
def predict(
    model: Annotated[Path, typer.Argument(help="Run folder, model bundle, or exported .onnx.")],
    paths: Annotated[
        list[Path], typer.Argument(help="Image files or folders (searched recursively).")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the results to FILE.csv or FILE.json.")
    ] = None,
    explain: Annotated[
        Path | None, typer.Option("--explain", help="Write Grad-CAM overlays into this folder.")
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help="auto (onnx on CPU where cxr[onnx] is installed, else torch), torch or onnx."
        ),
    ] = "auto",
    device: DeviceOption = "auto",
    batch_size: BatchSizeOption = 16,
    workers: Annotated[
        int | None, typer.Option(help="Decoding processes (default: half the cores, max 4).")
    ] = None,
):
    """Probabilities and positive/negative calls for PNG, JPEG and DICOM files.

    Unreadable files are reported and skipped; the exit status is 1 when any failed. A path
    given that is not a file or folder (a named pipe, a socket, a device) counts as failed;
    a named pipe, socket, broken link or symbolic-link loop found inside a folder is named in
    a warning and does not change the exit status.
    """
    from cxr.outputs import output_file

    out = out if out is None else output_file(out, suffixes=(".csv", ".json"))
    from cxr.api.models import load_model
    from cxr.model.bundle import resolve_bundle

    loaded = load_model(model, backend=backend, device=device)
    predictor = loaded.predictor
    _print_about(loaded.about)
    if predictor.ood is None and Path(model).suffix.lower() != ".onnx":
        from cxr.engine.inference import missing_ood_note

        note = missing_ood_note(resolve_bundle(model)[0].parent, predictor.meta)
        if note:
            warn(note)
    with progress_task("predicting", status=predictor.backend) as task:

        def found(images) -> None:
            for error in images.errors:
                _report(error, task.console)
            _warn_skipped(images.skipped)
            if not images.files:
                raise CxrError("no PNG, JPEG or DICOM files to predict")
            task.update(0, len(images.files))

        result = loaded.predictions(
            paths, batch_size=batch_size, workers=workers, explain_dir=explain,
            on_error="keep", on_found=found, on_progress=task.advance,
            on_file_error=lambda error: _report(error, task.console),
        )  # fmt: skip
    if out is not None:
        result.write(out)
        console.print(f"wrote {len(result.files):,} prediction(s) to {shown(out)}", highlight=False)
    else:
        console.print(_summary_table(result))
    if explain is not None:
        count = sum(len(v) for v in result.overlays.values())
        console.print(f"wrote {count:,} Grad-CAM overlay(s) to {shown(explain)}", highlight=False)
    if result.errors:
        err_console.print(
            f"[bold red]{len(result.errors):,} file(s) failed[/], {len(result.files):,} predicted",
            highlight=False,
        )
        raise typer.Exit(EXIT_SOME_FAILED)


def _print_about(about: dict) -> None:
    """What the model is, once, before its answers."""
    synthetic = "[bold red]SYNTHETIC-data model:[/] " if about.get("synthetic") else ""
    console.print(
        f"{synthetic}model trained on {escape(printable(about['trained_on']))}. "
        f"{escape(printable(about['intended_use']))}",
        highlight=False,
        soft_wrap=True,
    )


def _report(error, target=None) -> None:
    (target or err_console).print(
        f"[bold red]error:[/] {shown(error)}", highlight=False, soft_wrap=True
    )


def _warn_skipped(skipped) -> None:
    for entry in skipped[:SKIPPED_SHOWN]:
        warn(f"skipped {entry}")
    if len(skipped) > SKIPPED_SHOWN:
        warn(f"skipped {len(skipped) - SKIPPED_SHOWN:,} more entries that are not image files")


def _summary_table(result) -> Table:
    records = list(result.records())
    synthetic = result.about.get("synthetic")
    table = Table(title="predictions" + (" of a SYNTHETIC-data model" if synthetic else ""))
    # A file name is what a user searches the table for: the column takes the longest name
    # (up to 100 characters) and the calls wrap instead; a longer name folds, never an ellipsis.
    names = [printable(r["file"]) for r in records]
    longest = max(map(len, names), default=4)
    table.add_column("file", overflow="fold", min_width=min(longest, 100))
    table.add_column("positive calls (probability)")
    table.add_column("highest", no_wrap=True)
    if result.ood is not None:
        table.add_column("unlike training data?", no_wrap=True)
    for name, record in zip(names, records):
        probabilities = record["probabilities"]
        positive = ", ".join(f"{n} ({probabilities[n]:.2f})" for n in record["positive"])
        top = max(probabilities, key=probabilities.get)
        cells = [escape(name), positive or "none", f"{top} {probabilities[top]:.2f}"]
        if result.ood is not None:
            ood = record["ood"]
            flag = "[bold red]FLAGGED[/]" if ood["flagged"] else "no"
            cells.append(f"{flag} (percentile {ood['percentile']:.1f})")
        table.add_row(*cells)
    return table


@app.command("export", rich_help_panel=PREDICT)
@friendly_errors
def export(
    model: Annotated[Path, typer.Argument(help="Run folder or model bundle.")],
    onnx: Annotated[Path, typer.Option("--onnx", help="ONNX file to write (dynamic batch).")],
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Compare with PyTorch on onnxruntime.")
    ] = True,
):
    """Export the model to ONNX (input `image` [N,3,S,S] -> `logits` [N,14])."""
    require("onnx", "cxr export")
    from cxr.outputs import output_file

    onnx = output_file(onnx, default_name="model.onnx", option="--onnx")
    from cxr.model.onnx import export_onnx

    result = export_onnx(model, onnx, check=check)
    agreement = (
        f"; onnxruntime agrees with PyTorch (max probability difference "
        f"{result['max_prob_diff']:.1e})"
        if "max_prob_diff" in result
        else ""
    )
    console.print(
        f"wrote {shown(onnx)} ({result['bytes'] / 1e6:.1f} MB, opset {result['opset']}){agreement}",
        highlight=False,
    )


MaxBatchOption = Annotated[
    int, typer.Option(help="Most images the batched worker gives the model in one call.")
]
MaxWaitOption = Annotated[
    float,
    typer.Option(help="Milliseconds a lone image waits for others to fill its batch."),
]
MaxQueueOption = Annotated[
    int | None,
    typer.Option(
        help="Images that may wait for the model; beyond, 503 (default: 4 batches, >= 64)."
    ),
]
ApiKeyFileOption = Annotated[
    Path | None,
    typer.Option(
        help="File holding the API key every endpoint but /healthz requires "
        "(Authorization: Bearer KEY, X-API-Key: KEY, or a browser's login dialog)."
    ),
]
InsecureOption = Annotated[
    bool, typer.Option("--insecure", help="Allow listening beyond loopback without an API key.")
]
DecodeMemoryOption = Annotated[
    float | None,
    typer.Option(
        help="Memory one decode may use, enforced per worker (default: 40 bytes per "
        "allowed pixel + twice the upload limit + 64 MiB: 1654 MiB at the defaults)."
    ),
]
ResultsDbOption = Annotated[
    str | None,
    typer.Option(
        help="Results store of cxr dicom listen for GET /v1/results: a run folder (its "
        "results.sqlite), an SQLite file or a database URL."
    ),
]
LOOPBACK_NAMES = ("localhost",)


@app.command("serve", rich_help_panel=SERVE)
@friendly_errors
def serve(
    model: Annotated[Path, typer.Argument(help="Run folder or model bundle.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (1-65535).")] = 8000,
    backend: Annotated[str, typer.Option(help="auto, torch or onnx.")] = "auto",
    device: DeviceOption = "auto",
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload.")] = 32.0,
    max_megapixels: Annotated[float, typer.Option(help="Largest accepted image.")] = 40.0,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds before a request is answered 503 (0: no limit).")
    ] = 60.0,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds a client may take to send a request's headers.")
    ] = 10.0,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds a request body may stall between two parts (408).")
    ] = 10.0,
    decode_workers: Annotated[
        int, typer.Option(help="Decoding processes (each decodes one upload at a time).")
    ] = 2,
    decode_memory_mb: DecodeMemoryOption = None,
    max_batch: MaxBatchOption = 16,
    max_wait_ms: MaxWaitOption = 5.0,
    max_queue: MaxQueueOption = None,
    api_key_file: ApiKeyFileOption = None,
    insecure: InsecureOption = False,
    results_db: ResultsDbOption = None,
):
    """HTTP service: POST /v1/predict, POST /v1/explain, GET /healthz, GET /metrics,
    GET /v1/results, /docs, and a page at /."""
    require("serve", "cxr serve")
    from cxr.serve.app import create_app
    from cxr.serve.batching import check_settings
    from cxr.serve.server import check_port, run_server

    # Every option is checked before the model is loaded (create_app checks the device first).
    check_port(port, "--port")
    _check_limits(
        max_upload_mb, max_megapixels, request_timeout, header_timeout, body_timeout,
        decode_workers, decode_memory_mb,
    )  # fmt: skip
    check_settings(max_batch, max_wait_ms, max_queue, options=True)
    api_key = _api_key(api_key_file, host, insecure)
    application = create_app(
        model,
        backend=backend,
        device=device,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_pixels=int(max_megapixels * 1_000_000),
        request_timeout_s=request_timeout or None,
        header_timeout_s=header_timeout,
        body_timeout_s=body_timeout,
        decode_workers=decode_workers,
        decode_memory_bytes=None if decode_memory_mb is None else int(decode_memory_mb * 2**20),
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        api_key=api_key,
        results_db=results_db,
    )
    console.print(
        f"serving on http://{shown(host)}:{port}/ (docs at /docs, metrics at /metrics)"
        f"{'' if api_key is None else ', API key required'}; Ctrl+C stops",
        highlight=False,
    )
    run_server(application, host=host, port=port)


def _check_limits(
    max_upload_mb, max_megapixels, request_timeout, header_timeout, body_timeout,
    decode_workers, decode_memory_mb,
) -> None:  # fmt: skip
    from cxr.serve.limits import check_positive

    for option, value in [
        ("--max-upload-mb", max_upload_mb),
        ("--max-megapixels", max_megapixels),
        ("--header-timeout", header_timeout),
        ("--body-timeout", body_timeout),
        ("--decode-workers", decode_workers),
    ]:
        check_positive(option, value)
    check_positive("--request-timeout", request_timeout, zero_means_none=True)
    if decode_memory_mb is not None:
        check_positive("--decode-memory-mb", decode_memory_mb)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``): reachable from this machine
    only. A name other than ``localhost`` counts as beyond loopback."""
    import ipaddress

    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _api_key(path: Path | None, host: str, insecure: bool) -> str | None:
    """The key from ``--api-key-file``; without one, listening beyond loopback is refused
    unless ``--insecure``."""
    from cxr.serve.auth import read_api_key, readable_by_others

    if path is None:
        if is_loopback(host):
            return None
        if not insecure:
            raise ConfigError(
                f"--host {host} listens beyond this machine without an API key: give "
                "--api-key-file FILE (and TLS through a reverse proxy, see the README), or "
                "--insecure to serve without one"
            )
        warn(
            f"listening on {host} without an API key (--insecure): anyone who reaches it may use it"
        )
        return None
    key = read_api_key(path)
    if readable_by_others(path):
        warn(f"{path}: the API key file is readable by every user; chmod 600 it")
    return key
