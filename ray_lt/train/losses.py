"""Training losses (docs/method.md §5) and the group objectives for data sets with
class x context groups: per-group reweighting and online group DRO (Sagawa et al. 2020)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
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


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, prior_log: torch.Tensor,
                    balanced_softmax_weight: float,
                    sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``w_i [(1 - b) CE(z_i, y_i) + b BS(z_i, y_i)]`` per sample, shape (B,): b mixes balanced
    softmax into plain cross-entropy, w down-weights samples (synthetic ones, DiffuLT)."""
    per_sample = (1 - balanced_softmax_weight) * F.cross_entropy(logits, labels, reduction="none")
    if balanced_softmax_weight > 0:
        per_sample = per_sample + balanced_softmax_weight * balanced_softmax_loss(
            logits, labels, prior_log)
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.to(per_sample)
    return per_sample


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, prior_log: torch.Tensor,
                        balanced_softmax_weight: float,
                        sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of ``per_sample_loss``: the ERM objective."""
    return per_sample_loss(logits, labels, prior_log, balanced_softmax_weight,
                           sample_weight).mean()


def group_weights(group_counts: np.ndarray | list[int]) -> torch.Tensor:
    """Loss weight of a training row of group g, ``N / (G n_g)`` over the G groups that have
    rows (0 for the empty ones): in expectation the same objective as group-balanced
    sampling, and a mean weight of 1 over the training set."""
    counts = torch.as_tensor(np.asarray(group_counts), dtype=torch.float32)
    present = counts > 0
    if not present.any():
        raise ValueError("group weights: no group has a training row")
    weights = torch.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


class GroupDRO:
    """Online group DRO (Sagawa et al. 2020, Algorithm 1): weights q over the groups, updated
    each step by ``q_g <- q_g exp(eta L_g)`` from the batch's mean loss L_g of group g, then
    normalised; the step's loss is ``sum_g q_g L_g``, so training minimises the loss of the
    worst groups. Across DDP workers the group sums and counts are all-reduced: every worker
    keeps the same q, and the averaged gradient is that of the global batch."""

    def __init__(self, num_groups: int, step_size: float, device: torch.device | str = "cpu"):
        if num_groups < 1:
            raise ValueError("group DRO needs a data set with groups")
        self.step_size = float(step_size)
        self.q = torch.full((num_groups,), 1.0 / num_groups, device=device)

    def loss(self, per_sample: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        groups = groups.to(per_sample.device).long()
        if (groups < 0).any() or (groups >= len(self.q)).any():
            raise ValueError(f"group DRO: group ids must lie in [0, {len(self.q)}), got "
                             f"[{int(groups.min())}, {int(groups.max())}]")
        sums = torch.zeros_like(self.q).index_add(0, groups, per_sample)
        counts = torch.bincount(groups, minlength=len(self.q)).to(self.q)
        totals, world = torch.stack([sums.detach(), counts]), 1
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            dist.all_reduce(totals)
        seen = totals[1] > 0
        means = torch.where(seen, totals[0] / totals[1].clamp_min(1), 0.0)
        self.q = self.q * torch.exp(self.step_size * means)
        self.q = self.q / self.q.sum()
        # This worker's share of sum_g q_g (global sum_g / global n_g); DDP averages the shares.
        return world * (self.q * sums / totals[1].clamp_min(1)).sum()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"q": self.q.detach().cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["q"].shape != self.q.shape:
            raise ValueError(f"group DRO state: {len(state['q'])} groups saved, "
                             f"{len(self.q)} expected")
        self.q = state["q"].to(self.q)
