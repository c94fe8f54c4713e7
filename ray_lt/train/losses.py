"""Training losses (docs/method.md §5)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def log_prior(class_counts: np.ndarray | list[int]) -> torch.Tensor:
    """log of the training class frequencies, the balanced-softmax logit offset."""
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float32)
    if (counts <= 0).any():
        raise ValueError("balanced softmax needs at least one training sample per class")
    return torch.log(counts / counts.sum())


def balanced_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, prior_log: torch.Tensor
                          ) -> torch.Tensor:
    """Per-sample balanced softmax (Ren et al. 2020): ``CE(logits + log prior, y)``."""
    return F.cross_entropy(logits + prior_log.to(logits), labels, reduction="none")


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, prior_log: torch.Tensor,
                        balanced_softmax_weight: float,
                        sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_i w_i [(1 - b) CE(z_i, y_i) + b BS(z_i, y_i)]``: b mixes balanced softmax into
    plain cross-entropy, w down-weights samples (synthetic ones, DiffuLT)."""
    per_sample = (1 - balanced_softmax_weight) * F.cross_entropy(logits, labels, reduction="none")
    if balanced_softmax_weight > 0:
        per_sample = per_sample + balanced_softmax_weight * balanced_softmax_loss(
            logits, labels, prior_log)
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.to(per_sample)
    return per_sample.mean()
