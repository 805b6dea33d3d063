"""``cxr explain`` (Grad-CAM overlays per image) and ``cxr localize`` (scores against boxes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from cxr.cli.common import app, console, friendly_errors, progress_bar
from cxr.errors import CxrError

# Options that `cxr explain` and `cxr localize` share.
BatchSizeOption = Annotated[int, typer.Option(help="Images per forward pass.")]
ShiftsOption = Annotated[
    int,
    typer.Option(
        help="Shift-and-stitch: sample the map every 32/N px instead of every 32 px "
        "(1, 2, 4 or 8; costs N*N backbone passes)."
    ),
]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]


def _load(run: Path, device: str):
    from cxr.model import load_bundle
    from cxr.predict import resolve_device

    return load_bundle(run, device=resolve_device(device))


def _thresholds(values: list[float] | None) -> tuple[float, ...]:
    from cxr.explain import DEFAULT_THRESHOLDS

    if not values:
        return DEFAULT_THRESHOLDS
    bad = [v for v in values if not 0.0 < v <= 1.0]
    if bad:
        raise CxrError(f"--threshold must be in (0, 1]; got {', '.join(map(str, bad))}")
    return tuple(sorted(set(values)))


def _check_shifts(shifts: int) -> None:
    from cxr.explain import SHIFT_CHOICES

    if shifts not in SHIFT_CHOICES:
        choices = ", ".join(map(str, SHIFT_CHOICES))
        raise CxrError(f"--shifts must be one of {choices}, not {shifts}")


# ---------------------------------------------------------------------------- explain


@app.command("explain")
@friendly_errors
def explain(
    run: Annotated[Path, typer.Argument(help="Run folder or model bundle.")],
    images: Annotated[list[Path], typer.Argument(help="PNG / JPEG / DICOM files.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for overlays and maps.")],
    pathology: Annotated[
        list[str] | None,
        typer.Option("--pathology", help="Explain this pathology (repeatable)."),
    ] = None,
    positive: Annotated[
        bool,
        typer.Option(
            "--positive", help="Explain the pathologies called positive, else the top 3 (default)."
        ),
    ] = False,
    all_: Annotated[bool, typer.Option("--all", help="Explain all 14 pathologies.")] = False,
    batch_size: BatchSizeOption = 8,
    shifts: ShiftsOption = 1,
    device: DeviceOption = "auto",
):
    """Probabilities, positive/negative calls and Grad-CAM overlays for each image."""
    from cxr.explain import explain_images

    if sum([bool(pathology), positive, all_]) > 1:
        raise CxrError("choose one of --pathology NAME, --positive and --all")
    _check_shifts(shifts)
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise CxrError(f"image file(s) not found: {', '.join(missing)}")
    bundle = _load(run, device)
    with progress_bar() as progress:
        task = progress.add_task("explaining", total=len(images), status="")
        try:
            results = explain_images(
                bundle,
                [str(p) for p in images],
                out,
                pathologies=pathology or None,
                mode="all" if all_ else "positive",
                batch_size=batch_size,
                shifts=shifts,
                on_image=lambda record: progress.advance(task),
            )
        except ValueError as exc:  # an unknown pathology name
            raise CxrError(str(exc)) from None
    for record in results:
        console.print(_prediction_table(record, bundle.labels))
    overlays = sum(len(r["explained"]) for r in results)
    console.print(f"wrote {overlays} overlay(s) (.png) and heatmap(s) (.npy) under {out}")


def _prediction_table(record: dict, labels: list[str]) -> Table:
    explained = {e["pathology"]: e for e in record["explained"]}
    table = Table(
        "pathology",
        "probability",
        "threshold",
        "call",
        "Grad-CAM",
        title=f"{escape(record['image'])} (explained: {record['selection']})",
    )
    for name in labels:
        prob, threshold = record["probabilities"][name], record["thresholds"][name]
        call = "[bold red]positive[/]" if prob >= threshold else "negative"
        shown = "overlay + map" if name in explained else ""
        table.add_row(name, f"{prob:.3f}", f"{threshold:.3f}", call, shown)
    return table


# ---------------------------------------------------------------------------- localize


@app.command("localize")
@friendly_errors
def localize(
    run: Annotated[Path, typer.Argument(help="Run folder or model bundle.")],
    boxes: Annotated[
        Path | None,
        typer.Option("--boxes", help="BBox_List_2017.csv(.gz); default: the run's data folder."),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option("--images", help="Folder searched for the images; default: the run's data."),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(help="Score only this split of the run (train, val, test); default: all."),
    ] = None,
    threshold: Annotated[
        list[float] | None,
        typer.Option("--threshold", help="Heatmap threshold for IoU (repeatable)."),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            help="Pointing-game tolerance in the model's input pixels (default: half a cell)."
        ),
    ] = 16.0,
    out: Annotated[
        Path | None, typer.Option("--out", help="JSON to write (default RUN/localization.json).")
    ] = None,
    batch_size: BatchSizeOption = 8,
    shifts: ShiftsOption = 1,
    device: DeviceOption = "auto",
):
    """Pointing game and IoU of Grad-CAM against boxes, per pathology and overall."""
    from cxr.explain import localize_run
    from cxr.predict import resolve_device

    thresholds = _thresholds(threshold)
    if tolerance < 0:
        raise CxrError(f"--tolerance must be >= 0 pixels, not {tolerance}")
    _check_shifts(shifts)
    with progress_bar() as progress:
        task = progress.add_task("localising", total=None, status="")
        result = localize_run(
            run,
            boxes,
            images,
            split,
            thresholds=thresholds,
            tolerance=tolerance,
            batch_size=batch_size,
            shifts=shifts,
            device=resolve_device(device),
            out=out,
            on_batch=lambda n: progress.advance(task, n),
        )
    console.print(localization_table(result))
    console.print(
        f"{result['images_scored']:,} of {result['images_with_boxes']:,} image(s) with boxes "
        f"scored ({result['images_not_found']:,} not found); wrote {result['path']}"
    )


def localization_table(result: dict) -> Table:
    keys = [f"{t:g}" for t in result["thresholds"]]
    size, cells = result["image_size"], result["feature_map"]
    shifts = result.get("shifts", 1)
    sampling = f", sampled every {32 // shifts} px (shift-and-stitch)" if shifts > 1 else ""
    table = Table(
        title=f"Grad-CAM pointing game and IoU ({size} px input, {cells}x{cells} feature map"
        f"{sampling})",
        caption=f"hit: the maximum inside the box; ±{result['tolerance_px']:g} px: within that "
        "distance of it; IoU@t: IoU of heatmap >= t with the box",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("pathology", no_wrap=True)
    table.add_column("findings", justify="right", no_wrap=True)
    table.add_column("hit", justify="right", no_wrap=True)
    table.add_column(f"±{result['tolerance_px']:g} px", justify="right", no_wrap=True)
    for key in keys:
        table.add_column(f"IoU@{key.lstrip('0')}", justify="right", no_wrap=True)

    def rate(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    def row(name: str, entry: dict) -> None:
        table.add_row(
            name,
            f"{entry['findings']:,}",
            rate(entry["pointing_hit_rate"]),
            rate(entry["pointing_hit_rate_tolerant"]),
            *[f"{entry['iou_mean'][k]:.3f}" for k in keys],
        )

    for name, entry in result["per_pathology"].items():
        row(name, entry)
    table.add_section()
    row("overall", result["overall"])
    return table
