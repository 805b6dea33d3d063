"""``cxr data ...``: statistics, patient-level splits, leakage check, synthetic data."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cxr.cli.common import console, data_app, friendly_errors, progress_task, shown, warn
from cxr.data.cache import build_cache
from cxr.data.chexpert import chexpert_stats, is_chexpert_table, read_chexpert
from cxr.data.nih import dataset_stats, find_table, load_nih, read_table
from cxr.data.split import (
    check_split,
    find_official_lists,
    read_split,
    split_by_patients,
    split_official,
    write_split,
)
from cxr.data.synthetic import write_synthetic_dataset
from cxr.labels import PATHOLOGIES


@data_app.command("stats")
@friendly_errors
def data_stats(
    data: Annotated[
        Path,
        typer.Argument(
            help="NIH folder, a Data_Entry CSV (.csv/.csv.gz), or CheXpert's train/valid CSV."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON.")] = False,
):
    """Images, patients, views, sex, age and per-label counts and prevalences."""
    if data.is_file() and is_chexpert_table(data):
        _chexpert_stats(data, as_json)
        return
    table_path = find_table(data)
    stats = dataset_stats(read_table(table_path))
    if as_json:
        sys.stdout.write(json.dumps(stats, indent=2) + "\n")
        return
    console.print(f"[bold]{shown(table_path)}[/]", soft_wrap=True)
    console.print(f"images: {stats['images']:,}   patients: {stats['patients']:,}")
    if "views" in stats:
        console.print("views: " + ", ".join(f"{k} {v:,}" for k, v in stats["views"].items()))
    if "sex" in stats:
        console.print("sex: " + ", ".join(f"{k} {v:,}" for k, v in stats["sex"].items()))
    if "age_years" in stats:
        age = stats["age_years"]
        console.print(f"age (years): {age['min']:g} to {age['max']:g}, median {age['median']:g}")
    table = Table("label", "images", "prevalence")
    for name, entry in sorted(stats["labels"].items(), key=lambda kv: -kv[1]["count"]):
        table.add_row(name, f"{entry['count']:,}", f"{entry['prevalence']:.2%}")
    console.print(table)


def _chexpert_stats(path: Path, as_json: bool) -> None:
    """CheXpert's table: the images need not be there (the table is enough to count)."""
    stats = chexpert_stats(read_chexpert(path))
    if as_json:
        sys.stdout.write(json.dumps(stats, indent=2) + "\n")
        return
    console.print(f"[bold]{shown(path)}[/] (CheXpert layout; images not needed)", soft_wrap=True)
    console.print(
        f"images: {stats['images']:,}   patients: {stats['patients']:,}   frontal: "
        f"{stats['frontal']:,}   lateral: {stats['lateral']:,}"
    )
    kinds = ("positive", "negative", "uncertain", "blank")
    table = Table("label", *kinds)
    for name, entry in stats["labels"].items():
        table.add_row(name, *(f"{entry[kind]:,}" for kind in kinds))
    console.print(table)


def _split_table(split) -> Table:
    summary = split.summary()
    table = Table("set", "images", "patients", *[name[:12] for name in PATHOLOGIES])
    for set_name, row in summary.iterrows():
        table.add_row(
            str(set_name),
            f"{int(row['images']):,}",
            f"{int(row['patients']):,}",
            *[f"{int(row[name]):,}" for name in PATHOLOGIES],
        )
    return table


@data_app.command("split")
@friendly_errors
def data_split(
    data: Annotated[Path, typer.Argument(help="NIH folder, or a Data_Entry CSV.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for train.csv, val.csv, test.csv.")],
    val_patients: Annotated[
        int | None,
        typer.Option(help="Validation patients (default: 10% of them; the method used 1672)."),
    ] = None,
    test_patients: Annotated[
        int | None,
        typer.Option(help="Test patients (default: 20% of them; the method used 389)."),
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Fraction of patients for validation (default 0.1).")
    ] = None,
    test_fraction: Annotated[
        float | None, typer.Option(help="Fraction of patients for test (default 0.2).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same split.")] = 0,
    official: Annotated[
        bool, typer.Option("--official", help="Use NIH's train_val_list / test_list.")
    ] = False,
    official_lists: Annotated[
        Path | None, typer.Option(help="Folder with train_val_list.txt and test_list.txt.")
    ] = None,
    drop_missing: Annotated[
        bool, typer.Option("--drop-missing", help="Drop listed images not found on disk.")
    ] = False,
):
    """Patient-level split with no patient in two sets (or NIH's official lists)."""
    nih = _load_for_split(data, drop_missing)
    if official or official_lists:
        search = [official_lists] if official_lists else [nih.table_path.parent, Path(data)]
        lists = find_official_lists(search)
        split = split_official(
            nih.table, lists, val_patients=val_patients, val_fraction=val_fraction, seed=seed
        )
    else:
        split = split_by_patients(
            nih.table,
            val_patients=val_patients,
            test_patients=test_patients,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
        )
    paths = write_split(split, out)
    console.print(_split_table(split))
    written = ", ".join(shown(p) for p in paths.values())
    console.print(f"no patient in two sets; wrote {written}", highlight=False)


def _load_for_split(data: Path, drop_missing: bool):
    # A CSV alone is enough to split; a folder promises images, so they are checked.
    nih = load_nih(data, require_images=Path(data).is_dir(), drop_missing=drop_missing)
    if nih.dropped_missing:
        first = ", ".join(nih.dropped_missing[:5])
        warn(f"dropped {len(nih.dropped_missing):,} image(s) not found on disk (first: {first})")
    if "path" in nih.table.columns:
        # Split files stay portable: images are found again from the data folder.
        nih.table = nih.table.drop(columns=["path"])
    return nih


@data_app.command("check-split")
@friendly_errors
def data_check_split(
    split_dir: Annotated[Path, typer.Argument(help="Folder with train.csv, val.csv, test.csv.")],
):
    """Exit non-zero, naming the shared patients, if a patient is in two sets."""
    frames = read_split(split_dir)
    check_split(frames)
    sizes = ", ".join(f"{name} {len(frame):,} images" for name, frame in frames.items())
    console.print(f"[green]ok[/]: no patient in two sets ({sizes})")


class SynthLayout(str, Enum):
    nih = "nih"
    chexpert = "chexpert"
    mimic = "mimic"


@data_app.command("synth")
@friendly_errors
def data_synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the dataset into.")],
    patients: Annotated[int, typer.Option(help="Number of synthetic patients.")] = 400,
    image_size: Annotated[int, typer.Option(help="Image width and height in pixels.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same files.")] = 0,
    layout: Annotated[
        SynthLayout,
        typer.Option(help="Whose layout: NIH's, CheXpert's or MIMIC-CXR-JPG's."),
    ] = SynthLayout.nih,
):
    """Write a SYNTHETIC dataset in NIH's layout (tables, images, boxes, official lists), or
    in CheXpert's or MIMIC-CXR-JPG's (tables with uncertain and blank labels, JPEGs)."""
    with progress_task("generating synthetic images") as task:
        summary = write_synthetic_dataset(
            out,
            patients=patients,
            image_size=image_size,
            seed=seed,
            progress=task.update,
            layout=layout.value,
        )
    what = {"nih": "NIH", "chexpert": "CheXpert", "mimic": "MIMIC-CXR-JPG"}[layout.value]
    boxes = f"{summary.boxes:,} boxes, " if layout == SynthLayout.nih else ""
    console.print(
        f"wrote SYNTHETIC dataset (not {what} data): {summary.images:,} images of "
        f"{summary.patients:,} patients, {boxes}{image_size} px -> {shown(out)}"
    )


@data_app.command("cache")
@friendly_errors
def data_cache(
    data: Annotated[Path, typer.Argument(help="NIH folder (table + images), or a Data_Entry CSV.")],
    out: Annotated[Path, typer.Option("--out", help="Cache folder to create or to finish.")],
    image_size: Annotated[
        int, typer.Option(help="Stored width and height in pixels (>= the training size).")
    ] = 256,
    workers: Annotated[
        int | None, typer.Option(help="Decoding processes (default: all cores).")
    ] = None,
    drop_missing: Annotated[
        bool, typer.Option("--drop-missing", help="Leave out listed images not on disk.")
    ] = False,
):
    """Decode and resize every image once into a memory-mapped cache for `cxr train --cache`.

    Run it again with the same --out to finish an interrupted build: images already written
    are not decoded again.
    """
    nih = load_nih(data, drop_missing=drop_missing)
    if nih.dropped_missing:
        first = ", ".join(nih.dropped_missing[:5])
        warn(f"left out {len(nih.dropped_missing):,} image(s) not found on disk (first: {first})")
    with progress_task(f"caching at {image_size} px", total=len(nih.table)) as task:
        summary = build_cache(
            nih.table,
            out,
            image_size=image_size,
            workers=workers,
            source=str(Path(data).resolve()),
            progress=task.update,
        )
    if summary.decoded == 0:
        note = "already complete, nothing decoded"
    elif summary.reused:
        note = f"resumed: {summary.decoded:,} decoded, {summary.reused:,} already cached"
    else:
        note = f"{summary.decoded:,} decoded"
    console.print(
        f"cache of {summary.images:,} images at {summary.image_size}x{summary.image_size} px "
        f"({summary.bytes / 1e9:.2f} GB, {note}) -> {shown(summary.path)}"
    )
