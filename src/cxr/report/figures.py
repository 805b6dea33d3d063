"""The report's figures as PNG bytes: ROC, precision-recall, reliability, score
distributions, training curves and the Grad-CAM gallery's overlays.

matplotlib's object API on an Agg canvas: no pyplot state.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.metrics import precision_recall_curve, roc_curve

from cxr.data.images import as_uint8, decode_gray
from cxr.data.schema import IMAGE_COLUMN, PATH_COLUMN
from cxr.explain.gradcam import gradcam
from cxr.explain.render import overlay_png
from cxr.metrics import known_only
from cxr.model.bundle import load_bundle
from cxr.report.numbers import fmt
from cxr.runtime import resolve_device
from cxr.safety import figure_text
from cxr.utils import safe_name


def _figure(width: float, height: float):
    # matplotlib here, where a figure is made: importing cxr stays fast.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


MAX_FIGURE_PX = 4000  # a side of any report figure, whatever the data holds


def _png(figure) -> bytes:
    """The figure as PNG, at most :data:`MAX_FIGURE_PX` a side: drawn again at a lower
    resolution when its content (many labels, long names) would make it larger."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        largest = max(image.size)
    if largest > MAX_FIGURE_PX:
        buffer = io.BytesIO()
        dpi = figure.dpi * MAX_FIGURE_PX / largest * 0.98
        figure.savefig(buffer, format="png", bbox_inches="tight", dpi=dpi)
    return buffer.getvalue()


def _grid(names: Sequence[str]):
    columns = 4
    rows = math.ceil(len(names) / columns)
    figure = _figure(3.2 * columns, 2.9 * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for extra in axes[len(names) :]:
        extra.set_axis_off()
    return figure, axes


def roc_figure(y_true, y_prob, report: dict) -> bytes:
    figure, axes = _grid(report["labels"])
    for c, (label, ax) in enumerate(zip(report["labels"], axes)):
        entry, name = report["per_class"][label], figure_text(label)
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        if entry["auroc"] is not None:
            fpr, tpr, _ = roc_curve(*known_only(y_true[:, c], y_prob[:, c]))
            ax.plot(fpr, tpr, color="C0", lw=1.4)
            if entry["sensitivity"] is not None and entry["specificity"] is not None:
                ax.plot(1 - entry["specificity"], entry["sensitivity"], "o", color="C3", ms=5)
            low, high = entry["auroc_ci"]
            title = f"{name}\nAUROC {fmt(entry['auroc'])} [{fmt(low)}, {fmt(high)}]"
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
    figure, axes = _grid(report["labels"])
    for c, (label, ax) in enumerate(zip(report["labels"], axes)):
        entry, name = report["per_class"][label], figure_text(label)
        if entry["positives"]:
            precision, recall, _ = precision_recall_curve(*known_only(y_true[:, c], y_prob[:, c]))
            ax.step(recall, precision, where="post", color="C0", lw=1.4)
            ax.axhline(entry["prevalence"], color="0.7", lw=0.8, ls="--")
            if entry["ppv"] is not None:
                ax.plot(entry["sensitivity"], entry["ppv"], "o", color="C3", ms=5)
        ax.set_title(
            f"{name}\nAUPRC {fmt(entry['auprc'])} (prevalence {fmt(entry['prevalence'])})",
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
    figure, axes = _grid(report["labels"])
    for label, ax in zip(report["labels"], axes):
        entry, name = report["per_class"][label], figure_text(label)
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
        ax.set_title(f"{name}\nECE {fmt(entry['ece'])}", fontsize=8.5)
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
    figure, axes = _grid(report["labels"])
    for c, (label, ax) in enumerate(zip(report["labels"], axes)):
        entry, name = report["per_class"][label], figure_text(label)
        truth = y_true[:, c]
        # Bins over this class's range: a model trained with a weighted loss may put every
        # score in a narrow band, which bins over [0, 1] would show as one bar.
        low = min(float(y_prob[:, c].min()), entry["threshold"])
        high = max(float(y_prob[:, c].max()), entry["threshold"])
        margin = max(0.02 * (high - low), 1e-3)
        edges = np.linspace(low - margin, high + margin, 31)
        for mask, colour, label in (
            (truth == 0, "C0", "negatives"),
            (truth == 1, "C3", "positives"),
        ):
            if mask.any():
                ax.hist(y_prob[mask, c], bins=edges, density=True, alpha=0.55, color=colour,
                        label=f"{label} ({int(mask.sum())})")  # fmt: skip
        ax.axvline(entry["threshold"], color="k", lw=1, ls="--")
        ax.set_title(f"{name}\nthreshold {fmt(entry['threshold'])}", fontsize=8.5)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_xlabel("predicted probability", fontsize=7.5)
        ax.set_ylabel("density", fontsize=7.5)
        ax.tick_params(labelsize=7)
        if (truth == 0).any() or (truth == 1).any():  # a class with no known label has none
            ax.legend(fontsize=6.5, frameon=False)
    figure.suptitle(
        "Score distributions of positives and negatives (dashed: the threshold)", fontsize=11
    )
    return _png(figure)


def training_figure(log: pd.DataFrame, best_epoch) -> bytes:
    from matplotlib.ticker import MaxNLocator

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
    for ax in (loss_ax, auc_ax, lr_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if best_epoch:
            ax.axvline(best_epoch, color="0.6", ls=":", lw=1, label="kept (best) epoch")
        ax.tick_params(labelsize=8)
    loss_ax.legend(fontsize=8, frameon=False)
    return _png(figure)


# ---------------------------------------------------------------------------- gallery


def gallery_images(
    run_dir: Path, split_frame: pd.DataFrame, cases: dict, device: str = "cpu"
) -> dict[str, bytes]:
    """Grad-CAM overlay PNGs for the gallery's cases; fills each case's ``figure`` name.

    Each image is decoded and run through the backbone once, for all the classes it is
    shown for (Grad-CAM differentiates only the head), in batches of a few images.
    """
    device_obj = resolve_device(device)
    bundle = load_bundle(run_dir, device=device_obj)
    preprocess = bundle.meta.preprocess
    paths = dict(zip(split_frame[IMAGE_COLUMN].astype(str), split_frame[PATH_COLUMN]))
    shown = [
        (c, kind, i, case)
        for c, pathology in enumerate(bundle.labels)
        if pathology in cases
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
        pathology = bundle.labels[c]
        label = "TP" if kind == "true_positives" else "FP"
        title = f"{pathology} {label}: p = {case['prob']:.3f}\n{case['image']}"
        figure_name = f"gallery-{safe_name(pathology)}-{label.lower()}{i + 1}.png"
        pngs[figure_name] = overlay_png(
            as_uint8(crops[case["image"]]), maps[case["image"], c], title
        )
        case["figure"] = figure_name
    return pngs
