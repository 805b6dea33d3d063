"""The evaluation report: one self-contained ``report.html`` and its figures as PNG files.

Order of work, so that every number on the page can be found in ``metrics.json``:

1. the split's predictions are (re)computed with :func:`cxr.evaluate.evaluate_run` if they are
   missing or older than the bundle (new temperature or thresholds);
2. :func:`report_metrics` computes every number the page shows (AUROC with a patient-level
   bootstrap interval, AUPRC, prevalence, the metrics at the validation-chosen thresholds,
   calibration, the data and training summaries, the published baselines where they apply)
   and it is written to ``metrics.json`` under ``[split]["report"]``;
3. the figures are drawn (matplotlib, Agg; no pyplot state) and the page is rendered from
   that dict alone; images are embedded as base64 ``data:`` URIs and also written as PNG
   files beside the page, so it opens offline and nothing on it refers to the network.

Library code: returns values or raises :mod:`cxr.errors`; never prints.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.errors import DataError
from cxr.labels import PATHOLOGIES
from cxr.metrics import (
    DEFAULT_BINS,
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    auroc,
    average_precision,
    bootstrap_auroc,
    expected_calibration_error,
    percentile_interval,
    reliability_bins,
    threshold_metrics,
)
from cxr.workflows.evaluate import ensure_predictions, prediction_arrays

REPORT_KEY = "report"
DEFAULT_GALLERY = 3
NIH_MIN_WIDTH = 1000  # every ChestX-ray14 image is at least this wide (1143 px and up)

# Per-class test AUROCs as published, in NIH's label order. Both used splits other than any
# cxr run's, so they are context, not a like-for-like comparison.
BASELINES: tuple[dict[str, Any], ...] = (
    {
        "key": "wang2017",
        "name": "Wang et al. 2017",
        "citation": (
            "Wang X, Peng Y, Lu L, et al. ChestX-ray8: hospital-scale chest X-ray database and "
            "benchmarks on weakly-supervised classification and localization of common thorax "
            "diseases. CVPR 2017 (arXiv:1705.02315); 14-class results."
        ),
        "auroc": [0.716, 0.807, 0.784, 0.609, 0.706, 0.671, 0.633, 0.806, 0.708, 0.835, 0.815,
                  0.769, 0.708, 0.767],
        "mean": None,  # not stated by the source; the mean of the 14 values is computed
        "digits": 3,  # as published
    },
    {
        "key": "chexnet",
        "name": "CheXNet (Rajpurkar et al. 2017)",
        "citation": (
            "Rajpurkar P, Irvin J, Zhu K, et al. CheXNet: radiologist-level pneumonia detection "
            "on chest X-rays with deep learning. arXiv:1711.05225, 2017."
        ),
        "auroc": [0.8094, 0.9248, 0.8638, 0.7345, 0.8676, 0.7802, 0.7680, 0.8887, 0.7901,
                  0.8878, 0.9371, 0.8047, 0.8062, 0.9164],
        "mean": 0.841,
        "digits": 4,
    },
)  # fmt: skip
BASELINES_NOTE = (
    "These studies used other splits. The numbers are copied from the papers and were measured "
    "on those papers' own test splits of ChestX-ray14, not on this run's test split, with other "
    "image sizes and training details. They give context; they are not a like-for-like "
    "comparison."
)


# ---------------------------------------------------------------------------- data origin


def data_origin(run_dir: str | Path) -> dict[str, Any]:
    """Whether the run's data is the synthetic dataset, ChestX-ray14, or cannot be told.

    Synthetic if ``run.json``'s split note says so, if the data folder carries the synthetic
    ``README.txt``, or if the images are far smaller than any NIH image; ChestX-ray14 if
    none of these holds and the split tables record NIH-sized originals.
    """
    from cxr.data.synthetic import README_MARKER, README_NAME
    from cxr.run import RunFolder

    run = RunFolder(run_dir)
    info = run.load_info()
    reasons: list[str] = []
    if (info.get("split") or {}).get("synthetic"):
        reasons.append("run.json marks the split as synthetic")
    data = info.get("data")
    if data:
        root = Path(data)
        for folder in (root, root.parent) if root.suffix else (root,):
            readme = folder / README_NAME
            try:
                text = readme.read_text(encoding="utf-8", errors="replace")[:2000]
            except OSError:
                continue
            if text.startswith(README_MARKER) or "SYNTHETIC" in text:
                reasons.append(f"{readme} says the data is SYNTHETIC")
                break
    widths = []
    for name in ("train", "val", "test"):
        path = run.split_file(name)
        if path.exists():
            try:
                frame = pd.read_csv(path, usecols=lambda c: c.startswith("OriginalImage[Width"))
            except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
                continue
            if frame.shape[1]:
                widths.extend(pd.to_numeric(frame.iloc[:, 0], errors="coerce").dropna().tolist())
    nih_sized = bool(widths) and float(np.median(widths)) >= NIH_MIN_WIDTH
    if widths and not nih_sized:
        reasons.append(
            f"its images are {float(np.median(widths)):.0f} px wide (median); "
            f"NIH's are at least {NIH_MIN_WIDTH}"
        )
    synthetic = bool(reasons)
    chestxray14 = not synthetic and nih_sized
    if synthetic:
        note = "SYNTHETIC data: " + "; ".join(reasons) + "."
    elif chestxray14:
        note = "NIH ChestX-ray14 (NIH-format table with NIH-sized originals)."
    else:
        note = "Data of unknown origin (no original image sizes recorded)."
    return {"synthetic": synthetic, "chestxray14": chestxray14, "note": note}


# ---------------------------------------------------------------------------- numbers


def _split_summary(run) -> dict[str, Any]:
    from cxr.data.nih import PATIENT_COLUMN

    summary = {}
    for name in ("train", "val", "test"):
        path = run.split_file(name)
        if not path.exists():
            continue
        frame = pd.read_csv(
            path, dtype={PATIENT_COLUMN: str}, usecols=[PATIENT_COLUMN, *PATHOLOGIES]
        )
        summary[name] = {
            "images": len(frame),
            "patients": int(frame[PATIENT_COLUMN].nunique()),
            "positives": {n: int(frame[n].sum()) for n in PATHOLOGIES},
            "prevalence": {n: float(frame[n].mean()) if len(frame) else None for n in PATHOLOGIES},
        }
    return summary


def _training_summary(run, meta: dict[str, Any]) -> dict[str, Any]:
    if not run.log_csv.exists():
        return {"epochs": 0}
    log = pd.read_csv(run.log_csv)
    last = log.iloc[-1] if len(log) else None

    def number(value):
        return None if value is None or pd.isna(value) else float(value)

    return {
        "epochs": len(log),
        "best_epoch": meta.epoch,
        "best_val_loss": number(meta.val_loss),
        "best_val_auroc_mean": number(meta.val_auroc_mean),
        "last_train_loss": None if last is None else number(last["train_loss"]),
        "last_val_loss": None if last is None else number(last["val_loss"]),
        "last_lr": None if last is None else number(last["lr"]),
    }


def _baselines(origin: dict[str, Any]) -> list[dict[str, Any]] | None:
    if not origin["chestxray14"]:
        return None
    out = []
    for entry in BASELINES:
        values = dict(zip(PATHOLOGIES, entry["auroc"]))
        mean = entry["mean"] if entry["mean"] is not None else float(np.mean(entry["auroc"]))
        source = "published" if entry["mean"] is not None else "computed from the 14 values"
        out.append({**entry, "auroc": values, "mean": mean, "mean_source": source})
    return out


def report_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    patients: Sequence[str],
    thresholds: Sequence[float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    bins: int = DEFAULT_BINS,
) -> dict[str, Any]:
    """Per-class and mean numbers of the report for one split's predictions."""
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    boot = bootstrap_auroc(y_true, y_prob, patients, resamples=resamples, seed=seed)
    per_class: dict[str, Any] = {}
    for c, name in enumerate(PATHOLOGIES[: y_true.shape[1]]):
        truth, prob = y_true[:, c], y_prob[:, c]
        value = auroc(truth, prob)
        low, high = percentile_interval(boot.per_class[:, c], confidence)
        per_class[name] = {
            "auroc": value,
            "auroc_ci": [low, high] if value is not None else [None, None],
            "auroc_ci_resamples": int(np.isfinite(boot.per_class[:, c]).sum()),
            "auprc": average_precision(truth, prob),
            "positives": int(truth.sum()),
            "negatives": int(len(truth) - truth.sum()),
            "prevalence": float(truth.mean()) if len(truth) else None,
            **threshold_metrics(truth, prob, float(thresholds[c])),
            "ece": expected_calibration_error(truth, prob, bins),
            "reliability": reliability_bins(truth, prob, bins),
        }
    defined = [v["auroc"] for v in per_class.values() if v["auroc"] is not None]
    mean = float(np.mean(defined)) if defined else None
    eces = [v["ece"] for v in per_class.values() if v["ece"] is not None]
    low, high = percentile_interval(boot.mean, confidence)
    return {
        "images": len(y_true),
        "patients": len(set(map(str, patients))),
        "auroc_mean": mean,
        "auroc_mean_ci": [low, high] if mean is not None else [None, None],
        "auroc_mean_classes": len(defined),
        "ece_mean": float(np.mean(eces)) if eces else None,
        "bootstrap": {
            "unit": boot.unit,
            "resamples": resamples,
            "seed": seed,
            "confidence": confidence,
            "method": "percentile",
        },
        "calibration_bins": bins,
        "per_class": per_class,
    }


# ---------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _grid(names: Sequence[str]):
    columns = 4
    rows = math.ceil(len(names) / columns)
    figure = _figure(3.2 * columns, 2.9 * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for extra in axes[len(names) :]:
        extra.set_axis_off()
    return figure, axes


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def roc_figure(y_true, y_prob, report: dict) -> bytes:
    from sklearn.metrics import roc_curve

    figure, axes = _grid(PATHOLOGIES)
    for c, (name, ax) in enumerate(zip(PATHOLOGIES, axes)):
        entry = report["per_class"][name]
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        if entry["auroc"] is not None:
            fpr, tpr, _ = roc_curve(y_true[:, c], y_prob[:, c])
            ax.plot(fpr, tpr, color="C0", lw=1.4)
            if entry["sensitivity"] is not None and entry["specificity"] is not None:
                ax.plot(1 - entry["specificity"], entry["sensitivity"], "o", color="C3", ms=5)
            low, high = entry["auroc_ci"]
            title = f"{name}\nAUROC {_fmt(entry['auroc'])} [{_fmt(low)}, {_fmt(high)}]"
        else:
            title = f"{name}\nAUROC undefined"
        ax.set_title(title, fontsize=8.5)
        ax.set(xlim=(0, 1), ylim=(0, 1.01))
        ax.set_xlabel("1 - specificity", fontsize=7.5)
        ax.set_ylabel("sensitivity", fontsize=7.5)
        ax.tick_params(labelsize=7)
    figure.suptitle("ROC curves (red dot: the validation-chosen threshold)", fontsize=11)
    return _png(figure)


def pr_figure(y_true, y_prob, report: dict) -> bytes:
    from sklearn.metrics import precision_recall_curve

    figure, axes = _grid(PATHOLOGIES)
    for c, (name, ax) in enumerate(zip(PATHOLOGIES, axes)):
        entry = report["per_class"][name]
        if entry["positives"]:
            precision, recall, _ = precision_recall_curve(y_true[:, c], y_prob[:, c])
            ax.step(recall, precision, where="post", color="C0", lw=1.4)
            ax.axhline(entry["prevalence"], color="0.7", lw=0.8, ls="--")
            if entry["ppv"] is not None:
                ax.plot(entry["sensitivity"], entry["ppv"], "o", color="C3", ms=5)
        ax.set_title(
            f"{name}\nAUPRC {_fmt(entry['auprc'])} (prevalence {_fmt(entry['prevalence'])})",
            fontsize=8.5,
        )
        ax.set(xlim=(0, 1), ylim=(0, 1.01))
        ax.set_xlabel("recall (sensitivity)", fontsize=7.5)
        ax.set_ylabel("precision (PPV)", fontsize=7.5)
        ax.tick_params(labelsize=7)
    figure.suptitle(
        "Precision-recall curves (dashed: prevalence; red dot: the chosen threshold)", fontsize=11
    )
    return _png(figure)


def reliability_figure(report: dict) -> bytes:
    figure, axes = _grid(PATHOLOGIES)
    for name, ax in zip(PATHOLOGIES, axes):
        entry = report["per_class"][name]
        bins = entry["reliability"]
        edges = np.asarray(bins["edges"])
        centres = (edges[:-1] + edges[1:]) / 2
        counts = np.asarray(bins["count"], dtype=float)
        ax.bar(centres, counts / max(counts.sum(), 1), width=np.diff(edges), color="0.88",
               edgecolor="0.75", lw=0.5, label="share of images")  # fmt: skip
        ax.plot([0, 1], [0, 1], color="0.5", lw=0.8, ls="--")
        filled = [i for i, n in enumerate(bins["count"]) if n]
        ax.plot(
            [bins["mean_prob"][i] for i in filled],
            [bins["observed"][i] for i in filled],
            "o-",
            color="C0",
            ms=3.5,
            lw=1.2,
        )
        ax.set_title(f"{name}\nECE {_fmt(entry['ece'])}", fontsize=8.5)
        ax.set(xlim=(0, 1), ylim=(0, 1.01))
        ax.set_xlabel("mean predicted probability", fontsize=7.5)
        ax.set_ylabel("observed fraction positive", fontsize=7.5)
        ax.tick_params(labelsize=7)
    figure.suptitle(
        "Reliability (calibration): observed vs predicted per probability bin "
        "(grey bars: share of images in the bin)",
        fontsize=11,
    )
    return _png(figure)


def scores_figure(y_true, y_prob, report: dict) -> bytes:
    figure, axes = _grid(PATHOLOGIES)
    for c, (name, ax) in enumerate(zip(PATHOLOGIES, axes)):
        entry = report["per_class"][name]
        truth = y_true[:, c].astype(bool)
        # Bins over this class's range: a model trained with a weighted loss may put every
        # score in a narrow band, which bins over [0, 1] would show as one bar.
        low = min(float(y_prob[:, c].min()), entry["threshold"])
        high = max(float(y_prob[:, c].max()), entry["threshold"])
        margin = max(0.02 * (high - low), 1e-3)
        edges = np.linspace(low - margin, high + margin, 31)
        for mask, colour, label in ((~truth, "C0", "negatives"), (truth, "C3", "positives")):
            if mask.any():
                ax.hist(y_prob[mask, c], bins=edges, density=True, alpha=0.55, color=colour,
                        label=f"{label} ({int(mask.sum())})")  # fmt: skip
        ax.axvline(entry["threshold"], color="k", lw=1, ls="--")
        ax.set_title(f"{name}\nthreshold {_fmt(entry['threshold'])}", fontsize=8.5)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_xlabel("predicted probability", fontsize=7.5)
        ax.set_ylabel("density", fontsize=7.5)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6.5, frameon=False)
    figure.suptitle(
        "Score distributions of positives and negatives (dashed: the threshold)", fontsize=11
    )
    return _png(figure)


def training_figure(log: pd.DataFrame, best_epoch) -> bytes:
    figure = _figure(12.5, 3.4)
    loss_ax, auc_ax, lr_ax = figure.subplots(1, 3)
    epochs = log["epoch"]
    loss_ax.plot(epochs, log["train_loss"], "o-", ms=3, label="train loss")
    loss_ax.plot(epochs, log["val_loss"], "o-", ms=3, label="validation loss")
    loss_ax.set_title("Weighted BCE per epoch", fontsize=10)
    auc_ax.plot(epochs, log["val_auroc_mean"], "o-", ms=3, color="C2")
    auc_ax.set_title("Validation mean AUROC", fontsize=10)
    lr_ax.plot(epochs, log["lr"], "o-", ms=3, color="C4")
    lr_ax.set_yscale("log")
    lr_ax.set_title("Learning rate", fontsize=10)
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, auc_ax, lr_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if best_epoch:
            ax.axvline(best_epoch, color="0.6", ls=":", lw=1, label="kept (best) epoch")
        ax.tick_params(labelsize=8)
    loss_ax.legend(fontsize=8, frameon=False)
    return _png(figure)


# ---------------------------------------------------------------------------- gallery


def gallery_cases(predictions: pd.DataFrame, k: int) -> dict[str, dict[str, list[dict]]]:
    """Per class: the ``k`` most confident true positives and the ``k`` highest-scoring false
    positives (negatives called positive at the class's threshold)."""
    from cxr.data.nih import IMAGE_COLUMN, PATIENT_COLUMN

    cases: dict[str, dict[str, list[dict]]] = {}
    for name in PATHOLOGIES:
        prob = predictions[f"prob_{name}"]
        truth = predictions[f"true_{name}"].astype(bool)
        call = predictions[f"call_{name}"].astype(bool)
        entry = {}
        for kind, mask in (("true_positives", truth & call), ("false_positives", ~truth & call)):
            rows = predictions[mask].assign(_p=prob[mask]).sort_values("_p", ascending=False)
            entry[kind] = [
                {
                    "image": str(row[IMAGE_COLUMN]),
                    "patient": str(row[PATIENT_COLUMN]),
                    "prob": float(row["_p"]),
                }
                for _, row in rows.head(k).iterrows()
            ]
        cases[name] = entry
    return cases


def gallery_images(
    run_dir: Path, split_frame: pd.DataFrame, cases: dict, device: str = "cpu"
) -> dict[str, bytes]:
    """Grad-CAM overlay PNGs for the gallery's cases; fills each case's ``figure`` name.

    Each image is decoded and run through the backbone once, for all the classes it is
    shown for (Grad-CAM differentiates only the head), in batches of a few images.
    """
    import torch

    from cxr.data.images import decode_gray
    from cxr.data.nih import IMAGE_COLUMN, PATH_COLUMN
    from cxr.data.transforms import Preprocess
    from cxr.explain.gradcam import gradcam
    from cxr.explain.render import overlay_png
    from cxr.model.bundle import load_bundle
    from cxr.runtime import resolve_device

    device_obj = resolve_device(device)
    bundle = load_bundle(run_dir, device=device_obj)
    preprocess = Preprocess(bundle.image_size, bundle.normalization)
    paths = dict(zip(split_frame[IMAGE_COLUMN].astype(str), split_frame[PATH_COLUMN]))
    shown = [
        (c, kind, i, case)
        for c, pathology in enumerate(PATHOLOGIES)
        for kind in ("true_positives", "false_positives")
        for i, case in enumerate(cases[pathology][kind])
    ]
    images = list(dict.fromkeys(case["image"] for *_, case in shown))
    classes = sorted({c for c, *_ in shown})
    crops = {image: preprocess.crop_resized(decode_gray(paths[image])) for image in images}
    maps: dict[tuple[str, int], np.ndarray] = {}
    for start in range(0, len(images), 16):
        chunk = images[start : start + 16]
        batch = torch.stack([preprocess.to_tensor(crops[image]) for image in chunk])
        heat = gradcam(bundle.model, batch.to(device_obj), classes)
        for row, image in enumerate(chunk):
            for column, c in enumerate(classes):
                maps[image, c] = heat[row, column]
    pngs: dict[str, bytes] = {}
    for c, kind, i, case in shown:
        pathology = PATHOLOGIES[c]
        label = "TP" if kind == "true_positives" else "FP"
        title = f"{pathology} {label}: p = {case['prob']:.3f}\n{case['image']}"
        figure_name = f"gallery-{pathology}-{label.lower()}{i + 1}.png"
        pngs[figure_name] = overlay_png(crops[case["image"]], maps[case["image"], c], title)
        case["figure"] = figure_name
    return pngs


# ---------------------------------------------------------------------------- the report


def report_paths(run_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(report.html, figure folder) for a split: ``report.html`` + ``figures/`` for test."""
    run_dir = Path(run_dir)
    if split == "test":
        return run_dir / "report.html", run_dir / "figures"
    return run_dir / f"report-{split}.html", run_dir / f"figures-{split}"


def build_report(
    run_dir: str | Path,
    split: str = "test",
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    gallery: int = DEFAULT_GALLERY,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    on_stage: Callable[[str], None] = lambda stage: None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Compute the report's numbers into ``metrics.json``, draw the figures, write the page.

    Returns ``{"html": path, "figures": [paths], "report": the dict written to metrics.json}``.
    """
    from cxr import __version__
    from cxr.model.bundle import read_bundle_meta
    from cxr.run import RunFolder
    from cxr.utils import atomic_write_bytes, atomic_write_text

    if split not in ("train", "val", "test"):
        raise DataError(f"report: split must be train, val or test, got {split!r}")
    run = RunFolder(run_dir).require()
    on_stage(f"predictions for the {split} split")
    predictions = ensure_predictions(
        run.root, split, device=device, batch_size=batch_size, workers=workers, on_batch=on_batch
    )
    meta = read_bundle_meta(run.root)
    y_true, y_prob = prediction_arrays(predictions, meta.labels)
    thresholds = meta.decision_thresholds
    on_stage(f"metrics with a patient-level bootstrap ({resamples:,} resamples)")
    numbers = report_metrics(
        y_true,
        y_prob,
        predictions["Patient ID"].astype(str).tolist(),
        thresholds,
        resamples=resamples,
        seed=seed,
    )
    origin = data_origin(run.root)
    info = run.load_info()
    report: dict[str, Any] = {
        "split": split,
        "run": str(run.root.resolve()),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cxr_version": __version__,
        "predictions": run.predictions(split).name,
        "model_epoch": meta.epoch,
        "threshold_rule": meta.threshold_rule,
        "threshold_fit": meta.threshold_fit,
        "temperature": meta.effective_temperature,
        "calibration": meta.calibration,
        **numbers,
        "data": {
            **origin,
            "source": info.get("data"),
            "split_method": info.get("split"),
            "splits": _split_summary(run),
        },
        "baselines": _baselines(origin),
        "baselines_note": BASELINES_NOTE if origin["chestxray14"] else None,
        "training": _training_summary(run, meta),
        "config": json.loads(run.config.read_text()),
    }

    html_path, figure_dir = report_paths(run.root, split)
    on_stage("figures")
    figures: dict[str, bytes] = {
        "roc.png": roc_figure(y_true, y_prob, report),
        "precision-recall.png": pr_figure(y_true, y_prob, report),
        "reliability.png": reliability_figure(report),
        "scores.png": scores_figure(y_true, y_prob, report),
    }
    if run.log_csv.exists():
        log = pd.read_csv(run.log_csv)
        if len(log):
            figures["training.png"] = training_figure(log, report["training"]["best_epoch"])
    cases = gallery_cases(predictions, gallery)
    if gallery > 0:
        on_stage("Grad-CAM gallery")
        figures.update(gallery_images(run.root, run.read_split(split), cases, device=device))
    report["gallery"] = cases
    report["figures"] = {name: f"{figure_dir.name}/{name}" for name in figures}

    # Numbers first: the page is rendered from what metrics.json holds.
    metrics = run.read_metrics()
    metrics.setdefault(split, {})[REPORT_KEY] = report
    run.write_json(run.metrics, metrics)
    stored = json.loads(run.metrics.read_text())[split][REPORT_KEY]

    figure_dir.mkdir(parents=True, exist_ok=True)
    for old in figure_dir.glob("*.png"):
        if old.name not in figures:
            old.unlink()
    for name, data in figures.items():
        atomic_write_bytes(figure_dir / name, data)
    atomic_write_text(html_path, render_html(stored, figures))
    return {
        "html": html_path,
        "figures": [figure_dir / name for name in figures],
        "metrics": run.metrics,
        "report": stored,
    }


# ---------------------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(figures: dict[str, bytes], name: str, alt: str, css: str = "figure") -> str:
    data = base64.b64encode(figures[name]).decode("ascii")
    return f'<img class="{css}" src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _ci(entry_ci) -> str:
    low, high = entry_ci
    return "" if low is None else f"{low:.3f} – {high:.3f}"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto;
  max-width: 1180px; padding: 0 24px 48px; color: #1d2330; line-height: 1.45; }
h1 { margin-top: 28px; } h2 { border-bottom: 2px solid #dde3ec; padding-bottom: 4px;
  margin-top: 36px; }
table { border-collapse: collapse; font-size: 13.5px; margin: 10px 0; }
th, td { padding: 4px 9px; border-bottom: 1px solid #e4e8ef; text-align: right;
  white-space: nowrap; }
th { background: #f2f5f9; } td:first-child, th:first-child { text-align: left; }
tr.mean td { font-weight: 600; border-top: 2px solid #c9d1dd; }
.banner { background: #fff3cd; border: 1px solid #e0c060; padding: 10px 14px; border-radius: 6px; }
.note { color: #4a5366; font-size: 13.5px; }
img.figure { max-width: 100%; display: block; margin: 10px 0; }
.gallery-row { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
.gallery-row img { width: 300px; }
.kv td { text-align: left; } pre { background: #f6f8fa; padding: 10px; overflow-x: auto; }
"""


def _class_table(report: dict) -> str:
    head = (
        "<tr><th>pathology</th><th>AUROC</th><th>95 % CI</th><th>AUPRC</th><th>prevalence</th>"
        "<th>positives</th><th>threshold</th><th>sensitivity</th><th>specificity</th>"
        "<th>PPV</th><th>NPV</th><th>F1</th><th>accuracy</th><th>ECE</th></tr>"
    )
    rows = []
    for name in PATHOLOGIES:
        v = report["per_class"][name]
        cells = [
            _e(name),
            _fmt(v["auroc"]) if v["auroc"] is not None else "undefined",
            _ci(v["auroc_ci"]),
            _fmt(v["auprc"]),
            _pct(v["prevalence"]),
            f"{v['positives']:,}",
            _fmt(v["threshold"]),
            _fmt(v["sensitivity"]),
            _fmt(v["specificity"]),
            _fmt(v["ppv"]),
            _fmt(v["npv"]),
            _fmt(v["f1"]),
            _fmt(v["accuracy"]),
            _fmt(v["ece"]),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    mean = report["auroc_mean"]
    rows.append(
        f'<tr class="mean"><td>mean ({report["auroc_mean_classes"]} classes)</td>'
        f"<td>{_fmt(mean)}</td><td>{_ci(report['auroc_mean_ci'])}</td>"
        + "<td></td>" * 10
        + f"<td>{_fmt(report['ece_mean'])}</td></tr>"
    )
    return f'<table id="per-class">{head}{"".join(rows)}</table>'


def _baseline_section(report: dict) -> str:
    if not report["baselines"]:
        why = (
            "this run's data is synthetic"
            if report["data"]["synthetic"]
            else "this run's data could not be confirmed to be ChestX-ray14"
        )
        return (
            '<section id="baselines"><h2>Published results</h2><p class="note">The published '
            f"ChestX-ray14 AUROCs (Wang et al. 2017; CheXNet) are not shown: {why}, and "
            "numbers measured on other data say nothing about it.</p></section>"
        )
    baselines = report["baselines"]
    head = "<tr><th>pathology</th><th>this run</th>" + "".join(
        f"<th>{_e(b['name'])}</th>" for b in baselines
    )
    rows = []
    for name in PATHOLOGIES:
        ours = report["per_class"][name]["auroc"]
        mine = "undefined" if ours is None else _fmt(ours)
        cells = [_e(name), mine] + [_fmt(b["auroc"][name], b["digits"]) for b in baselines]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    rows.append(
        '<tr class="mean"><td>mean</td>'
        f"<td>{_fmt(report['auroc_mean'])}</td>"
        + "".join(f"<td>{_fmt(b['mean'])}</td>" for b in baselines)
        + "</tr>"
    )
    citations = "".join(
        f"<li>{_e(b['citation'])} Mean: {_e(b['mean_source'])}.</li>" for b in baselines
    )
    return (
        '<section id="baselines"><h2>Published results on ChestX-ray14</h2>'
        f'<p class="banner"><strong>Other splits.</strong> {_e(report["baselines_note"])}</p>'
        f'<table>{head}</tr>{"".join(rows)}</table><ul class="note">{citations}</ul></section>'
    )


def _gallery_section(report: dict, figures: dict[str, bytes]) -> str:
    parts = [
        '<section id="gallery"><h2>Grad-CAM gallery</h2><p class="note">For each pathology, '
        "the test images it scores highest among its true positives (positive label, positive "
        "call) and among its false positives (negative label, positive call at the threshold), "
        "with the Grad-CAM map of that pathology over the image the model saw (1 = strongest "
        "evidence). A false positive's map shows what misled the model.</p>"
    ]
    for name in PATHOLOGIES:
        entry = report["gallery"][name]
        parts.append(f"<h3>{_e(name)}</h3>")
        for kind, label in (
            ("true_positives", "true positives"),
            ("false_positives", "false positives"),
        ):
            cases = entry[kind]
            if not cases:
                parts.append(f'<p class="note">No {label} at the threshold.</p>')
                continue
            images = "".join(
                _img(figures, case["figure"], f"{name} {label}: {case['image']}", "gallery")
                for case in cases
                if case.get("figure") in figures
            )
            parts.append(f'<p class="note">{label.capitalize()}:</p>')
            parts.append(f'<div class="gallery-row">{images}</div>')
    parts.append("</section>")
    return "".join(parts)


def _data_section(report: dict) -> str:
    splits = report["data"]["splits"]
    names = [n for n in ("train", "val", "test") if n in splits]
    head = "<tr><th></th>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>"
    rows = [
        "<tr><td>images</td>" + "".join(f"<td>{splits[n]['images']:,}</td>" for n in names),
        "<tr><td>patients</td>" + "".join(f"<td>{splits[n]['patients']:,}</td>" for n in names),
    ]
    for pathology in PATHOLOGIES:
        rows.append(
            f"<tr><td>{_e(pathology)} prevalence</td>"
            + "".join(
                f"<td>{_pct(splits[n]['prevalence'][pathology])} "
                f"({splits[n]['positives'][pathology]:,})</td>"
                for n in names
            )
        )
    method = report["data"].get("split_method") or {}
    return (
        '<section id="data"><h2>Data</h2>'
        f"<p>{_e(report['data']['note'])} Source: <code>{_e(report['data'].get('source'))}</code>. "
        f"Split: <code>{_e(json.dumps(method))}</code> (patient-level: no patient is in two "
        "splits).</p>"
        f"<table>{head}{'</tr>'.join(rows)}</tr></table></section>"
    )


def _training_section(report: dict, figures: dict[str, bytes]) -> str:
    t = report["training"]
    rows = [
        ("epochs trained", t.get("epochs")),
        ("kept epoch (lowest validation loss)", t.get("best_epoch")),
        ("validation loss at the kept epoch", _fmt(t.get("best_val_loss"), 4)),
        ("validation mean AUROC at the kept epoch", _fmt(t.get("best_val_auroc_mean"))),
    ]
    table = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    figure = _img(figures, "training.png", "training curves") if "training.png" in figures else ""
    config = json.dumps(report["config"], indent=2)
    return (
        '<section id="training"><h2>Training</h2>'
        f'<table class="kv">{table}</table>{figure}'
        f"<h3>Configuration</h3><pre>{_e(config)}</pre></section>"
    )


def _calibration_note(report: dict) -> str:
    ece = f"Mean ECE over classes: {_fmt(report['ece_mean'])}."
    calibration = report.get("calibration")
    if calibration:
        return (
            f'<p class="note">{ece} Calibrated with <code>cxr calibrate</code>: '
            f"{_e(calibration.get('method'))}; temperature {report['temperature']:.3f}, fitted "
            f"on {_e(calibration.get('images'))} validation images.</p>"
        )
    return (
        f'<p class="note">{ece} <strong>Not calibrated.</strong> The training loss weights each '
        "class's positives by its negative fraction, which pushes every probability towards "
        "0.5 whatever the prevalence: read these probabilities as scores. "
        "<code>cxr calibrate</code> undoes the weighting and fits a temperature on the "
        "validation split, leaving every AUROC unchanged.</p>"
    )


def render_html(report: dict, figures: dict[str, bytes]) -> str:
    """The page, from the report dict as stored in ``metrics.json`` and the figures' bytes."""
    split = report["split"]
    boot = report["bootstrap"]
    synthetic = report["data"]["synthetic"]
    banner = (
        '<p class="banner"><strong>SYNTHETIC DATA.</strong> This run was trained and evaluated '
        "on generated chest-like images, not on NIH ChestX-ray14: the numbers show that the "
        "pipeline learns; they say nothing about performance on real radiographs.</p>"
        if synthetic
        else ""
    )
    rule = report.get("threshold_rule") or "0.5 (no rule stored)"
    summary = (
        f"<p>Mean AUROC over {report['auroc_mean_classes']} pathologies: "
        f"<strong>{_fmt(report['auroc_mean'])}</strong> (95 % CI {_ci(report['auroc_mean_ci'])})"
        f" on the <strong>{_e(split)}</strong> split: {report['images']:,} images of "
        f"{report['patients']:,} patients. Model: epoch {_e(report['model_epoch'])}, "
        f"temperature {report['temperature']:.3f}, thresholds: {_e(rule)}.</p>"
    )
    method = (
        f'<p class="note">AUROC intervals: {boot["confidence"]:.0%} percentile intervals from '
        f"{boot['resamples']:,} bootstrap resamples of <strong>{_e(boot['unit'])}s</strong> "
        f"(seed {boot['seed']}): each resample draws patients with replacement and takes all "
        "of their images, because images of one patient are not independent. The mean's "
        "interval resamples the same data sets. The threshold metrics are at the per-class "
        "thresholds chosen on the validation split (never on this split); PPV and NPV depend "
        "on this split's prevalence. AUPRC is average precision. ECE: expected calibration "
        f"error over {report['calibration_bins']} equal-width probability bins. Every number "
        f"here is in <code>metrics.json</code> under <code>{_e(split)}.{REPORT_KEY}</code>.</p>"
    )
    title = f"cxr evaluation report: {Path(report['run']).name} ({split} split)"
    body = [
        f"<h1>{_e(title)}</h1>",
        banner,
        f'<p class="note">Run folder <code>{_e(report["run"])}</code>; written '
        f"{_e(report['created'])} by cxr {_e(report['cxr_version'])} from "
        f"<code>{_e(report['predictions'])}</code>.</p>",
        '<section id="summary"><h2>Per-class results</h2>',
        summary,
        _class_table(report),
        method,
        "</section>",
        _baseline_section(report),
        '<section id="curves"><h2>ROC and precision-recall curves</h2>',
        _img(figures, "roc.png", "ROC curves per pathology"),
        _img(figures, "precision-recall.png", "precision-recall curves per pathology"),
        "</section>",
        '<section id="calibration"><h2>Calibration</h2>',
        _calibration_note(report),
        _img(figures, "reliability.png", "reliability diagrams per pathology"),
        "<h3>Score distributions</h3>",
        _img(figures, "scores.png", "score distributions of positives and negatives"),
        "</section>",
        _gallery_section(report, figures),
        _training_section(report, figures),
        _data_section(report),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
