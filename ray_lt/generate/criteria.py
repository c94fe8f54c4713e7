"""Feedback criteria c(x, y) that guidance increases (docs/method.md §2), with what they need
beyond the classifier: per-class Gaussian statistics (hardness), an epistemic head (total
uncertainty) and, for data sets with class x context groups, a context head (the group
criteria). Every criterion returns one value per sample, shape (B,), and is differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

if TYPE_CHECKING:
    from ray_lt.train.models import Classifier

Covariance = Literal["full", "tied"]
Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
"""Starts one pass over the training set as (features (b, d), labels (b,)) batches."""
FULL_COVARIANCE_LIMIT = 2 * 1024**3


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
    ``1/2 (phi - mu_y)^T Sigma_y^-1 (phi - mu_y) + 1/2 log((2 pi)^d det Sigma_y)``, with
    ``Sigma_y = Sigma`` for every class in the tied form. ``stats`` must be on the features'
    device."""
    diff = features - stats.means[labels]
    if stats.covariance == "tied":
        mahalanobis = ((diff @ stats.precisions) * diff).sum(dim=-1)
        logdets = stats.logdets
    else:
        mahalanobis = torch.einsum("bi,bij,bj->b", diff, stats.precisions[labels], diff)
        logdets = stats.logdets[labels]
    return 0.5 * (mahalanobis + features.shape[-1] * math.log(2 * math.pi) + logdets)


def total_uncertainty(head_logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the ensemble's mean prediction, ``H(mean_k p_k)`` = aleatoric + epistemic
    (LTG); ``head_logits`` has shape (K, B, C)."""
    log_mean = (torch.logsumexp(F.log_softmax(head_logits, dim=-1), dim=0)
                - math.log(head_logits.shape[0]))
    return -(log_mean.exp() * log_mean).sum(dim=-1)


def target_group(logits: torch.Tensor, labels: torch.Tensor, context_logits: torch.Tensor,
                 contexts: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of the sample's class x context group, ``log p(y | x) + log q(a | x)``
    with q the context head: guidance toward the group asked for, also one absent from
    training, since the class and context heads each learnt their part from other groups."""
    return -(F.cross_entropy(logits, labels, reduction="none")
             + F.cross_entropy(context_logits, contexts, reduction="none"))


def group_entropy(logits: torch.Tensor, context_logits: torch.Tensor, contexts: torch.Tensor
                  ) -> torch.Tensor:
    """``H(p(. | x)) + log q(a | x)``: uncertain about the class while in its target context,
    so that class-entropy guidance does not buy its uncertainty by leaving the context."""
    return entropy(logits) - F.cross_entropy(context_logits, contexts, reduction="none")


@dataclass
class ClassStatistics:
    """Gaussians of the classifier embedding: class means (C, d) with either one covariance per
    class (``full``: precisions (C, d, d), covariance log-determinants (C,)) or one covariance
    shared by every class (``tied``: precision (d, d), log-determinant (1,))."""

    means: torch.Tensor
    precisions: torch.Tensor
    logdets: torch.Tensor

    def __post_init__(self) -> None:
        c, d = self.means.shape
        shapes = {"full": ((c, d, d), (c,)), "tied": ((d, d), (1,))}
        got = (tuple(self.precisions.shape), tuple(self.logdets.shape))
        if got not in shapes.values():
            raise ValueError(f"class statistics: means {tuple(self.means.shape)} need precisions "
                             f"({c}, {d}, {d}) and logdets ({c},) (full) or precisions "
                             f"({d}, {d}) and logdets (1,) (tied), got {got[0]} and {got[1]}")

    @property
    def covariance(self) -> Covariance:
        return "tied" if self.precisions.ndim == 2 else "full"

    def save(self, path: str | Path) -> None:
        save_file({"means": self.means.contiguous(), "precisions": self.precisions.contiguous(),
                   "logdets": self.logdets.contiguous()}, str(path),
                  metadata={"covariance": self.covariance})

    @classmethod
    def load(cls, path: str | Path) -> ClassStatistics:
        tensors = _load_tensors(path, ("means", "precisions", "logdets"))
        stats = cls(tensors["means"], tensors["precisions"], tensors["logdets"])
        stored = cls.stored_covariance(path)
        if stored != stats.covariance:
            raise ValueError(f"{path}: metadata says covariance {stored!r}, but the precisions "
                             f"{tuple(stats.precisions.shape)} are {stats.covariance!r}")
        return stats

    @staticmethod
    def stored_covariance(path: str | Path) -> str | None:
        """The form saved at ``path`` from its metadata alone (``full`` for files written before
        the form was recorded), or None when there is no file."""
        if not Path(path).is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("covariance", "full")


def _load_tensors(path: str | Path, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist; it is written when the baseline "
                                "classifier is trained")
    tensors = load_file(str(path))
    missing = sorted(set(keys) - set(tensors))
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}; it holds {sorted(tensors)}")
    return tensors


def check_covariance_size(num_classes: int, dim: int, covariance: Covariance) -> None:
    """Refuse the ``full`` form when its float32 precisions, ``C d^2 4`` bytes, exceed
    FULL_COVARIANCE_LIMIT: every sampler would hold them on its GPU."""
    if covariance not in ("full", "tied"):
        raise ValueError(f"synthesis.hardness_covariance must be 'full' or 'tied', got "
                         f"{covariance!r}")
    size = num_classes * dim**2 * 4
    if covariance == "full" and size > FULL_COVARIANCE_LIMIT:
        raise ValueError(
            f"synthesis.hardness_covariance: 'full' stores {num_classes} precisions of "
            f"{dim} x {dim} float32 = {size / 2**30:.1f} GiB on every sampler, more than "
            f"{FULL_COVARIANCE_LIMIT / 2**30:.0f} GiB; set synthesis.hardness_covariance: tied "
            f"(one shared covariance, {dim**2 * 4 / 2**30:.3f} GiB)")


def _checked(batches: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    dim = None
    for features, labels in batches:
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels).astype(np.int64)
        if x.ndim != 2 or y.shape != (x.shape[0],) or dim not in (None, x.shape[1]):
            raise ValueError(f"features must be (N, d) and labels (N,) with one d, got "
                             f"{x.shape} and {y.shape}" + (f" after d = {dim}" if dim else ""))
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
        dim = x.shape[1]
        if y.size:
            yield x, y


def _by_class(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The classes present in a batch and the rows of each."""
    order = np.argsort(y, kind="stable")
    ys = y[order]
    starts = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
    return ys[starts], np.split(x[order], starts[1:])


def ledoit_wolf(scatter: np.ndarray, fourth: float, n: int) -> np.ndarray:
    """Ledoit-Wolf covariance from the centred scatter ``sum_i r_i r_i^T`` and fourth moment
    ``sum_i ||r_i||^4`` of n rows (sklearn's estimator): ``S = scatter / n`` shrunk towards
    ``mu I`` (``mu = tr S / d``) by ``min(beta, delta) / delta`` with
    ``delta = ||S - mu I||_F^2 / d``, ``beta = (fourth / n - ||S||_F^2) / (d n)``."""
    d = scatter.shape[0]
    s = scatter / n
    if d == 1:
        return s
    trace = float(np.trace(s))
    mu = trace / d
    frobenius = float((s**2).sum())
    delta = (frobenius - 2 * mu * trace + d * mu**2) / d
    beta = min((fourth / n - frobenius) / (d * n), delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    cov = (1 - shrinkage) * s
    cov.flat[::d + 1] += shrinkage * mu
    return cov


def _precision(cov: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    chol = torch.linalg.cholesky(torch.from_numpy(cov))
    return torch.cholesky_inverse(chol).float(), 2 * torch.log(torch.diagonal(chol)).sum()


def fit_class_statistics_streamed(batches: Batches, num_classes: int,
                                  covariance: Covariance = "full",
                                  variance_floor: float = 1e-3) -> ClassStatistics:
    """Class means and Ledoit-Wolf covariances from two passes over the batches: counts and
    sums give ``mu_c``; the centred scatter and ``sum ||x_i - mu_{y_i}||^4`` (per class for
    ``full``, pooled over the within-class residuals of all N rows for ``tied``) give the
    covariances exactly. A class of one sample gets the pooled within-class variance times the
    identity (``full``); every covariance gets ``variance_floor * pooled variance`` on its
    diagonal so that it is positive definite."""
    counts, sums = np.zeros(num_classes, dtype=np.int64), None
    for x, y in _checked(batches(), num_classes):
        if sums is None:
            check_covariance_size(num_classes, x.shape[1], covariance)
            sums = np.zeros((num_classes, x.shape[1]))
        counts += np.bincount(y, minlength=num_classes)
        present, rows = _by_class(x, y)
        sums[present] += np.stack([r.sum(axis=0) for r in rows])
    if sums is None or (counts == 0).any():
        empty = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"classes {empty} have no training samples; every class needs at "
                         "least one for its statistics")
    d = sums.shape[1]
    means = sums / counts[:, None]
    groups = num_classes if covariance == "full" else 1
    scatter, fourth = np.zeros((groups, d, d)), np.zeros(groups)
    for x, y in _checked(batches(), num_classes):
        r = x - means[y]
        if covariance == "tied":
            scatter[0] += r.T @ r
            fourth[0] += (np.einsum("ij,ij->i", r, r) ** 2).sum()
            continue
        for c, rc in zip(*_by_class(r, y), strict=True):
            scatter[c] += rc.T @ rc
            fourth[c] += (np.einsum("ij,ij->i", rc, rc) ** 2).sum()
    n, dof = int(counts.sum()), int((counts - 1).sum())
    if dof > 0:
        pooled = np.trace(scatter, axis1=1, axis2=2).sum() / (dof * d)
    else:
        pooled = (counts * ((means - sums.sum(axis=0) / n) ** 2).sum(axis=1)).sum() / (n * d)
    pooled = pooled if pooled > 0 else 1.0
    floor = variance_floor * pooled * np.eye(d)
    if covariance == "tied":
        precision, logdet = _precision(ledoit_wolf(scatter[0], fourth[0], n) + floor)
        return ClassStatistics(torch.from_numpy(means).float(), precision,
                               logdet.reshape(1).float())
    precisions = torch.empty(num_classes, d, d)
    logdets = torch.empty(num_classes)
    for c in range(num_classes):
        cov = (ledoit_wolf(scatter[c], fourth[c], counts[c]) if counts[c] > 1
               else pooled * np.eye(d))
        precisions[c], logdets[c] = _precision(cov + floor)
    return ClassStatistics(torch.from_numpy(means).float(), precisions, logdets)


def fit_class_statistics(features: np.ndarray, labels: np.ndarray, num_classes: int,
                         variance_floor: float = 1e-3, covariance: Covariance = "full"
                         ) -> ClassStatistics:
    """``fit_class_statistics_streamed`` over in-memory arrays, as one batch."""
    return fit_class_statistics_streamed(lambda: [(features, labels)], num_classes, covariance,
                                         variance_floor)


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


_POISSON_CDF = np.cumsum([math.exp(-1) / math.factorial(j) for j in range(20)])


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def bootstrap_weights(seed: int, rows: np.ndarray, k: int) -> np.ndarray:
    """Weights ``w_ki ~ Poisson(1)`` of rows i (positions in the training set) for heads k,
    shape (len(rows), k): the online bootstrap (Oza and Russell 2001), a hash of
    (seed, row, head) so that no N-sized resample index is kept."""
    keys = np.asarray(rows, dtype=np.uint64)[:, None] * np.uint64(k) + np.arange(k, dtype=np.uint64)
    bits = _splitmix64(keys ^ _splitmix64(np.array([seed], dtype=np.uint64)))
    uniform = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.searchsorted(_POISSON_CDF, uniform, side="right").astype(np.float32)


def _minibatches(batches: Batches, k: int, seed: int, batch_size: int, buffer_rows: int,
                 gen: torch.Generator, bootstrap: bool = True
                 ) -> Iterator[tuple[torch.Tensor, ...]]:
    """One pass as minibatches (features, labels, bootstrap weights (b, k), all ones without
    ``bootstrap``), shuffled within a buffer of at least ``buffer_rows`` rows."""
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    held = position = 0
    stream = iter(batches())
    while True:
        chunk = next(stream, None)
        if chunk is not None:
            x, y = np.asarray(chunk[0], dtype=np.float32), np.asarray(chunk[1]).astype(np.int64)
            w = (bootstrap_weights(seed, np.arange(position, position + len(y)), k)
                 if bootstrap else np.ones((len(y), k), dtype=np.float32))
            pending.append((x, y, w))
            position, held = position + len(y), held + len(y)
            if held < buffer_rows:
                continue
        if not held:
            return
        x, y, w = (torch.from_numpy(np.concatenate(parts)) for parts in zip(*pending, strict=True))
        order = torch.randperm(held, generator=gen)
        emit = held if chunk is None else held - held % batch_size
        for start in range(0, emit, batch_size):
            rows = order[start:min(start + batch_size, emit)]
            yield x[rows], y[rows], w[rows]
        rest = order[emit:]
        pending, held = [(x[rest].numpy(), y[rest].numpy(), w[rest].numpy())], len(rest)
        if chunk is None:
            return


def fit_epistemic_head_streamed(batches: Batches, num_classes: int, k: int = 5,
                                epochs: int = 30, lr: float = 1e-2, seed: int = 0,
                                batch_size: int = 256, buffer_rows: int = 16384,
                                bootstrap: bool = True,
                                device: str | torch.device = "cpu") -> EpistemicHead:
    """Train K linear heads with cross-entropy (Adam on ``device``), each from its own random
    initialisation on its own bootstrap of the rows (loss ``sum_i w_ki CE_ki``, weights from
    ``bootstrap_weights``; every w = 1 without ``bootstrap``: the context head, K = 1); each
    epoch streams the batches through a seeded shuffle buffer. The initialisation, shuffles
    and weights are drawn on the CPU, so given ``seed`` and the order of the batches the fit is
    deterministic on each device (a GPU's float sums differ from the CPU's in the last bits).
    Returns the head on the CPU."""
    first = next(iter(batches()), None)
    if first is None:
        raise ValueError("epistemic head: no training samples")
    dim = np.asarray(first[0]).shape[1]
    gen = torch.Generator().manual_seed(seed)
    head = EpistemicHead(dim, num_classes, k)
    bound = 1 / math.sqrt(dim)  # nn.Linear's default initialisation, one draw per head
    with torch.no_grad():
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.uniform_(-bound, bound, generator=gen)
    head.to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y, w in _minibatches(batches, k, seed, batch_size, buffer_rows, gen, bootstrap):
            x, y, w = x.to(device), y.to(device), w.to(device)
            logits = head(x)
            ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none")
            step_loss = (ce.view(k, -1) * w.T).sum() / ce.numel()
            optimizer.zero_grad()
            step_loss.backward()
            optimizer.step()
    return head.cpu().requires_grad_(False)


def fit_epistemic_head(features: np.ndarray, labels: np.ndarray, num_classes: int, k: int = 5,
                       epochs: int = 30, lr: float = 1e-2, seed: int = 0,
                       batch_size: int = 256) -> EpistemicHead:
    """``fit_epistemic_head_streamed`` over in-memory arrays, as one batch."""
    return fit_epistemic_head_streamed(lambda: [(features, labels)], num_classes, k, epochs, lr,
                                       seed, batch_size)


@dataclass
class Batch:
    """What the criteria of one batch are computed from; the embedding is computed once."""

    features: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    head_logits: torch.Tensor | None
    statistics: ClassStatistics | None
    context_logits: torch.Tensor | None = None
    contexts: torch.Tensor | None = None


@dataclass(frozen=True)
class Criterion:
    """A criterion by name: the extra piece it needs (if any) and how it scores a batch."""

    needs: Literal["statistics", "epistemic_head", "context_head"] | None
    score: Callable[[Batch], torch.Tensor]


CRITERIA: dict[str, Criterion] = {
    "entropy": Criterion(None, lambda b: entropy(b.logits)),
    "loss": Criterion(None, lambda b: loss(b.logits, b.labels)),
    "hardness": Criterion("statistics", lambda b: hardness(b.features, b.labels, b.statistics)),
    "total_uncertainty": Criterion("epistemic_head", lambda b: total_uncertainty(b.head_logits)),
    "target_group": Criterion("context_head", lambda b: target_group(
        b.logits, b.labels, b.context_logits, b.contexts)),
    "group_entropy": Criterion("context_head", lambda b: group_entropy(
        b.logits, b.context_logits, b.contexts)),
}
GROUP_CRITERIA = tuple(n for n, c in CRITERIA.items() if c.needs == "context_head")


def _check_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in CRITERIA]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"criterion: need distinct names from {sorted(CRITERIA)}, got "
                         f"{list(names)}")


class CriterionScorer(nn.Module):
    """``c_i(x, y)`` for a batch where sample i uses criterion ``criteria[criterion_ids[i]]``
    (a mixture when several are given). The classifier is frozen and kept in eval mode;
    ``inputs="features"`` scores feature vectors (feature-space generators) without ``embed``.
    The group criteria read each sample's context, ``group % contexts``, from its group id;
    ``context_head`` (K = 1) predicts the context from the classifier's embedding."""

    def __init__(self, classifier: Classifier, criteria: Sequence[str],
                 statistics: ClassStatistics | None = None,
                 epistemic_head: EpistemicHead | None = None,
                 inputs: Literal["images", "features"] = "images",
                 context_head: EpistemicHead | None = None):
        super().__init__()
        _check_names(criteria)
        available = {"statistics": statistics, "epistemic_head": epistemic_head,
                     "context_head": context_head}
        for name in criteria:
            needs = CRITERIA[name].needs
            if needs is not None and available[needs] is None:
                raise ValueError(f"criterion {name!r} needs {needs}, but none was given")
        if inputs not in ("images", "features"):
            raise ValueError(f"inputs must be 'images' or 'features', got {inputs!r}")
        self.classifier = classifier
        self.criteria = list(criteria)
        self.epistemic_head = epistemic_head
        self.context_head = context_head if any(
            CRITERIA[n].needs == "context_head" for n in criteria) else None
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

    def forward(self, images: torch.Tensor, labels: torch.Tensor, criterion_ids: torch.Tensor,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.classifier.head.weight.dtype
        x = images.to(dtype)
        features = self.classifier.embed(x) if self.inputs == "images" else x
        context_logits = contexts = None
        if self.context_head is not None:
            if groups is None or (groups < 0).any():
                raise ValueError(f"criteria {[n for n in self.criteria if n in GROUP_CRITERIA]} "
                                 "need the class x context group of every sample")
            context_logits = self.context_head(features)[0]
            contexts = groups.to(features.device).long() % context_logits.shape[-1]
        batch = Batch(
            features=features, labels=labels, logits=self.classifier.head(features),
            head_logits=(self.epistemic_head(features) if self.epistemic_head is not None
                         else None),
            statistics=(ClassStatistics(self.means, self.precisions, self.logdets)
                        if self.has_statistics else None),
            context_logits=context_logits, contexts=contexts)
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
