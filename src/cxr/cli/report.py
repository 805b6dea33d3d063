"""``cxr report`` (the HTML evaluation report), ``cxr calibrate`` and ``cxr thresholds``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cxr.cli.common import (
    EVALUATE,
    REPORT,
    app,
    console,
    friendly_errors,
    number,
    progress_task,
    shown,
)
from cxr.cli.options import (
    BatchSizeOption,
    DeviceOption,
    DropMissingOption,
    LabelledDataOption,
    LabelMapOption,
    WorkersOption,
    dataset_options,
    labelled_set,
)
from cxr.errors import CxrError

# The library modules behind these commands import torch (and captum, onnxruntime, FastAPI,
# matplotlib); each command imports them when it runs, so that `cxr --help` and the `cxr data`
# commands start in a fraction of a second instead of several seconds.

_fmt = number


# ---------------------------------------------------------------------------- report


def report_table(report: dict, title: str) -> Table:
    table = Table("pathology", "AUROC", "95% CI", "AUPRC", "sens.", "spec.", "ECE", title=title)
    for name in report["per_class"]:
        v = report["per_class"][name]
        low, high = v["auroc_ci"]
        table.add_row(
            name,
            "undefined" if v["auroc"] is None else f"{v['auroc']:.3f}",
            "" if low is None else f"{low:.3f}-{high:.3f}",
            _fmt(v["auprc"]),
            _fmt(v["sensitivity"], 2),
            _fmt(v["specificity"], 2),
            _fmt(v["ece"]),
        )
    low, high = report["auroc_mean_ci"]
    table.add_section()
    table.add_row(
        "mean",
        _fmt(report["auroc_mean"]),
        "" if low is None else f"{low:.3f}-{high:.3f}",
        *[""] * 3,
        _fmt(report["ece_mean"]),
    )
    return table


def write_report_with_progress(run: Path, **options) -> dict:
    from cxr.workflows.report import report_run

    with progress_task("report") as task:
        return report_run(run, on_stage=task.describe, on_batch=task.advance, **options)


def _print_attached(attached: dict | None, split: str) -> None:
    """What ``--data`` became: the bundle's split, and which outputs it labels."""
    if attached is None:
        return
    what = "kept" if attached["unchanged"] else "wrote"
    console.print(
        f"{what} split/{split}.csv: {attached['images']:,} images of "
        f"{attached['patients']:,} patients from {shown(attached['data'])} "
        f"({attached['layout']})"
        + (f", in place of {shown(attached['replaced'])}" if attached["replaced"] else ""),
        highlight=False,
    )
    if attached["unlabelled_outputs"]:
        console.print(
            "no label of the data answers "
            + ", ".join(shown(n) for n in attached["unlabelled_outputs"])
            + ": left out (their thresholds are kept)",
            highlight=False,
        )


@app.command("report", rich_help_panel=REPORT)
@friendly_errors
@dataset_options
def report(
    run: Annotated[Path, typer.Argument(help="Run folder or imported bundle.")],
    split: Annotated[str, typer.Option(help="test, val or train.")] = "test",
    resamples: Annotated[
        int, typer.Option(help="Bootstrap resamples (of patients) for the AUROC intervals.")
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    gallery: Annotated[
        int, typer.Option(help="Grad-CAM cases per class and kind (true/false positives); 0: none.")
    ] = 3,
    data: LabelledDataOption = None,
    label_map: LabelMapOption = None,
    drop_missing: DropMissingOption = False,
    device: DeviceOption = "auto",
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = 2,
    dataset=None,
):
    """Write report.html (self-contained) and its figures; the numbers go to metrics.json.

    Per-class AUROC with a 95% patient-level bootstrap interval, AUPRC, prevalence, the
    metrics at the validation-chosen thresholds, ROC / precision-recall / reliability plots,
    score distributions, a Grad-CAM gallery, training curves, the config and the data.
    An imported bundle is reported on the labelled set given with --data (its test split).
    """
    if resamples < 1:
        raise CxrError("--resamples must be at least 1")
    if gallery < 0:
        raise CxrError("--gallery must be 0 or more")
    result = write_report_with_progress(
        run,
        split=split,
        resamples=resamples,
        seed=seed,
        gallery=gallery,
        device=device,
        batch_size=batch_size,
        workers=workers,
        labelled=labelled_set(data, dataset, label_map, drop_missing),
    )
    _print_attached(result["attached"], split)
    numbers = result["report"]
    title = f"{split}: {numbers['images']:,} images, {numbers['patients']:,} patients"
    if numbers["data"]["synthetic"]:
        title = "SYNTHETIC " + title
    console.print(report_table(numbers, title))
    console.print(f"wrote {shown(result['html'])} ({len(result['figures'])} figures beside it)")


# ---------------------------------------------------------------------------- thresholds


def _threshold_table(labels, before, after, title: str) -> Table:
    table = Table("pathology", "before", "after", title=title)
    for name, old, new in zip(labels, before, after):
        table.add_row(name, _fmt(old), _fmt(new))
    return table


@app.command("thresholds", rich_help_panel=EVALUATE)
@friendly_errors
@dataset_options
def thresholds(
    run: Annotated[Path, typer.Argument(help="Run folder or imported bundle.")],
    rule: Annotated[
        str, typer.Option(help="youden (Youden's J), sensitivity (a target) or f1 (maximum F1).")
    ] = "youden",
    target_sensitivity: Annotated[
        float, typer.Option(help="The sensitivity the 'sensitivity' rule must reach.")
    ] = 0.9,
    data: LabelledDataOption = None,
    label_map: LabelMapOption = None,
    drop_missing: DropMissingOption = False,
    device: DeviceOption = "auto",
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = 2,
    dataset=None,
):
    """Refit the per-class thresholds on the validation split with a rule; store them.

    `cxr evaluate`, `cxr predict`, `cxr serve` and `cxr report` use the stored thresholds.
    An imported bundle is fitted on the labelled set given with --data (its validation split).
    """
    from cxr.calibration import validate_rule
    from cxr.workflows.calibrate import refit_thresholds

    validate_rule(rule, target_sensitivity)
    with progress_task("validation predictions") as task:
        result = refit_thresholds(
            run, rule, target_sensitivity, device=device, batch_size=batch_size,
            workers=workers, on_batch=task.advance,
            labelled=labelled_set(data, dataset, label_map, drop_missing),
        )  # fmt: skip
    _print_attached(result["attached"], "val")
    console.print(
        _threshold_table(
            result["labels"],
            result["previous_thresholds"],
            result["thresholds"],
            f"thresholds: {result['threshold_rule']}",
        )
    )
    console.print(
        f"stored in {shown(run / 'model.json')} (fitted on "
        f"{result['threshold_fit']['images']:,} "
        "validation images); re-run `cxr evaluate` or `cxr report` for calls at them"
    )


# ---------------------------------------------------------------------------- calibrate


@app.command("calibrate", rich_help_panel=EVALUATE)
@friendly_errors
@dataset_options
def calibrate(
    run: Annotated[Path, typer.Argument(help="Run folder or imported bundle.")],
    data: LabelledDataOption = None,
    label_map: LabelMapOption = None,
    drop_missing: DropMissingOption = False,
    device: DeviceOption = "auto",
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = 2,
    dataset=None,
):
    """Temperature scaling: fit one temperature on the validation split; store it.

    Probabilities become sigmoid(logit / T). The ranking, hence every AUROC, is unchanged.
    The thresholds are refitted on the calibrated validation probabilities with the stored
    rule, so that the positive/negative calls stay consistent. An imported bundle is fitted
    on the labelled set given with --data (its validation split).
    """
    from cxr.workflows.calibrate import calibrate_run

    with progress_task("validation logits") as task:
        result = calibrate_run(
            run, device=device, batch_size=batch_size, workers=workers, on_batch=task.advance,
            labelled=labelled_set(data, dataset, label_map, drop_missing),
        )  # fmt: skip
    _print_attached(result["attached"], "val")
    console.print(
        f"temperature {result['temperature']:.4f} (was {result['previous_temperature']:.4f}), "
        f"fitted on {result['val_images']:,} validation images: NLL "
        f"{result['val_nll_before']:.4f} -> {result['val_nll_after']:.4f}, mean ECE "
        f"{_fmt(result['val_ece_before'])} -> {_fmt(result['val_ece_after'])}",
        highlight=False,
    )
    console.print(
        _threshold_table(
            list(result["labels"]),
            result["previous_thresholds"],
            result["thresholds"],
            f"thresholds refitted on the calibrated validation probabilities: "
            f"{result['threshold_rule']}",
        )
    )
    console.print(
        f"stored in {shown(run / 'model.json')}; AUROCs are unchanged (the transform keeps every "
        "ranking). Re-run `cxr evaluate` or `cxr report` for calibrated probabilities."
    )


# ---------------------------------------------------------------------------- model card, OOD


@app.command("ood", rich_help_panel=EVALUATE)
@friendly_errors
def ood(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    flag_percentile: Annotated[
        float, typer.Option(help="Flag images farther than this percentile of validation ones.")
    ] = 99.0,
    device: DeviceOption = "auto",
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = 2,
):
    """Add (or redo) the out-of-distribution summary of the run's bundle: the validation
    images' pooled features (mean, Ledoit-Wolf covariance, distances) in ood.safetensors.

    `cxr predict`, `cxr serve` and `cxr evaluate` then score each image's Mahalanobis
    distance and flag it above that percentile. Training writes it already; this is for
    bundles made before, or for another percentile.
    """
    from cxr.workflows.ood import add_ood_summary

    with progress_task("validation features") as task:
        result = add_ood_summary(
            run, flag_percentile=flag_percentile, device=device, batch_size=batch_size,
            workers=workers, on_batch=task.advance,
        )  # fmt: skip
    console.print(
        f"out-of-distribution summary of {result['reference_images']:,} validation images "
        f"({result['features']} features); images farther than {result['flag_distance']:.2f} "
        f"(the {result['flag_percentile']:g}th percentile) are flagged. Stored in "
        f"{shown(run / 'ood.safetensors')} and {shown(run / 'model.json')}",
        highlight=False,
    )


@app.command("card", rich_help_panel=REPORT)
@friendly_errors
def card(run: Annotated[Path, typer.Argument(help="Run folder.")]):
    """Write the model card (MODEL_CARD.md and model.json's card) from the run folder.

    Training, evaluate, calibrate, thresholds, report and ood keep it up to date (they change
    the run through cxr.workflows.card); this gives an older bundle one.
    """
    from cxr.workflows.card import refresh_card

    result = refresh_card(run)
    console.print(
        f"model card of a model trained on {shown(result.trained_on())}: wrote "
        f"{shown(run / 'MODEL_CARD.md')} and the card in {shown(run / 'model.json')}",
        highlight=False,
    )
