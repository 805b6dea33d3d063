"""The ``cxr`` command. Thin: it parses options, calls library code and renders results."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cxr.config import TrainConfig
from cxr.errors import CxrError, LeakageError

app = typer.Typer(
    help="Chest X-ray diagnosis on NIH ChestX-ray14: data, training, evaluation, explanation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="NIH tables: statistics, patient-level splits, synthetic data.")
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)


def friendly_errors(func: Callable) -> Callable:
    """Turn the library's typed errors into one readable line and an exit status."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        # Messages are escaped (a CSV header like 'OriginalImagePixelSpacing[x,y]' or a label
        # '[bold]' is text, not rich markup) and never wrapped (paths stay whole).
        except LeakageError as exc:
            err_console.print(
                f"[bold red]leakage:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(3) from None
        except CxrError as exc:
            err_console.print(
                f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False)


# ---------------------------------------------------------------------------- data


@data_app.command("stats")
@friendly_errors
def data_stats(
    data: Annotated[Path, typer.Argument(help="NIH folder, or a Data_Entry CSV (.csv/.csv.gz).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON.")] = False,
):
    """Images, patients, views, sex, age and per-label counts and prevalences."""
    from cxr.data.nih import dataset_stats, find_table, read_table

    table_path = find_table(data)
    stats = dataset_stats(read_table(table_path))
    if as_json:
        sys.stdout.write(json.dumps(stats, indent=2) + "\n")
        return
    console.print(f"[bold]{escape(str(table_path))}[/]", soft_wrap=True)
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


def _split_table(split) -> Table:
    from cxr.labels import PATHOLOGIES

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
    val_patients: Annotated[int | None, typer.Option(help="Validation patients (1672).")] = None,
    test_patients: Annotated[int | None, typer.Option(help="Test patients (389).")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Fraction of patients.")] = None,
    test_fraction: Annotated[float | None, typer.Option(help="Fraction of patients.")] = None,
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
    from cxr.data.split import find_official_lists, split_by_patients, split_official, write_split

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
    console.print(f"no patient in two sets; wrote {', '.join(str(p) for p in paths.values())}")


def _load_for_split(data: Path, drop_missing: bool):
    from cxr.data.nih import load_nih

    # A CSV alone is enough to split; a folder promises images, so they are checked.
    nih = load_nih(data, require_images=Path(data).is_dir(), drop_missing=drop_missing)
    if nih.dropped_missing:
        shown = ", ".join(nih.dropped_missing[:5])
        warn(f"dropped {len(nih.dropped_missing):,} image(s) not found on disk (first: {shown})")
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
    from cxr.data.split import check_split, read_split

    frames = read_split(split_dir)
    check_split(frames)
    sizes = ", ".join(f"{name} {len(frame):,} images" for name, frame in frames.items())
    console.print(f"[green]ok[/]: no patient in two sets ({sizes})")


@data_app.command("synth")
@friendly_errors
def data_synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the dataset into.")],
    patients: Annotated[int, typer.Option(help="Number of synthetic patients.")] = 400,
    image_size: Annotated[int, typer.Option(help="Image width and height in pixels.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same files.")] = 0,
):
    """Write a SYNTHETIC dataset in NIH's layout (tables, images, boxes, official lists)."""
    from cxr.data.synthetic import write_synthetic_dataset

    with _progress() as progress:
        task = progress.add_task("generating synthetic images", total=None, status="")
        summary = write_synthetic_dataset(
            out,
            patients=patients,
            image_size=image_size,
            seed=seed,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    console.print(
        f"wrote SYNTHETIC dataset (not NIH data): {summary.images:,} images of "
        f"{summary.patients:,} patients, {summary.boxes:,} boxes, {image_size} px -> {out}"
    )


def _progress():
    """A rich progress bar; each task carries a free-text ``status`` (loss, images/s)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=err_console,
    )


# ---------------------------------------------------------------------------- train


class RichTrainCallbacks:
    """Progress bar per epoch (loss, images/s) and a summary line per epoch."""

    def __init__(self, quiet: bool = False):
        self.progress = _progress()
        self.task = None
        self.quiet = quiet

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def on_start(self, info):
        resumed = f", resuming after epoch {info['start_epoch']}" if info["start_epoch"] else ""
        self.progress.console.print(
            f"training on {info['device']} (processes: {info['world_size']}, AMP: "
            f"{info['amp']}): {info['train_images']:,} train / {info['val_images']:,} val "
            f"images{resumed}"
        )

    def on_epoch_start(self, epoch, max_epochs, steps):
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"epoch {epoch}/{max_epochs}", total=steps, status="")

    def on_step(self, step, steps, loss, images_per_s):
        self.progress.update(
            self.task, completed=step, status=f"loss {loss:.4f}  {images_per_s:,.1f} img/s"
        )

    def on_validation_start(self, images):
        self.progress.update(self.task, status="validating...")

    def on_validation_step(self, images):
        pass

    def on_epoch_end(self, record):
        mean = record["val_auroc_mean"]
        mark = "  [green]best[/]" if record["best"] else ""
        lr_note = f" -> {record['next_lr']:.0e}" if record["next_lr"] < record["lr"] else ""
        self.progress.console.print(
            f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}  "
            f"val loss {record['val_loss']:.4f}  val AUROC "
            f"{'n/a' if mean is None else f'{mean:.3f}'}  lr {record['lr']:.0e}{lr_note}  "
            f"({record['images_per_s']:,.1f} img/s, {record['seconds']:.0f} s){mark}",
            highlight=False,
        )


def _train_config(config_file: Path | None, overrides: dict) -> TrainConfig:
    from cxr.config import TrainConfig, load_config

    base = load_config(config_file) if config_file else TrainConfig()
    return base.updated(**overrides)


@app.command("train")
@friendly_errors
def train(
    data: Annotated[
        Path | None, typer.Argument(help="NIH folder (table + images); not needed with --resume.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run folder to create.")] = None,
    split: Annotated[
        Path | None, typer.Option("--split", help="Folder with train/val/test.csv to use.")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue this run from its checkpoint.")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="JSON or TOML file.")] = None,
    image_size: Annotated[int | None, typer.Option(help="224 (default) or e.g. 320.")] = None,
    normalization: Annotated[str | None, typer.Option(help="imagenet or sample.")] = None,
    weights: Annotated[
        str | None, typer.Option(help="imagenet (default), none, or a local weights file.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step (16).")] = None,
    lr: Annotated[float | None, typer.Option(help="Initial learning rate (0.01).")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="Upper bound on epochs.")] = None,
    max_plateaus: Annotated[int | None, typer.Option(help="Stop after this many.")] = None,
    plateau_patience: Annotated[int | None, typer.Option(help="Epochs before LR/10.")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for split, init and shuffling.")] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="AMP on CUDA.")] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")
    ] = None,
    drop_missing: Annotated[
        bool, typer.Option("--drop-missing", help="Train without listed images not on disk.")
    ] = False,
):
    """Train the CheXNet-style DenseNet121 (weighted BCE, SGD, LR/10 on plateaus)."""
    from cxr.train import train_run

    if resume is not None:
        with RichTrainCallbacks() as callbacks:
            state = train_run(resume, resume=True, callbacks=callbacks)
        _print_train_end(resume, state)
        return
    if data is None or out is None:
        raise CxrError("give DATA and --out RUN to start a run, or --resume RUN to continue one")
    overrides = dict(
        image_size=image_size,
        normalization=normalization,
        weights=weights,
        batch_size=batch_size,
        lr=lr,
        max_epochs=max_epochs,
        max_plateaus=max_plateaus,
        plateau_patience=plateau_patience,
        workers=workers,
        device=device,
        seed=seed,
        amp=amp,
        compile=compile,
        drop_missing=drop_missing or None,
    )
    train_config = _train_config(config, overrides)
    run_dir = start_run(data, out, split, train_config)
    with RichTrainCallbacks() as callbacks:
        state = train_run(run_dir, callbacks=callbacks)
    _print_train_end(run_dir, state)


def start_run(data: Path, out: Path, split_dir: Path | None, train_config) -> Path:
    """Resolve images, make or read the split, and create the run folder."""
    import os

    from cxr.data.nih import attach_image_paths, load_nih
    from cxr.data.split import read_split, split_by_patients
    from cxr.train import prepare_run

    if Path(out).joinpath("config.json").exists():
        raise CxrError(
            f"{out}: already holds a run; use `cxr train --resume {out}` to continue it, "
            "or choose another --out"
        )
    if split_dir is not None:
        root = Path(data) if Path(data).is_dir() else Path(data).parent
        frames = {}
        for name, frame in read_split(split_dir).items():
            nih = attach_image_paths(
                frame.drop(columns=["path"], errors="ignore"),
                root,
                drop_missing=train_config.drop_missing,
                table_path=Path(split_dir) / f"{name}.csv",
            )
            if nih.dropped_missing:
                warn(f"{name}: dropped {len(nih.dropped_missing):,} image(s) not on disk")
            frames[name] = nih.table
        note = {"method": "given", "from": os.path.abspath(split_dir)}
    else:
        nih = load_nih(data, drop_missing=train_config.drop_missing)
        if nih.dropped_missing:
            warn(f"dropped {len(nih.dropped_missing):,} image(s) not found on disk")
        split = split_by_patients(nih.table, seed=train_config.seed)
        frames = split.frames()
        note = {"method": split.method, "seed": split.seed}
    prepare_run(out, frames, train_config, data_source=os.path.abspath(data), split_note=note)
    return Path(out)


def _print_train_end(run_dir: Path, state) -> None:
    best = (
        f"best epoch {state.best_epoch} (val loss {state.best_val_loss:.4f})"
        if state.best_epoch > 0
        else "no epoch finished"
    )
    console.print(f"stopped: {state.stopped or 'interrupted'}; {best}; run folder: {run_dir}")


# ---------------------------------------------------------------------------- evaluate


def auroc_table(result: dict, title: str) -> Table:
    from cxr.labels import PATHOLOGIES

    table = Table("pathology", "AUROC", "positives", "threshold", "sens.", "spec.", title=title)
    for name in PATHOLOGIES:
        entry = result["per_class"][name]
        auroc = "undefined" if entry["auroc"] is None else f"{entry['auroc']:.3f}"
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        table.add_row(
            name,
            auroc,
            f"{entry['positives']:,}",
            f"{entry['threshold']:.3f}",
            fmt(entry["sensitivity"]),
            fmt(entry["specificity"]),
        )
    mean = result["auroc_mean"]
    table.add_section()
    table.add_row("mean", "undefined" if mean is None else f"{mean:.3f}", "", "", "", "")
    return table


@app.command("evaluate")
@friendly_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    split: Annotated[str, typer.Option(help="test, val, or a CSV file in NIH format.")] = "test",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 2,
):
    """Probabilities for every image, AUROC per class, and positive/negative calls."""
    result = _evaluate_with_progress(run, split, device, batch_size, workers)
    console.print(auroc_table(result, f"{result['split']}: {result['images']:,} images"))
    console.print(f"wrote {run / result['predictions']} and {result['path']}")


def _evaluate_with_progress(run, split, device, batch_size, workers) -> dict:
    from cxr.evaluate import evaluate_run

    with _progress() as progress:
        task = progress.add_task(f"evaluating {split}", total=None, status="")
        result = evaluate_run(
            run,
            split,
            device=device,
            batch_size=batch_size,
            workers=workers,
            on_batch=lambda n: progress.advance(task, n),
        )
    return result
