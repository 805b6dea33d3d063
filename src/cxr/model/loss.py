"""The method's class-weighted binary cross-entropy, with unknown labels left out.

A label may be unknown (NaN): CheXpert and MIMIC leave observations blank that the report did
not mention. Such a cell adds nothing to the loss or its gradient, and the class weights are
the fractions among the known labels only. Tables without unknown labels (NIH's) take the
original computation, unchanged to the last bit.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def class_weights(labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: positives weighted by the negative fraction, negatives by the positive one.

    ``labels`` is the (images, classes) 0/1 matrix of the training split; NaN marks an
    unknown label, which does not count (a class with no known label gets weights 0.5).
    """
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2 or len(labels) == 0:
        raise ValueError("labels must be a non-empty (images, classes) matrix")
    known = ~np.isnan(labels)
    if known.all():
        positive_fraction = labels.mean(axis=0)
    else:
        counts = known.sum(axis=0)
        positives = np.where(known, labels, 0.0).sum(axis=0)
        positive_fraction = np.divide(
            positives, counts, out=np.full(labels.shape[1], 0.5), where=counts > 0
        )
    w_pos = torch.tensor(1.0 - positive_fraction, dtype=torch.float32)
    w_neg = torch.tensor(positive_fraction, dtype=torch.float32)
    return w_pos, w_neg


class WeightedBCELoss(nn.Module):
    """mean over classes and images of -[w_pos y log p + w_neg (1 - y) log(1 - p)]."""

    def __init__(self, w_pos: torch.Tensor, w_neg: torch.Tensor, *, masked: bool = True):
        super().__init__()
        self.register_buffer("w_pos", torch.as_tensor(w_pos, dtype=torch.float32))
        self.register_buffer("w_neg", torch.as_tensor(w_neg, dtype=torch.float32))
        # Whether targets may hold NaN (unknown labels). Off, the loss never looks: asking a
        # CUDA tensor whether it holds NaN would wait for the GPU at every step.
        self.masked = masked

    @classmethod
    def from_labels(cls, labels: np.ndarray) -> WeightedBCELoss:
        """The loss for training on ``labels``; masked only if some label is unknown."""
        labels = np.asarray(labels, dtype=np.float64)
        return cls(*class_weights(labels), masked=bool(np.isnan(labels).any()))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(logits.dtype)
        known = ~torch.isnan(targets) if self.masked else None
        if known is None:
            weight = targets * self.w_pos + (1.0 - targets) * self.w_neg
            # On logits, not sigmoid outputs: log-sum-exp keeps log p finite when confident.
            return F.binary_cross_entropy_with_logits(
                logits.float(), targets.float(), weight=weight
            )
        # The mean over the known cells only; an unknown cell's target is a placeholder whose
        # weight is 0, so it moves neither the loss nor the gradient.
        filled = torch.where(known, targets, torch.zeros_like(targets))
        weight = (filled * self.w_pos + (1.0 - filled) * self.w_neg) * known
        cells = F.binary_cross_entropy_with_logits(
            logits.float(), filled.float(), weight=weight.float(), reduction="none"
        )
        return cells.sum() / known.sum().clamp_min(1)
