"""Feedback criteria c(x, y) that guidance increases (METHOD.md section 2), with what they need
beyond the classifier: per-class Gaussian statistics (hardness) and an epistemic head (total
uncertainty). Every criterion returns one value per sample, shape (B,), and is differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sklearn.covariance import LedoitWolf
from torch import nn

if TYPE_CHECKING:
    from ray_lt.train.models import Classifier


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Predictive entropy ``H(p) = -sum_k p_k log p_k`` with ``p = softmax(logits)``."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the target label, ``-log p(y | x)``."""
    return F.cross_entropy(logits, labels, reduction="none")


def hardness(features: torch.Tensor, labels: torch.Tensor, stats: ClassStatistics
             ) -> torch.Tensor:
    """Negative Gaussian log-likelihood of the embedding under its class (Sehwag et al. 2022):
    ``1/2 (phi - mu_y)^T Sigma_y^-1 (phi - mu_y) + 1/2 log((2 pi)^d det Sigma_y)``.
    ``stats`` must be on the features' device."""
    diff = features - stats.means[labels]
    mahalanobis = torch.einsum("bi,bij,bj->b", diff, stats.precisions[labels], diff)
    return 0.5 * (mahalanobis + features.shape[-1] * math.log(2 * math.pi)
                  + stats.logdets[labels])


def total_uncertainty(head_logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the ensemble's mean prediction, ``H(mean_k p_k)`` = aleatoric + epistemic
    (LTG); ``head_logits`` has shape (K, B, C)."""
    log_mean = (torch.logsumexp(F.log_softmax(head_logits, dim=-1), dim=0)
                - math.log(head_logits.shape[0]))
    return -(log_mean.exp() * log_mean).sum(dim=-1)


@dataclass
class ClassStatistics:
    """Per-class Gaussians of the classifier embedding: means (C, d), precisions (C, d, d),
    log-determinants of the covariances (C,)."""

    means: torch.Tensor
    precisions: torch.Tensor
    logdets: torch.Tensor

    def __post_init__(self) -> None:
        c, d = self.means.shape
        if self.precisions.shape != (c, d, d) or self.logdets.shape != (c,):
            raise ValueError(f"class statistics: means {tuple(self.means.shape)} need precisions "
                             f"({c}, {d}, {d}) and logdets ({c},), got "
                             f"{tuple(self.precisions.shape)} and {tuple(self.logdets.shape)}")

    def save(self, path: str | Path) -> None:
        save_file({"means": self.means.contiguous(), "precisions": self.precisions.contiguous(),
                   "logdets": self.logdets.contiguous()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> ClassStatistics:
        tensors = _load_tensors(path, ("means", "precisions", "logdets"))
        return cls(tensors["means"], tensors["precisions"], tensors["logdets"])


def _load_tensors(path: str | Path, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist; it is written when the baseline "
                                "classifier is trained")
    tensors = load_file(str(path))
    missing = sorted(set(keys) - set(tensors))
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}; it holds {sorted(tensors)}")
    return tensors


def fit_class_statistics(features: np.ndarray, labels: np.ndarray, num_classes: int,
                         variance_floor: float = 1e-3) -> ClassStatistics:
    """Ledoit-Wolf mean and covariance of each class's embeddings. A class of one sample gets
    the pooled within-class variance times the identity; every covariance gets
    ``variance_floor * pooled variance`` on its diagonal so that it is positive definite."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features must be (N, d) and labels (N,), got {x.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    counts = np.bincount(y, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"classes {np.flatnonzero(counts == 0).tolist()} have no training "
                         "samples; every class needs at least one for its statistics")
    d = x.shape[1]
    rows = [x[y == c] for c in range(num_classes)]
    means = np.stack([r.mean(axis=0) for r in rows])
    squares = sum(((r - m) ** 2).sum() for r, m in zip(rows, means, strict=True))
    dof = int((counts - 1).sum())
    pooled = squares / (dof * d) if dof > 0 else float(x.var(axis=0).mean())
    pooled = pooled if pooled > 0 else 1.0
    identity = np.eye(d)
    precisions, logdets = [], []
    for r in rows:
        cov = LedoitWolf().fit(r).covariance_ if len(r) > 1 else pooled * identity
        cov = cov + variance_floor * pooled * identity
        chol = torch.linalg.cholesky(torch.from_numpy(cov))
        precisions.append(torch.cholesky_inverse(chol).float())
        logdets.append(2 * torch.log(torch.diagonal(chol)).sum())
    return ClassStatistics(torch.from_numpy(means).float(), torch.stack(precisions),
                           torch.stack(logdets).float())


class EpistemicHead(nn.Module):
    """K linear heads on frozen classifier features; ``forward`` gives logits (K, B, C)."""

    def __init__(self, dim: int, num_classes: int, k: int = 5):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(k, num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(k, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bd,kcd->kbc", features, self.weight) + self.bias[:, None, :]

    def save(self, path: str | Path) -> None:
        k, classes, dim = self.weight.shape
        save_file({"weight": self.weight.detach().contiguous(),
                   "bias": self.bias.detach().contiguous()}, str(path),
                  metadata={"k": str(k), "dim": str(dim), "classes": str(classes)})

    @classmethod
    def load(cls, path: str | Path) -> EpistemicHead:
        tensors = _load_tensors(path, ("weight", "bias"))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        try:
            k, dim, classes = int(meta["k"]), int(meta["dim"]), int(meta["classes"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: metadata needs integer k, dim and classes, got {meta}"
                             ) from e
        head = cls(dim, classes, k)
        head.load_state_dict(tensors)
        return head


def fit_epistemic_head(features: np.ndarray, labels: np.ndarray, num_classes: int, k: int = 5,
                       epochs: int = 30, lr: float = 1e-2, seed: int = 0,
                       batch_size: int = 256) -> EpistemicHead:
    """Train K linear heads with cross-entropy (Adam, CPU), each from its own random
    initialisation on its own bootstrap resample of the rows; deterministic given ``seed``."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n, dim = x.shape
    gen = torch.Generator().manual_seed(seed)
    head = EpistemicHead(dim, num_classes, k)
    bound = 1 / math.sqrt(dim)  # nn.Linear's default initialisation, one draw per head
    with torch.no_grad():
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.uniform_(-bound, bound, generator=gen)
    rows = torch.randint(0, n, (k, n), generator=gen)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.argsort(torch.rand(k, n, generator=gen), dim=1)
        epoch_rows = rows.gather(1, order)
        for start in range(0, n, batch_size):
            batch = epoch_rows[:, start:start + batch_size]
            logits = torch.einsum("kbd,kcd->kbc", x[batch], head.weight) + head.bias[:, None]
            step_loss = F.cross_entropy(logits.flatten(0, 1), y[batch].flatten())
            optimizer.zero_grad()
            step_loss.backward()
            optimizer.step()
    return head.requires_grad_(False)


@dataclass
class Batch:
    """What the criteria of one batch are computed from; the embedding is computed once."""

    features: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    head_logits: torch.Tensor | None
    statistics: ClassStatistics | None


@dataclass(frozen=True)
class Criterion:
    """A criterion by name: the extra piece it needs (if any) and how it scores a batch."""

    needs: Literal["statistics", "epistemic_head"] | None
    score: Callable[[Batch], torch.Tensor]


CRITERIA: dict[str, Criterion] = {
    "entropy": Criterion(None, lambda b: entropy(b.logits)),
    "loss": Criterion(None, lambda b: loss(b.logits, b.labels)),
    "hardness": Criterion("statistics", lambda b: hardness(b.features, b.labels, b.statistics)),
    "total_uncertainty": Criterion("epistemic_head", lambda b: total_uncertainty(b.head_logits)),
}


def _check_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in CRITERIA]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"criterion: need distinct names from {sorted(CRITERIA)}, got "
                         f"{list(names)}")


class CriterionScorer(nn.Module):
    """``c_i(x, y)`` for a batch where sample i uses criterion ``criteria[criterion_ids[i]]``
    (a mixture when several are given). The classifier is frozen and kept in eval mode;
    ``inputs="features"`` scores feature vectors (feature-space generators) without ``embed``."""

    def __init__(self, classifier: Classifier, criteria: Sequence[str],
                 statistics: ClassStatistics | None = None,
                 epistemic_head: EpistemicHead | None = None,
                 inputs: Literal["images", "features"] = "images"):
        super().__init__()
        _check_names(criteria)
        available = {"statistics": statistics, "epistemic_head": epistemic_head}
        for name in criteria:
            needs = CRITERIA[name].needs
            if needs is not None and available[needs] is None:
                raise ValueError(f"criterion {name!r} needs {needs}, but none was given")
        if inputs not in ("images", "features"):
            raise ValueError(f"inputs must be 'images' or 'features', got {inputs!r}")
        self.classifier = classifier
        self.criteria = list(criteria)
        self.epistemic_head = epistemic_head
        self.inputs = inputs
        self.has_statistics = statistics is not None
        if statistics is not None:
            self.register_buffer("means", statistics.means)
            self.register_buffer("precisions", statistics.precisions)
            self.register_buffer("logdets", statistics.logdets)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> CriterionScorer:
        # BatchNorm in train mode would score a batch by its own statistics: stay in eval.
        return super().train(False)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, criterion_ids: torch.Tensor
                ) -> torch.Tensor:
        dtype = self.classifier.head.weight.dtype
        x = images.to(dtype)
        features = self.classifier.embed(x) if self.inputs == "images" else x
        batch = Batch(
            features=features, labels=labels, logits=self.classifier.head(features),
            head_logits=(self.epistemic_head(features) if self.epistemic_head is not None
                         else None),
            statistics=(ClassStatistics(self.means, self.precisions, self.logdets)
                        if self.has_statistics else None))
        values = torch.stack([CRITERIA[name].score(batch) for name in self.criteria])
        return values.gather(0, criterion_ids.to(values.device).view(1, -1)).squeeze(0)


def draw_criteria(names: Sequence[str], probabilities: Sequence[float], n: int,
                  generator: torch.Generator) -> torch.Tensor:
    """Per-sample indices into ``names``, drawn i.i.d. from ``probabilities`` (the mixture)."""
    _check_names(names)
    p = torch.as_tensor(list(probabilities), dtype=torch.float64)
    if p.shape != (len(names),):
        raise ValueError(f"criterion probabilities: need {len(names)} values, one per name in "
                         f"{list(names)}, got {p.tolist()}")
    if not torch.isfinite(p).all() or (p < 0).any() or abs(p.sum().item() - 1) > 1e-6:
        raise ValueError(f"criterion probabilities must be non-negative and sum to 1, got "
                         f"{p.tolist()} (sum {p.sum().item():.8g})")
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.multinomial(p, n, replacement=True, generator=generator)
