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
from cxr.cli.options import dataset_options
from cxr.data.cache import build_cache
from cxr.data.layouts import get_layout
from cxr.data.split import (
    check_split,
    read_split,
    split_by_patients,
    write_split,
)
from cxr.data.synthetic import (
    PLANT_EFFECT_HELP,
    SYNTHETIC_LAYOUTS,
    parse_planted_effect,
    write_synthetic_dataset,
)


@data_app.command("stats")
@friendly_errors
@dataset_options
def data_stats(
    data: Annotated[
        Path,
        typer.Argument(
            help="A dataset folder or table: NIH, CheXpert, MIMIC-CXR-JPG, or your own CSV / "
            "Parquet (with --image-col, --patient-col, --labels) or dataset file."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON.")] = False,
    dataset=None,
):
    """Images, patients, views, sex, age and per-label counts (the table alone is enough)."""
    from cxr.data.datasets import DatasetSpec, dataset_summary, read_dataset

    # Every view is counted (the frontal ones are shown apart) unless --views chooses.
    spec = dataset if dataset.views else dataset.merged(DatasetSpec(views=("all",)))
    found = read_dataset(data, spec, require_images=False)
    own_stats = get_layout(found.layout).stats
    if own_stats is not None:
        _count_stats(own_stats(found.table), found, as_json)
        return
    stats = dataset_summary(found)
    for note in found.notes:
        warn(note)
    if as_json:
        sys.stdout.write(json.dumps(stats, indent=2) + "\n")
        return
    console.print(
        f"[bold]{shown(found.source)}[/] ({found.layout} layout; the table alone, images not "
        "looked for)",
        soft_wrap=True,
    )
    line = f"images: {stats['images']:,}   patients: {stats['patients']:,}"
    if "frontal" in stats:
        line += f"   frontal: {stats['frontal']:,}"
    console.print(line)
    _print_demographics(stats)
    kinds = ("positive", "negative", "uncertain", "blank")
    table = Table("label", *kinds, "positive share")
    for name, entry in stats["labels"].items():
        prevalence = "-" if entry["prevalence"] is None else f"{entry['prevalence']:.2%}"
        table.add_row(shown(name), *(f"{entry[kind]:,}" for kind in kinds), prevalence)
    console.print(table)


def _print_demographics(stats: dict) -> None:
    for key, title in (("views", "views"), ("sex", "sex")):
        if key in stats:
            console.print(
                f"{title}: " + ", ".join(f"{shown(k)} {v:,}" for k, v in stats[key].items())
            )
    if "age_years" in stats:
        age = stats["age_years"]
        console.print(f"age (years): {age['min']:g} to {age['max']:g}, median {age['median']:g}")


def _count_stats(stats: dict, found, as_json: bool) -> None:
    """A layout's own numbers (NIH's: label counts as NIH publishes them)."""
    if as_json:
        sys.stdout.write(json.dumps(stats, indent=2) + "\n")
        return
    console.print(f"[bold]{shown(found.source)}[/]", soft_wrap=True)
    console.print(f"images: {stats['images']:,}   patients: {stats['patients']:,}")
    _print_demographics(stats)
    table = Table("label", "images", "prevalence")
    for name, entry in sorted(stats["labels"].items(), key=lambda kv: -kv[1]["count"]):
        table.add_row(name, f"{entry['count']:,}", f"{entry['prevalence']:.2%}")
    console.print(table)


def _split_table(split) -> Table:
    """One row per count (images, patients, positives per label), one column per set: a
    label set of any length fits the terminal this way round."""
    summary = split.summary()
    table = Table("", *[str(name) for name in summary.index])
    for column in summary.columns:
        title = column if column in ("images", "patients") else f"{shown(column)} +"
        table.add_row(title, *[f"{int(v):,}" for v in summary[column]])
    return table


@data_app.command("split")
@friendly_errors
@dataset_options
def data_split(
    data: Annotated[
        Path, typer.Argument(help="A dataset folder or table (any layout `cxr data stats` reads).")
    ],
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
        bool,
        typer.Option(
            "--official",
            help="The dataset's own split: NIH's train_val_list / test_list, MIMIC's split "
            "table, CheXpert's valid.csv as the test set.",
        ),
    ] = False,
    official_lists: Annotated[
        Path | None, typer.Option(help="Folder with train_val_list.txt and test_list.txt.")
    ] = None,
    drop_missing: Annotated[
        bool, typer.Option("--drop-missing", help="Drop listed images not found on disk.")
    ] = False,
    dataset=None,
):
    """Patient-level split with no patient in two sets (or the dataset's official one)."""
    from cxr.outputs import output_folder

    out = output_folder(out)
    found = _load_for_split(data, drop_missing, dataset)
    if official or official_lists:
        split = _official_split(found, data, official_lists, val_patients, val_fraction, seed)
    else:
        split = split_by_patients(
            found.table,
            val_patients=val_patients,
            test_patients=test_patients,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            labels=found.labels,
            layout=found.layout,
        )
    paths = write_split(split, out)
    console.print(_split_table(split))
    written = ", ".join(shown(p) for p in paths.values())
    console.print(f"no patient in two sets; wrote {written}", highlight=False)


def _official_split(found, data: Path, lists, val_patients, val_fraction, seed):
    from cxr.data.split import dataset_split

    return dataset_split(
        found.table, labels=found.labels, layout=found.layout,
        search=[lists] if lists else [found.source.parent, Path(data)],
        val_patients=val_patients, val_fraction=val_fraction, seed=seed,
    )  # fmt: skip


def _load_for_split(data: Path, drop_missing: bool, dataset):
    """The table to split. A layout whose folder is its download with the images (NIH's):
    a folder promises images, so they are checked (a CSV alone is enough). Other layouts: the
    table is enough, and images not on disk are counted and said, not refused (CheXpert's
    table is often used without its images)."""
    from cxr.data.datasets import find_images, image_files, read_dataset

    found = read_dataset(data, dataset, require_images=False)
    if get_layout(found.layout).folder_has_images:
        if Path(data).is_dir():
            found = find_images(found, drop_missing=drop_missing)
    else:
        missing = int((~image_files(found)[1]).sum())
        if missing and drop_missing:
            found = find_images(found, drop_missing=True)
        elif missing:
            warn(
                f"{missing:,} of {len(found.table):,} listed images are not on disk below "
                f"{shown(found.image_root)}; the split needs only the table (training will "
                "need the images)"
            )
    for note in found.notes:
        warn(note)
    # Split files stay portable: images are found again from the data folder.
    found.table = found.table.drop(columns=["path"], errors="ignore")
    return found


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


# The layouts the generator writes, as the choices of --layout.
SynthLayout = Enum("SynthLayout", {name: name for name in SYNTHETIC_LAYOUTS}, type=str)


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
    ] = SynthLayout(SYNTHETIC_LAYOUTS[0]),
    plant_effect: Annotated[
        str | None,
        typer.Option(
            "--plant-effect",
            help="Draw one subgroup's findings fainter, to check the subgroup analysis: "
            + PLANT_EFFECT_HELP
            + ".",
        ),
    ] = None,
):
    """Write a SYNTHETIC dataset in NIH's layout (tables, images, boxes, official lists), or
    in CheXpert's or MIMIC-CXR-JPG's (tables with uncertain and blank labels, JPEGs)."""
    from cxr.outputs import output_folder

    out = output_folder(out)
    effect = parse_planted_effect(plant_effect) if plant_effect is not None else None
    with progress_task("generating synthetic images") as task:
        summary = write_synthetic_dataset(
            out,
            patients=patients,
            image_size=image_size,
            seed=seed,
            progress=task.update,
            layout=layout.value,
            plant_effect=effect,
        )
    written = get_layout(layout.value)
    boxes = f"{summary.boxes:,} boxes, " if written.bounding_boxes else ""
    console.print(
        f"wrote SYNTHETIC dataset (not {written.short_name} data): {summary.images:,} images of "
        f"{summary.patients:,} patients, {boxes}{image_size} px -> {shown(out)}"
    )
    if effect is not None:
        console.print(f"planted subgroup effect: {shown(effect.describe())} (see README.txt)")


@data_app.command("cache")
@friendly_errors
@dataset_options
def data_cache(
    data: Annotated[
        Path, typer.Argument(help="A dataset folder or table (any layout), with its images.")
    ],
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
    dataset=None,
):
    """Decode and resize every image once into a memory-mapped cache for `cxr train --cache`.

    Run it again with the same --out to finish an interrupted build: images already written
    are not decoded again.
    """
    from cxr.outputs import output_folder

    out = output_folder(out)
    from cxr.data.datasets import read_dataset

    found = read_dataset(data, dataset, drop_missing=drop_missing)
    if found.dropped_missing:
        first = ", ".join(found.dropped_missing[:5])
        warn(f"left out {len(found.dropped_missing):,} image(s) not found on disk (first: {first})")
    with progress_task(f"caching at {image_size} px", total=len(found.table)) as task:
        summary = build_cache(
            found.table,
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
