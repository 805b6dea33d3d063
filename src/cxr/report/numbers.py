"""Every number the report shows: metrics, the data's origin and splits, training, baselines.

Nothing here draws or renders; :func:`cxr.report.build.report_contents` gathers what these
functions return, :func:`cxr.workflows.report.report_run` stores it in ``metrics.json``, and
the page is rendered from that dict alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.data.schema import IMAGE_COLUMN, PATIENT_COLUMN
from cxr.data.synthetic import README_MARKER, README_NAME
from cxr.labels import PATHOLOGIES
from cxr.metrics import (
    DEFAULT_BINS,
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    auroc,
    average_precision,
    bootstrap_auroc,
    expected_calibration_error,
    known_only,
    percentile_interval,
    reliability_bins,
    threshold_metrics,
)
from cxr.model.bundle import BundleMeta
from cxr.run import RunFolder

REPORT_KEY = "report"  # the report's numbers are in metrics.json under [split][REPORT_KEY]
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


def fmt(value, digits: int = 3) -> str:
    """A number as the report writes it, on the page and in the figures' titles."""
    return "n/a" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------- data origin


def data_origin(run_dir: str | Path) -> dict[str, Any]:
    """Whether the run's data is the synthetic dataset, ChestX-ray14, or cannot be told.

    Synthetic if ``run.json``'s split note says so, if the data folder carries the synthetic
    ``README.txt``, or if the images are far smaller than any NIH image; ChestX-ray14 if
    none of these holds and the split tables record NIH-sized originals.
    """
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


# ---------------------------------------------------------------------------- summaries


def _split_summary(run: RunFolder) -> dict[str, Any]:
    """Per split: images, patients, and per label the positives and their share of the
    images whose label is known."""
    summary = {}
    labels = list(run.labels)
    for name in ("train", "val", "test"):
        path = run.split_file(name)
        if not path.exists():
            continue
        frame = run.read_split(name)
        known = {n: int(frame[n].isin([0, 1]).sum()) for n in labels}
        positives = {n: int((frame[n] == 1).sum()) for n in labels}
        summary[name] = {
            "images": len(frame),
            "patients": int(frame[PATIENT_COLUMN].astype(str).nunique()),
            "positives": positives,
            "prevalence": {n: positives[n] / known[n] if known[n] else None for n in labels},
        }
    return summary


def _training_summary(run: RunFolder, meta: BundleMeta) -> dict[str, Any]:
    if meta.source is not None:  # cxr model import: trained elsewhere
        return {"epochs": 0, "imported": meta.source}
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


# ---------------------------------------------------------------------------- metrics


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
    labels: Sequence[str] = PATHOLOGIES,
) -> dict[str, Any]:
    """Per-class and mean numbers of the report for one split's predictions (unknown labels,
    NaN in ``y_true``, count for nothing)."""
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    boot = bootstrap_auroc(y_true, y_prob, patients, resamples=resamples, seed=seed)
    per_class: dict[str, Any] = {}
    for c, name in enumerate(list(labels)[: y_true.shape[1]]):
        truth, prob = known_only(y_true[:, c], y_prob[:, c])
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
        "labels": list(labels)[: y_true.shape[1]],
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


def external_side_by_side(
    external: dict[str, Any] | None, internal: dict[str, Any]
) -> list[dict[str, Any]]:
    """Each external validation in ``metrics.json``, per scored label beside the internal
    AUROC of the model output that answers it (when one does)."""
    shown = []
    for _, result in sorted((external or {}).items()):
        rows = []
        for label, entry in result["per_class"].items():
            outputs = entry["model_outputs"]
            one = internal["per_class"].get(outputs[0]) if len(outputs) == 1 else None
            rows.append(
                {
                    "label": label,
                    "outputs": outputs,
                    "internal": one["auroc"] if one else None,
                    **{k: entry[k] for k in ("auroc", "auroc_ci", "positives")},
                    **{k: entry[k] for k in ("sensitivity", "specificity")},
                }
            )
        shown.append(
            {
                **{k: result[k] for k in ("name", "layout", "split", "images", "patients")},
                "data": result.get("data"),
                **{k: result[k] for k in ("auroc_mean", "auroc_mean_ci", "dropped")},
                "rows": rows,
            }
        )
    return shown


# ---------------------------------------------------------------------------- gallery


def gallery_cases(
    predictions: pd.DataFrame, k: int, labels: Sequence[str] = PATHOLOGIES
) -> dict[str, dict[str, list[dict]]]:
    """Per class: the ``k`` most confident true positives and the ``k`` highest-scoring false
    positives (known negatives called positive at the class's threshold)."""
    cases: dict[str, dict[str, list[dict]]] = {}
    for name in labels:
        prob = predictions[f"prob_{name}"]
        truth = predictions[f"true_{name}"]
        call = predictions[f"call_{name}"].astype(bool)
        positive, negative = truth == 1, truth == 0
        entry = {}
        for kind, mask in (
            ("true_positives", positive & call),
            ("false_positives", negative & call),
        ):
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


# ---------------------------------------------------------------------------- OOD


def ood_numbers(
    predictions: pd.DataFrame, evaluation: dict[str, Any], shown: int = 10
) -> dict[str, Any] | None:
    """How many of the split's images are flagged as unlike the validation images, and the
    ``shown`` most unusual ones; ``None`` without scores (a bundle without a summary)."""
    if "ood_distance" not in predictions.columns:
        return None
    ranked = predictions.sort_values("ood_distance", ascending=False).head(shown)
    flagged = int(predictions["ood_flag"].sum())
    return {
        "flag_percentile": (evaluation.get("ood") or {}).get("flag_percentile"),
        "images": len(predictions),
        "flagged": flagged,
        "share_flagged": flagged / len(predictions) if len(predictions) else None,
        "most_unusual": [
            {
                "image": str(row[IMAGE_COLUMN]),
                "distance": float(row["ood_distance"]),
                "percentile": float(row["ood_percentile"]),
                "flagged": bool(row["ood_flag"]),
            }
            for _, row in ranked.iterrows()
        ],
    }
