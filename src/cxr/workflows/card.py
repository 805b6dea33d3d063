"""The model card of a run's bundle: built from the run folder (its data, split, config,
metrics.json and model.json) and written into ``model.json`` (``card``) and ``MODEL_CARD.md``.

The card is a view of two files, ``model.json`` and ``metrics.json``, so it is written where
those two are: workflows change them only through :func:`update_model` and
:func:`write_metrics`, and both end by rewriting the card. Owning the writes (rather than a
"refresh the card" call at the end of every workflow) means a new workflow cannot change what
the card quotes and leave it stale: there is no other way to change it. Training describes
each best bundle through :func:`update_model` too, and ``cxr card`` (:func:`refresh_card`)
gives an older bundle one. The card only describes the model, so refreshing it changes
neither the ONNX cache key nor the freshness of predictions
(:func:`cxr.model.bundle.meta_digest` leaves it out).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

from cxr import __version__
from cxr.data.layouts import Layout, get_layout, is_layout
from cxr.data.schema import PATIENT_COLUMN, SEX_COLUMN, VIEW_COLUMN
from cxr.model.bundle import BundleMeta, read_bundle_meta, resolve_bundle, weights_digest
from cxr.model.bundle import update_bundle_meta as update_meta
from cxr.model.card import (
    DESCRIPTIONS,
    MODEL_CARD_FILE,
    ModelCard,
    OodNote,
    TestMetrics,
    TrainingData,
    limitations_for,
    render_card,
)
from cxr.run import SPLIT_NAMES, RunFolder
from cxr.utils import atomic_write_text

AGE_BANDS = ((0, 20, "0-19"), (20, 40, "20-39"), (40, 60, "40-59"), (60, 80, "60-79"))
# Where the labels of data that is not a dataset layout come from (a layout says its own).
LABEL_SOURCES = {"synthetic": "planted by the generator (exact)"}


def update_model(run_dir: str | Path, **changes: Any) -> BundleMeta:
    """Change some entries of the run's ``model.json``, then rewrite the card that describes
    it. Without ``changes``: the bundle was just saved (:func:`cxr.model.bundle.save_bundle`)
    and gets its card."""
    if changes:
        update_meta(run_dir, **changes)
    refresh_card(run_dir)
    return read_bundle_meta(run_dir)


def write_metrics(run_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Replace the run's ``metrics.json`` with ``metrics``: the card that quotes them first,
    then the file (a reader of metrics.json never sees numbers the card does not have yet)."""
    run = RunFolder(run_dir)
    refresh_card(run.root, metrics)
    run.write_json(run.metrics, metrics)


def refresh_card(run_dir: str | Path, metrics: dict[str, Any] | None = None) -> ModelCard:
    """Build the card of the run's bundle and store it in ``model.json`` and
    ``MODEL_CARD.md``; ``metrics`` replaces metrics.json's content (:func:`write_metrics`
    passes what it is about to write). Workflows do not call this: they change the run through
    :func:`update_model` and :func:`write_metrics`."""
    run = RunFolder(run_dir)
    meta = read_bundle_meta(run.root)
    card = build_card(run, meta, run.read_metrics() if metrics is None else metrics)
    meta = update_meta(run.root, card=card.model_dump())
    atomic_write_text(run.root / MODEL_CARD_FILE, render_card(card, list(meta.labels)))
    return card


def subgroup_summary(subgroups: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the card keeps of ``metrics.json``'s subgroup analysis: per subgroup its size,
    mean AUROC with its interval and underdiagnosis rate, and the flagged gaps with the
    number of comparisons (the per-class tables stay in metrics.json and the report)."""
    if not subgroups:
        return None
    rows = [
        {
            "grouping": grouping["title"],
            "group": group["name"],
            "images": group["images"],
            "auroc_mean": group["auroc_mean"],
            "auroc_mean_ci": group["auroc_mean_ci"],
            "underdiagnosis": group["underdiagnosis"]["rate"],
        }
        for grouping in subgroups["groupings"]
        for group in grouping["groups"]
    ]
    test = subgroups["test"]
    return {
        "rows": rows,
        "flags": subgroups["flags"],
        "comparisons": test["comparisons"],
        "adjustment": test["adjustment"],
        "alpha": test["alpha"],
    }


def build_card(run: RunFolder, meta: BundleMeta, metrics: dict[str, Any]) -> ModelCard:
    origin = _origin(run)
    layout = _card_layout(origin)
    test = metrics.get("test") or {}
    imported = meta.source is not None and meta.card is not None
    return ModelCard(
        # An imported model was trained elsewhere: what its import said of it stays.
        training_data=meta.card.training_data
        if imported
        else _training_data(run, origin, meta, layout),
        method=dict(meta.card.method) if imported else _method(run, meta),
        test_metrics=_test_metrics(test) if test.get("per_class") else None,
        subgroups=subgroup_summary(test.get("subgroups")),
        calibration=_calibration(meta),
        ood=_ood_note(meta),
        limitations=list(meta.card.limitations)
        if imported
        else limitations_for(origin, layout and layout.limitation),
        cxr_version=__version__,
        weights_sha256=weights_digest(resolve_bundle(run.root)[0]),
        updated=time.strftime("%Y-%m-%d %H:%M:%S %z"),
    )


def _ood_note(meta: BundleMeta) -> OodNote | None:
    if meta.ood is None:
        return None
    entry = meta.ood
    return OodNote(
        method=entry.method,
        reference_images=entry.reference_images,
        flag_percentile=entry.flag_percentile,
    )


def _origin(run: RunFolder) -> str:
    """synthetic, the run's layout where it describes its data for the card (nih, chexpert,
    mimic), or other: the report's test for synthetic data first, then the layout."""
    from cxr.report.numbers import data_origin  # here: the report's figures are not needed

    if data_origin(run.root)["synthetic"]:
        return "synthetic"
    layout = run.dataset_info().get("layout")
    return layout if _card_layout(layout) is not None else "other"


def _card_layout(name: str | None) -> Layout | None:
    """The registered layout ``name`` if it describes its data for the model card."""
    if not name or not is_layout(name):
        return None
    layout = get_layout(name)
    return layout if layout.description else None


def _training_data(
    run: RunFolder, origin: str, meta: BundleMeta, layout: Layout | None
) -> TrainingData:
    info = run.load_info()
    frames = {n: run.read_split(n) for n in SPLIT_NAMES if run.split_file(n).exists()}
    train = frames.get("train")
    labels = list(meta.labels)
    prevalence = {}
    if train is not None:
        for name in labels:
            known = int(train[name].isin([0, 1]).sum())
            prevalence[name] = float((train[name] == 1).sum() / known) if known else None
    return TrainingData(
        origin=origin,
        synthetic=origin == "synthetic",
        description=layout.description if layout else DESCRIPTIONS[origin],
        layout=run.dataset_info().get("layout"),
        split_method=_split_method(info.get("split") or {}),
        images={n: len(f) for n, f in frames.items()},
        patients={n: int(f[PATIENT_COLUMN].astype(str).nunique()) for n, f in frames.items()},
        prevalence=prevalence,
        demographics={} if train is None else demographics(train),
        label_source=layout.label_source if layout else LABEL_SOURCES.get(origin),
    )


def _split_method(note: dict[str, Any]) -> str | None:
    method = note.get("method")
    if method is None:
        return None
    details = [f"{k} {note[k]}" for k in ("seed", "val_fraction", "test_fraction") if k in note]
    by = "by patient" if method not in ("given",) else "given split tables"
    return f"{method} ({by}{'; ' if details else ''}{', '.join(details)})"


def demographics(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Image counts by sex, age band and view, for the columns the table has."""
    found: dict[str, dict[str, int]] = {}
    if SEX_COLUMN in frame:
        found["sex"] = _counts(frame[SEX_COLUMN].fillna("unknown").astype(str))
    ages = next((frame[c] for c in ("Patient Age", "age_years") if c in frame), None)
    if ages is not None:
        years = pd.to_numeric(ages, errors="coerce")
        bands = pd.Series("unknown", index=frame.index)
        for low, high, name in AGE_BANDS:
            bands[(years >= low) & (years < high)] = name
        bands[years >= 80] = "80+"
        found["age"] = _counts(bands)
    if VIEW_COLUMN in frame:
        found["view"] = _counts(frame[VIEW_COLUMN].fillna("unknown").astype(str))
    return found


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted(values.value_counts().items())}


def _method(run: RunFolder, meta: BundleMeta) -> dict[str, Any]:
    config = run.load_config() if run.config.exists() else None
    init = (run.load_info().get("init") or {}).get("weights")
    method: dict[str, Any] = {
        "architecture": f"{meta.architecture} + global average pooling + one linear layer",
        "image size (px)": meta.image_size,
        "normalisation": meta.normalization,
        "starting weights": init if isinstance(init, str) else None,
        "best epoch": meta.epoch,
        "validation loss": meta.val_loss,
        "validation mean AUROC": meta.val_auroc_mean,
        "thresholds": meta.threshold_rule,
    }
    if config is not None:
        method.update(
            {
                "loss": "weighted binary cross-entropy per class",
                "optimiser": f"SGD momentum 0.9, lr {config.lr}, batch {config.batch_size}",
                "epochs (at most)": config.max_epochs,
                "uncertain labels": config.uncertain,
                "seed": config.seed,
            }
        )
    return method


def _test_metrics(test: dict[str, Any]) -> TestMetrics:
    """From metrics.json's test entry; the intervals from the report's numbers when the
    report was computed on the same evaluation."""
    report = test.get("report") or {}
    # evaluate replaces the whole entry, so a report found in it was made after the evaluation.
    fresh = bool(report.get("per_class"))
    per_class = {}
    for name, values in test["per_class"].items():
        interval = (report["per_class"].get(name) or {}).get("auroc_ci") if fresh else None
        per_class[name] = {"auroc": values.get("auroc"), "auroc_ci": interval}
    if fresh:
        boot = report.get("bootstrap") or {}
        interval = (
            f"95 % intervals: {boot.get('resamples')} bootstrap resamples of patients (cxr report)."
        )
    else:
        interval = "No intervals yet: `cxr report RUN` computes them (patient bootstrap)."
    return TestMetrics(
        split=str(test.get("split", "test")),
        images=int(test["images"]),
        patients=test.get("patients"),
        auroc_mean=test.get("auroc_mean"),
        auroc_mean_ci=report.get("auroc_mean_ci") if fresh else None,
        interval=interval,
        per_class=per_class,
        ece_mean=report.get("ece_mean") if fresh else None,
    )


def _calibration(meta: BundleMeta) -> str | None:
    if not meta.calibration:
        return None
    method = meta.calibration.get("method", "calibrated")
    return f"{method}; temperature {meta.effective_temperature:.4g}."
