"""Synthetic-data quality on classifier features: FID, and density and coverage (Naeem et al.
2020, k-nearest-neighbour balls around the real samples)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import linalg


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID on these features):
    ``|mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))``."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("the Frechet distance needs at least 2 samples on each side")
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r = np.atleast_2d(np.cov(real, rowvar=False))
    cov_f = np.atleast_2d(np.cov(fake, rowvar=False))
    root = linalg.sqrtm(cov_r @ cov_f)
    if not np.isfinite(root).all():  # near-singular product: regularise both sides
        eps = 1e-6 * np.eye(len(cov_r))
        root = linalg.sqrtm((cov_r + eps) @ (cov_f + eps))
    value = ((mu_r - mu_f) ** 2).sum() + np.trace(cov_r) + np.trace(cov_f) \
        - 2.0 * np.trace(root.real)
    return float(max(value, 0.0))


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.clip(sq, 0.0, None))


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> tuple[float, float]:
    """Density: mean number of real k-NN balls holding each fake sample, divided by k.
    Coverage: fraction of real samples whose k-NN ball holds at least one fake sample."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(real) <= k:
        raise ValueError(f"density/coverage with k={k} needs more than {k} real samples")
    within = _distances(real, real)
    radius = np.sort(within, axis=1)[:, k]  # column 0 is the sample itself
    inside = _distances(real, fake) <= radius[:, None]  # (real, fake)
    return float(inside.sum() / (k * len(fake))), float(inside.any(axis=1).mean())


def matched_reference(real_labels: np.ndarray, fake_labels: np.ndarray,
                      seed: int = 0) -> np.ndarray:
    """Indices of real rows drawn to the fake rows' class proportions (without replacement,
    capped by what each class has), so that a class-skewed synthetic set is compared with real
    images of the same classes rather than with the balanced test set as a whole."""
    rng = np.random.default_rng(seed)
    picked = []
    classes, wanted = np.unique(fake_labels, return_counts=True)
    for c, n in zip(classes, wanted, strict=True):
        rows = np.flatnonzero(real_labels == c)
        picked.append(rng.choice(rows, size=min(n, len(rows)), replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def quality_table(real: np.ndarray, real_labels: np.ndarray, fake: np.ndarray,
                  fake_labels: np.ndarray, criteria: np.ndarray, k: int = 5,
                  seed: int = 0) -> pd.DataFrame:
    """FID, density and coverage per criterion and for all synthetic rows together, each
    against real rows matched to that subset's class proportions."""
    rows = []
    subsets = [("all", np.ones(len(fake), bool))] + [
        (str(c), criteria == c) for c in sorted(set(criteria.tolist()))]
    if len(subsets) == 2:
        subsets = subsets[:1]  # one criterion: "all" says it
    for name, mask in subsets:
        ref = matched_reference(real_labels, fake_labels[mask], seed)
        entry = {"criterion": name, "samples": int(mask.sum()), "real": int(len(ref)),
                 "fid": np.nan, "density": np.nan, "coverage": np.nan}
        if mask.sum() >= 2 and len(ref) > k:
            entry["fid"] = frechet_distance(real[ref], fake[mask])
            entry["density"], entry["coverage"] = density_coverage(real[ref], fake[mask], k)
        rows.append(entry)
    return pd.DataFrame(rows)
