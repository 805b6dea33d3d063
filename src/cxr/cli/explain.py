"""``cxr explain`` (Grad-CAM overlays per image) and ``cxr localize`` (scores against boxes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from cxr.cli.common import EXPLAIN, app, console, friendly_errors, progress_task, shown, warn
from cxr.cli.options import BatchSizeOption, DeviceOption, ShiftsOption
from cxr.errors import CxrError

# The library modules behind these commands import torch (and captum, onnxruntime, FastAPI,
# matplotlib); each command imports them when it runs, so that `cxr --help` and the `cxr data`
# commands start in a fraction of a second instead of several seconds.


def _thresholds(values: list[float] | None) -> tuple[float, ...]:
    from cxr.explain.localize import DEFAULT_THRESHOLDS

    if not values:
        return DEFAULT_THRESHOLDS
    bad = [v for v in values if not 0.0 < v <= 1.0]
    if bad:
        raise CxrError(f"--threshold must be in (0, 1]; got {', '.join(map(str, bad))}")
    return tuple(sorted(set(values)))


def _check_shifts(shifts: int) -> None:
    from cxr.explain.gradcam import SHIFT_CHOICES

    if shifts not in SHIFT_CHOICES:
        choices = ", ".join(map(str, SHIFT_CHOICES))
        raise CxrError(f"--shifts must be one of {choices}, not {shifts}")


# ---------------------------------------------------------------------------- explain


@app.command("explain", rich_help_panel=EXPLAIN)
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
            "--positive",
            help="Explain only the pathologies called positive (none if none is). "
            "Default: the positive ones, else the 3 most probable.",
        ),
    ] = False,
    all_: Annotated[bool, typer.Option("--all", help="Explain all 14 pathologies.")] = False,
    batch_size: BatchSizeOption = 8,
    shifts: ShiftsOption = 1,
    device: DeviceOption = "auto",
):
    """Probabilities, positive/negative calls and Grad-CAM overlays for each image."""
    from cxr.outputs import output_folder

    out = output_folder(out)
    from cxr.model.bundle import load_bundle
    from cxr.runtime import resolve_device
    from cxr.workflows.explain import explain_images

    if sum([bool(pathology), positive, all_]) > 1:
        raise CxrError("choose one of --pathology NAME, --positive and --all")
    _check_shifts(shifts)
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise CxrError(f"image file(s) not found or not regular files: {', '.join(missing)}")
    bundle = load_bundle(run, device=resolve_device(device))
    mode = "all" if all_ else "positive" if positive else "auto"
    with progress_task("explaining", total=len(images)) as task:
        try:
            results = explain_images(
                bundle,
                [str(p) for p in images],
                out,
                pathologies=pathology or None,
                mode=mode,
                batch_size=batch_size,
                shifts=shifts,
                on_image=lambda record: task.advance(1),
            )
        except ValueError as exc:  # an unknown pathology name
            raise CxrError(str(exc)) from None
    for record in results:
        console.print(_prediction_table(record, bundle.labels))
    overlays = sum(len(r["explained"]) for r in results)
    console.print(
        f"wrote {overlays} overlay(s) (.png) and heatmap(s) (.npy) under {shown(out)}",
        highlight=False,
    )


def _prediction_table(record: dict, labels: list[str]) -> Table:
    explained = {e["pathology"]: e for e in record["explained"]}
    table = Table(
        "pathology",
        "probability",
        "threshold",
        "call",
        "Grad-CAM",
        title=f"{shown(record['image'])} (explained: {record['selection']})",
    )
    for name in labels:
        prob, threshold = record["probabilities"][name], record["thresholds"][name]
        call = "[bold red]positive[/]" if prob >= threshold else "negative"
        maps = "overlay + map" if name in explained else ""
        table.add_row(name, f"{prob:.3f}", f"{threshold:.3f}", call, maps)
    return table


# ---------------------------------------------------------------------------- localize


@app.command("localize", rich_help_panel=EXPLAIN)
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
        str,
        typer.Option(
            help="The run's split to score: test (default: images the model never trained "
            "on), val, train, or all."
        ),
    ] = "test",
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
    from cxr.outputs import output_file

    out = out if out is None else output_file(out, default_name="localization.json")
    from cxr.workflows.localize import localize_run

    thresholds = _thresholds(threshold)
    if tolerance < 0:
        raise CxrError(f"--tolerance must be >= 0 pixels, not {tolerance}")
    _check_shifts(shifts)
    with progress_task("localising") as task:
        result = localize_run(
            run,
            boxes,
            images,
            split,
            thresholds=thresholds,
            tolerance=tolerance,
            batch_size=batch_size,
            shifts=shifts,
            device=device,
            out=out,
            on_batch=task.advance,
        )
    console.print(localization_table(result))
    console.print(
        f"split {result['split']}: {result['images_scored']:,} of "
        f"{result['images_with_boxes']:,} image(s) with boxes scored "
        f"({result['images_not_found']:,} not found, {result['images_trained_on']:,} trained "
        f"on); wrote {shown(result['path'])}"
    )
    for message in result["warnings"]:
        warn(message)


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
