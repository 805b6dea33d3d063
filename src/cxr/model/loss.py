"""The method's class-weighted binary cross-entropy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def class_weights(labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: positives weighted by the negative fraction, negatives by the positive one.

    ``labels`` is the (images, classes) 0/1 matrix of the training split.
    """
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2 or len(labels) == 0:
        raise ValueError("labels must be a non-empty (images, classes) matrix")
    positive_fraction = labels.mean(axis=0)
    w_pos = torch.tensor(1.0 - positive_fraction, dtype=torch.float32)
    w_neg = torch.tensor(positive_fraction, dtype=torch.float32)
    return w_pos, w_neg


class WeightedBCELoss(nn.Module):
    """mean over classes and images of -[w_pos y log p + w_neg (1 - y) log(1 - p)]."""

    def __init__(self, w_pos: torch.Tensor, w_neg: torch.Tensor):
        super().__init__()
        self.register_buffer("w_pos", torch.as_tensor(w_pos, dtype=torch.float32))
        self.register_buffer("w_neg", torch.as_tensor(w_neg, dtype=torch.float32))

    @classmethod
    def from_labels(cls, labels: np.ndarray) -> WeightedBCELoss:
        return cls(*class_weights(labels))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(logits.dtype)
        weight = targets * self.w_pos + (1.0 - targets) * self.w_neg
        # On logits, not sigmoid outputs: log-sum-exp keeps log p finite for confident outputs.
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), weight=weight)
