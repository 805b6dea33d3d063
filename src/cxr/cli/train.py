"""``cxr train``, ``cxr evaluate`` and ``cxr demo``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from cxr.cli.common import (
    EVALUATE,
    GET_STARTED,
    TRAIN,
    app,
    auroc_table,
    console,
    friendly_errors,
    progress_bar,
    progress_task,
    shown,
    warn,
)
from cxr.cli.options import (
    BatchSizeOption,
    DeviceOption,
    LabelMapOption,
    WorkersOption,
    dataset_options,
)
from cxr.config import TrainConfig, load_config
from cxr.errors import CxrError
from cxr.labels import PATHOLOGIES
from cxr.run import RunFolder

# The library modules behind these commands import torch (and captum, onnxruntime, FastAPI,
# matplotlib); each command imports them when it runs, so that `cxr --help` and the `cxr data`
# commands start in a fraction of a second instead of several seconds.


class RichTrainCallbacks:
    """Progress bar per epoch (loss, images/s) and a summary line per epoch."""

    def __init__(self, quiet: bool = False):
        self.progress = progress_bar()
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
            f"training on {info['device']} (processes: {info['world_size']}, "
            f"{info['precision']}): {info['train_images']:,} train / {info['val_images']:,} val "
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
    base = load_config(config_file) if config_file else TrainConfig()
    return base.updated(**overrides)


# The options of `cxr train` that take more than a line to declare.
SplitOption = Annotated[
    Path | None,
    typer.Option(
        "--split",
        help="Folder with train/val/test.csv to use (default: a patient-level split of "
        "DATA, 10% val and 20% test patients, by --seed).",
    ),
]
WeightsOption = Annotated[
    str | None,
    typer.Option(
        help="imagenet (default), none, a local weights file, or a cxr run / bundle to "
        "fine-tune (outputs of the same findings keep their weights; new labels start fresh)."
    ),
]
ArchOption = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="densenet121 (default, torchvision), or a timm architecture: resnet18, resnet50, "
        "efficientnet_b0, convnext_tiny, vit_tiny_patch16_224, vit_small_patch16_224 "
        '(pip install "cxr[timm]").',
    ),
]
UncertainOption = Annotated[
    str | None,
    typer.Option(
        "--uncertain",
        help="Uncertain (-1) labels in training: ignore (default, left out of the loss), "
        "zeros (negative) or ones (positive); Irvin et al. 2019's U-Ignore / U-Zeros / U-Ones.",
    ),
]
FreezeOption = Annotated[
    bool,
    typer.Option("--freeze-backbone", help="Train only the classifier (linear probing)."),
]
TrainWorkersOption = Annotated[
    int | None,
    typer.Option(help="DataLoader worker processes (default: one per core but one, max 16)."),
]
AmpOption = Annotated[
    bool | None,
    typer.Option(
        "--amp/--no-amp", help="Mixed precision: on CUDA, and bf16 on CPUs with native bf16."
    ),
]
CompileOption = Annotated[
    bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")
]
CheckImagesOption = Annotated[
    str | None,
    typer.Option(
        "--check-images",
        help="Before training: header (default: each image's header, nearly free), full "
        "(decode every image once) or none. Not needed with --cache.",
    ),
]
SubgroupOption = Annotated[
    list[str] | None,
    typer.Option(
        "--subgroup",
        help="Also analyse subgroups by this column of the split table (repeatable; each "
        "value a subgroup); sex, age band, view and follow-up band are always analysed.",
    ),
]
SubgroupsOption = Annotated[
    bool,
    typer.Option(
        "--subgroups/--no-subgroups", help="Subgroup results (AUROC, underdiagnosis, gaps)."
    ),
]
CacheOption = Annotated[
    Path | None, typer.Option("--cache", help="Read images from this `cxr data cache` folder.")
]


@app.command("train", rich_help_panel=TRAIN)
@friendly_errors
@dataset_options
def train(
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Dataset folder or table with its images (NIH, CheXpert, MIMIC-CXR-JPG, or "
            "your own table); not needed with --resume."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run folder to create.")] = None,
    split: SplitOption = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue this run from its checkpoint.")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="JSON or TOML file.")] = None,
    image_size: Annotated[int | None, typer.Option(help="224 (default) or e.g. 320.")] = None,
    normalization: Annotated[str | None, typer.Option(help="imagenet, sample or xrv.")] = None,
    weights: WeightsOption = None,
    arch: ArchOption = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step (16).")] = None,
    lr: Annotated[float | None, typer.Option(help="Initial learning rate (0.01).")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="Upper bound on epochs.")] = None,
    max_plateaus: Annotated[int | None, typer.Option(help="Stop after this many.")] = None,
    plateau_patience: Annotated[int | None, typer.Option(help="Epochs before LR/10.")] = None,
    workers: TrainWorkersOption = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for split, init and shuffling.")] = None,
    amp: AmpOption = None,
    compile: CompileOption = None,
    drop_missing: Annotated[
        bool, typer.Option("--drop-missing", help="Train without listed images not on disk.")
    ] = False,
    check_images: CheckImagesOption = None,
    skip_bad_images: Annotated[
        bool, typer.Option("--skip-bad-images", help="Train without unreadable images (warned).")
    ] = False,
    cache: CacheOption = None,
    uncertain: UncertainOption = None,
    freeze_backbone: FreezeOption = False,
    dataset=None,
):
    """Train the CheXNet-style DenseNet121 (weighted BCE, SGD, LR/10 on plateaus).

    Under ``torchrun --nproc_per_node=N -m cxr train ...`` it trains with
    DistributedDataParallel (``--batch-size`` is per process); rank 0 writes the run folder.
    """
    from cxr.outputs import output_folder

    out = out if out is None else output_folder(out)
    if resume is not None:
        # A resumed run keeps its method; only when and where it runs may change.
        runtime = dict(
            max_epochs=max_epochs, max_plateaus=max_plateaus, workers=workers, device=device,
            amp=amp, compile=compile, cache=cache,
        )  # fmt: skip
        method = dict(
            image_size=image_size, lr=lr, weights=weights, arch=arch, data=data, split=split,
            uncertain=uncertain, freeze_backbone=freeze_backbone,
            dataset=dataset.describes_table or dataset.layout != "auto" or dataset.views,
        )  # fmt: skip
        _resume(resume, runtime, given=[k for k, v in {**method, "config": config}.items() if v])
        return
    if data is None or out is None:
        raise CxrError("give DATA and --out RUN to start a run, or --resume RUN to continue one")
    overrides = dict(
        image_size=image_size, normalization=normalization, weights=weights, arch=arch,
        batch_size=batch_size, lr=lr, max_epochs=max_epochs, max_plateaus=max_plateaus,
        plateau_patience=plateau_patience, workers=workers, device=device, seed=seed, amp=amp,
        compile=compile, drop_missing=drop_missing or None, check_images=check_images,
        skip_bad_images=skip_bad_images or None,
        cache=None if cache is None else str(Path(cache).resolve()),
        uncertain=uncertain, freeze_backbone=freeze_backbone or None,
    )  # fmt: skip
    train_config = _train_config(config, overrides)
    _main_rank_first(
        lambda: start_run(data, out, split, train_config, dataset), train_config.device
    )
    _train_and_report(Path(out))


def _resume(run: Path, runtime: dict, given: list[str]) -> None:
    """Continue ``run``; of the options, only those in ``runtime`` may change (they are
    written into its config.json first)."""
    if given:
        raise CxrError(
            "--resume continues a run with its own data, split and method; only --max-epochs, "
            "--max-plateaus, --workers, --device, --amp, --compile and --cache apply"
        )
    from cxr.workflows.train import check_resume_cache

    if runtime.get("cache") is not None:
        runtime["cache"] = str(Path(runtime["cache"]).resolve())
    check_resume_cache(run, runtime.get("cache"))
    changed = {k: v for k, v in runtime.items() if v is not None}
    run_folder = RunFolder(run).require()

    def update_config() -> None:
        if changed:
            config = run_folder.load_config().updated(**changed)
            run_folder.write_json(run_folder.config, config.to_dict())

    run_device = changed.get("device") or run_folder.load_config().device
    _main_rank_first(update_config, run_device)
    _train_and_report(run, resume=True)


def _main_rank_first(action, device: str) -> None:
    """Run ``action`` (which writes the run folder) on rank 0 only.

    Without torchrun this just calls it. Under torchrun the other ranks wait for rank 0 and
    stop, without repeating its message, if it failed.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        action()
        return
    import torch.distributed as torch_dist

    from cxr.runtime import setup_distributed, setup_wait_group

    info = setup_distributed(device)
    group = setup_wait_group()
    failure: BaseException | None = None
    if info.is_main:
        try:
            action()
        except BaseException as exc:  # every rank must hear of it, or they would wait forever
            failure = exc
    outcome = [None if failure is None else str(failure) or type(failure).__name__]
    torch_dist.broadcast_object_list(outcome, src=0, group=group)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise typer.Exit(2)


def _train_and_report(run_dir: Path, *, resume: bool = False) -> None:
    """Train; progress and the summary are shown by rank 0 only."""
    from cxr.engine.trainer import TrainCallbacks
    from cxr.runtime import teardown_distributed
    from cxr.workflows.train import train_run

    main = _is_main_process()
    if main:
        with RichTrainCallbacks() as callbacks:
            state = train_run(run_dir, resume=resume, callbacks=callbacks)
    else:
        state = train_run(run_dir, resume=resume, callbacks=TrainCallbacks())
    teardown_distributed()
    if main:
        _print_train_end(run_dir, state)


def start_run(data: Path, out: Path, split_dir: Path | None, train_config, dataset=None) -> Path:
    """Create the run folder (split, image check, cache check), showing progress and warnings."""
    from cxr.workflows.train import create_run

    with progress_task("checking images") as task:
        notes = create_run(
            data, out, train_config, split_dir=split_dir, on_image_check=task.update,
            dataset=dataset,
        )  # fmt: skip
    for note in notes:
        warn(note)
    return Path(out)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _print_train_end(run_dir: Path, state) -> None:
    best = (
        f"best epoch {state.best_epoch} (val loss {state.best_val_loss:.4f})"
        if state.best_epoch > 0
        else "no epoch finished"
    )
    console.print(
        f"stopped: {shown(state.stopped or 'interrupted')}; {best}; run folder: {shown(run_dir)}"
    )


# ---------------------------------------------------------------------------- evaluate


@app.command("evaluate", rich_help_panel=EVALUATE)
@friendly_errors
@dataset_options
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    split: Annotated[
        str,
        typer.Option(
            help="test, val, or a CSV table of the run's layout; with --data or --labels "
            "google2019: test (the other dataset's own test split) or all."
        ),
    ] = "test",
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="External validation: another dataset (any layout) to score the model on.",
        ),
    ] = None,
    label_map: LabelMapOption = None,
    labels_file: Annotated[
        Path | None,
        typer.Option(
            help="With --labels google2019: the expert label CSV (default: found "
            "below the data folder)."
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Name of the external result (default: the data's).")
    ] = None,
    drop_missing: Annotated[
        bool, typer.Option("--drop-missing", help="Leave out listed images not on disk.")
    ] = False,
    device: DeviceOption = "auto",
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = 2,
    subgroup: SubgroupOption = None,
    subgroups: SubgroupsOption = True,
    dataset=None,
):
    """Probabilities for every image, AUROC per class, and positive/negative calls; or, with
    --data (or --labels google2019), the model validated on another dataset."""
    if data is not None or dataset.labels == ("google2019",):
        if subgroup:
            raise CxrError("--subgroup applies to the run's own splits, not to --data")
        runtime = dict(device=device, batch_size=batch_size, workers=workers)
        options = dict(label_map=label_map, labels_file=labels_file, name=name)
        _evaluate_external(run, data, split, drop_missing, dataset, options, runtime)
        return
    from cxr.api.runs import Run

    with progress_task(f"evaluating {shown(split)}") as task:
        evaluation = Run(run).evaluate(
            split, device=device, batch_size=batch_size, workers=workers,
            on_batch=task.advance, subgroups=(subgroup or []) if subgroups else None,
        )  # fmt: skip
    result = {**evaluation.raw, "path": evaluation.run / "metrics.json"}
    title = f"{shown(result['split'])}: {result['images']:,} images"
    console.print(auroc_table(result, title, list(result["per_class"])))
    if "subgroups" in result:
        _print_subgroups(result["subgroups"], result["split"])
    console.print(f"wrote {shown(run / result['predictions'])} and {shown(result['path'])}")


def _print_subgroups(subgroups: dict, split: str) -> None:
    from cxr.cli.subgroups import flags_line, subgroup_table

    if not subgroups["groupings"]:
        console.print("no subgroup columns (sex, age, view, follow-up) in the split table")
        return
    console.print(subgroup_table(subgroups, f"{shown(split)} by subgroup"))
    console.print(flags_line(subgroups), highlight=False)


def _evaluate_external(run, data, split, drop_missing, dataset, options, runtime) -> None:
    from dataclasses import replace

    from cxr.labels import parse_label_map
    from cxr.workflows.external import GOOGLE2019, external_evaluate

    google = dataset.labels == (GOOGLE2019,)
    spec = replace(dataset, labels=None) if google else dataset
    with progress_task("external validation") as task:
        result = external_evaluate(
            run, data, dataset=spec, split=split, labels=GOOGLE2019 if google else None,
            labels_file=options["labels_file"], name=options["name"],
            label_map=parse_label_map(options["label_map"]) if options["label_map"] else None,
            drop_missing=drop_missing, on_batch=task.advance, **runtime,
        )  # fmt: skip
    for note in result["notes"]:
        warn(note)
    title = (
        f"{shown(result['name'])} ({result['layout']}, {result['split']}): "
        f"{result['images']:,} images of {result['patients']:,} patients"
    )
    console.print(external_table(result, title))
    if result["dropped"]:
        console.print(
            "not scored (no model output answers them): "
            + ", ".join(shown(n) for n in result["dropped"]),
            highlight=False,
        )
    console.print(f"wrote {shown(run / result['predictions'])} and the metrics under 'external'")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def external_table(result: dict, title: str):
    from rich.table import Table

    table = Table(title=title)
    for column in ("label", "model output(s)", "AUROC", "95% CI", "positives", "sens.", "spec."):
        table.add_column(column)
    for label, entry in result["per_class"].items():
        value = entry["auroc"]
        low, high = entry["auroc_ci"]
        table.add_row(
            shown(label), shown(" | ".join(entry["model_outputs"])),
            "undefined" if value is None else f"{value:.3f}",
            "" if low is None else f"{low:.3f}-{high:.3f}", f"{entry['positives']:,}",
            *(_rate(entry[key]) for key in ("sensitivity", "specificity")),
        )  # fmt: skip
    mean = result["auroc_mean"]
    table.add_section()
    table.add_row("mean", "", "undefined" if mean is None else f"{mean:.3f}")
    return table


# ---------------------------------------------------------------------------- demo


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _plan_line(plan) -> str:
    """What the demo chose, at the start: its settings and, on a CPU, why."""
    settings, train = plan.settings, plan.settings.train
    chosen = (
        f"{settings.patients} patients, {train.image_size} px, {train.max_epochs} epochs, "
        f"pointing game with {settings.localize_shifts} shift(s) per axis"
    )
    if plan.throughput is None:
        return f"settings ({plan.name}): {chosen}"
    speed = plan.throughput
    over = (
        " - more than the budget: these are the demo's smallest settings"
        if plan.estimate_s > plan.budget_s
        else ""
    )
    return (
        f"this CPU trains {speed.train:.1f} images/s at {speed.image_size} px (first steps "
        f"timed); for a budget of {_minutes(plan.budget_s)}: {chosen} (settings "
        f"{plan.name}), about {_minutes(plan.estimate_s)} in all{over}"
    )


@app.command("demo", rich_help_panel=GET_STARTED)
@friendly_errors
def demo(
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for the demo (default: a new one).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A smoke run of about 30 s.")] = False,
    device: Annotated[
        str, typer.Option(help="auto (CUDA when present, with larger settings), cpu or cuda.")
    ] = "auto",
    budget: Annotated[
        float,
        typer.Option(
            "--budget",
            help="Minutes the CPU demo may take: it times its first training steps and "
            "chooses the largest of its settings that fits.",
            min=0.5,
        ),
    ] = 5.0,
):
    """Synthetic data -> patient split -> train from scratch -> evaluate, all offline."""
    from cxr.outputs import output_folder

    out = out if out is None else output_folder(out)
    from cxr.workflows.demo import resolve_demo_device, run_demo

    device = resolve_demo_device(device)

    if out is None:
        out = Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        raise CxrError(f"{out}: already exists and is not empty; choose another --out")
    started = time.perf_counter()
    console.print(
        "[bold]cxr demo[/]: the data below is SYNTHETIC (generated chest-like images), "
        "not NIH ChestX-ray14."
    )
    with RichTrainCallbacks() as callbacks:
        synth_task = callbacks.progress.add_task("synthetic images", total=None, status="")
        result = run_demo(
            out,
            quick=quick,
            device=device,
            budget_s=budget * 60,
            callbacks=callbacks,
            on_plan=lambda plan: callbacks.progress.console.print(
                f"[bold]>[/] {_plan_line(plan)}", highlight=False
            ),
            on_stage=lambda text: callbacks.progress.console.print(f"[bold]>[/] {text}"),
            on_synth_progress=lambda done, total: callbacks.progress.update(
                synth_task, completed=done, total=total
            ),
        )
    evaluation = result["evaluation"]
    title = f"SYNTHETIC test split: {evaluation['images']:,} images"
    console.print(auroc_table(evaluation, title, PATHOLOGIES))
    localization = result["localization"]
    overall = localization["overall"]
    spacing = localization["sample_spacing_px"]
    console.print(
        f"Grad-CAM pointing game on the planted findings (test split, {overall['findings']} "
        f"findings, map sampled every {spacing:g} px): hit rate "
        f"{overall['pointing_hit_rate']:.2f} inside the box, "
        f"{overall['pointing_hit_rate_tolerant']:.2f} within {localization['tolerance_px']:g} px "
        f"(half a feature-map cell); see {shown(localization['path'])}"
    )
    estimate = result["plan"].estimate_s
    estimated = "" if estimate is None else f" (estimated {_minutes(estimate)})"
    console.print(
        f"mean test AUROC {evaluation['auroc_mean']:.3f} in "
        f"{_minutes(time.perf_counter() - started)}{estimated}; run folder: "
        f"{shown(result['run'])}",
        highlight=False,
    )
    if "subgroups" in evaluation:
        from cxr.cli.subgroups import flags_line

        console.print(flags_line(evaluation["subgroups"]) + " (see the report)", highlight=False)
    console.print(f"evaluation report (opens offline): {shown(result['report']['html'])}")
