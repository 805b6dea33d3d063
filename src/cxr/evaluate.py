"""Predictions, AUROC per class, and per-class decision thresholds."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from cxr.data.dataset import Preprocess, XrayDataset
from cxr.data.nih import (
    IMAGE_COLUMN,
    PATH_COLUMN,
    PATIENT_COLUMN,
    attach_image_paths,
    label_matrix,
)
from cxr.errors import DataError
from cxr.labels import PATHOLOGIES
from cxr.model import load_bundle
from cxr.run import RunFolder, read_split_table
from cxr.utils import atomic_write_csv

THRESHOLD_RULES = ("youden", "sensitivity", "f1")
DEFAULT_THRESHOLD = 0.5


def auroc_per_class(y_true: np.ndarray, y_prob: np.ndarray) -> list[float | None]:
    """scikit-learn's AUROC per column; ``None`` where a class lacks positives or negatives."""
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob)
    scores: list[float | None] = []
    for column in range(y_true.shape[1]):
        truth = y_true[:, column]
        if truth.min() == truth.max():
            scores.append(None)
        else:
            scores.append(float(roc_auc_score(truth, y_prob[:, column])))
    return scores


def mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(defined)) if defined else None


def choose_threshold(
    truth: np.ndarray, prob: np.ndarray, rule: str = "youden", target_sensitivity: float = 0.9
) -> float:
    """One class's threshold on validation data.

    - ``youden``: maximise sensitivity + specificity - 1 (Youden's J) on the ROC curve;
    - ``sensitivity``: the highest threshold whose sensitivity reaches ``target_sensitivity``;
    - ``f1``: maximise F1.
    A class without both positives and negatives keeps 0.5.
    """
    truth = np.asarray(truth)
    prob = np.asarray(prob, dtype=np.float64)
    if truth.min() == truth.max():
        return DEFAULT_THRESHOLD
    if rule == "youden":
        fpr, tpr, thresholds = roc_curve(truth, prob)
        best = int(np.argmax(tpr - fpr))
        return float(min(thresholds[best], 1.0))
    if rule == "sensitivity":
        # Every cut, not only the ROC's corners: the highest one reaching the target may lie
        # on a straight stretch of the curve, which drop_intermediate would leave out.
        fpr, tpr, thresholds = roc_curve(truth, prob, drop_intermediate=False)
        reaching = np.flatnonzero(tpr >= target_sensitivity)
        return float(min(thresholds[reaching[0]], 1.0))
    if rule == "f1":
        from sklearn.metrics import precision_recall_curve

        precision, recall, thresholds = precision_recall_curve(truth, prob)
        f1 = 2 * precision[:-1] * recall[:-1] / np.clip(precision[:-1] + recall[:-1], 1e-12, None)
        return float(thresholds[int(np.argmax(f1))])
    raise ValueError(f"unknown threshold rule {rule!r}; choose from {', '.join(THRESHOLD_RULES)}")


def choose_thresholds(
    y_true: np.ndarray, y_prob: np.ndarray, rule: str = "youden", target_sensitivity: float = 0.9
) -> list[float]:
    return [
        choose_threshold(y_true[:, c], y_prob[:, c], rule, target_sensitivity)
        for c in range(y_true.shape[1])
    ]


def apply_thresholds(y_prob: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """A positive call is a probability at or above the class's threshold."""
    return (np.asarray(y_prob) >= np.asarray(thresholds)[None, :]).astype(np.int8)


def classification_metrics(
    y_true: np.ndarray, y_prob: np.ndarray, thresholds: list[float]
) -> dict[str, dict]:
    """AUROC and the confusion counts at each class's threshold."""
    aurocs = auroc_per_class(y_true, y_prob)
    calls = apply_thresholds(y_prob, thresholds)
    per_class = {}
    for column, name in enumerate(PATHOLOGIES[: y_true.shape[1]]):
        truth, call = y_true[:, column].astype(bool), calls[:, column].astype(bool)
        tp = int(np.sum(truth & call))
        fp = int(np.sum(~truth & call))
        fn = int(np.sum(truth & ~call))
        tn = int(np.sum(~truth & ~call))
        per_class[name] = {
            "auroc": aurocs[column],
            "positives": int(truth.sum()),
            "negatives": int((~truth).sum()),
            "threshold": float(thresholds[column]),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None,
        }
    return per_class


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader,
    device: torch.device,
    *,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.bfloat16,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, logits) for every sample the loader yields, model in eval mode."""
    model.eval()
    indices, outputs = [], []
    for images, _targets, batch_indices in loader:
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            logits = model(images)
        outputs.append(logits.float().cpu().numpy())
        indices.append(batch_indices.numpy())
        if on_batch:
            on_batch(len(batch_indices))
    if not outputs:
        return np.zeros(0, dtype=np.int64), np.zeros((0, len(PATHOLOGIES)), dtype=np.float32)
    return np.concatenate(indices), np.concatenate(outputs)


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64) / temperature))


def evaluate_run(
    run_dir,
    split: str = "test",
    *,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Predict every image of a split with the run's best bundle; write predictions and metrics.

    ``split`` is ``test``, ``val`` or the path of a CSV in NIH format with a ``path`` column
    (or image names found below the run's data folder).
    """
    run = RunFolder(run_dir).require()
    if split in ("train", "val", "test"):
        frame = run.read_split(split)
        name = split
    else:
        path = Path(split)
        frame = read_split_table(path)
        name = path.stem
        if PATH_COLUMN not in frame.columns:
            data = run.load_info().get("data")
            root = Path(data) if data else path.parent
            frame = attach_image_paths(frame, root if root.is_dir() else root.parent).table
    if frame.empty:
        raise DataError(f"split {split!r} of {run.root} has no images")
    device_obj = torch.device(
        "cuda"
        if device == "auto" and torch.cuda.is_available()
        else ("cpu" if device == "auto" else device)
    )
    bundle = load_bundle(run.root, device=device_obj)
    preprocess = Preprocess(bundle.image_size, bundle.normalization)
    labels = label_matrix(frame)
    dataset = XrayDataset(frame[PATH_COLUMN].tolist(), labels, preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    indices, logits = predict_logits(bundle.model, loader, device_obj, on_batch=on_batch)
    logits = logits[np.argsort(indices, kind="stable")]
    probabilities = sigmoid(logits, bundle.temperature)
    thresholds = bundle.thresholds
    per_class = classification_metrics(labels, probabilities, thresholds)
    aurocs = [per_class[n]["auroc"] for n in PATHOLOGIES]

    columns = {IMAGE_COLUMN: frame[IMAGE_COLUMN], PATIENT_COLUMN: frame[PATIENT_COLUMN]}
    for c, label in enumerate(PATHOLOGIES):
        columns[f"prob_{label}"] = probabilities[:, c]
    for c, label in enumerate(PATHOLOGIES):
        columns[f"true_{label}"] = labels[:, c].astype(int)
    calls = apply_thresholds(probabilities, thresholds)
    for c, label in enumerate(PATHOLOGIES):
        columns[f"call_{label}"] = calls[:, c]
    predictions = pd.DataFrame(columns)
    atomic_write_csv(predictions, run.predictions(name))

    result = {
        "split": name,
        "images": len(frame),
        "patients": int(frame[PATIENT_COLUMN].nunique()),
        "auroc_mean": mean_defined(aurocs),
        "auroc_undefined": [n for n, v in zip(PATHOLOGIES, aurocs) if v is None],
        "threshold_rule": bundle.meta.get("threshold_rule"),
        "model_epoch": bundle.meta.get("epoch"),
        "per_class": per_class,
        "predictions": run.predictions(name).name,
    }
    metrics = run.read_metrics()
    metrics[name] = result
    run.write_json(run.metrics, metrics)
    result["path"] = str(run.metrics)
    json.dumps(result)  # fail here, not in a later reader, if something is not serialisable
    return result
