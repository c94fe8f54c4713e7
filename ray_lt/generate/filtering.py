"""DiffuLT-style filtering of generated samples with the classifier trained on real data: drop
those it confidently puts in another class, or whose features lie far from their class's real
features (docs/method.md §7)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ray_lt.atomic import atomic_file, write_text_atomic
from ray_lt.errors import ConfigError

if TYPE_CHECKING:
    from ray_lt.config import Config
    from ray_lt.data import LongTailData

REASONS = ("confidently_other_class", "far_from_class")
"""Why a sample is dropped; a kept sample's reason is ``""``."""


def class_means(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean real feature vector per class, (C, D); NaN rows for classes without samples."""
    features, labels = _features_and_labels(features, labels, num_classes)
    sums = np.zeros((num_classes, features.shape[1]))
    np.add.at(sums, labels, features)
    counts = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def class_distance_quantiles(features: np.ndarray, labels: np.ndarray, num_classes: int,
                             q: float, min_samples: int = 5) -> np.ndarray:
    """Per class, the ``q``-quantile of the real samples' Euclidean distances to their class mean,
    (C,): the radius beyond which a synthetic sample counts as far from its class.

    Classes with fewer than ``min_samples`` real samples (a few-shot class's own quantile is
    meaningless) take the quantile pooled over all classes' distances.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples!r}")
    means = class_means(features, labels, num_classes)
    features, labels = _features_and_labels(features, labels, num_classes)
    if len(features) == 0:
        raise ValueError("no real features to take distance quantiles of")
    distances = np.linalg.norm(features - means[labels], axis=1)
    quantiles = np.full(num_classes, np.quantile(distances, q))
    counts = np.bincount(labels, minlength=num_classes)
    for c in np.flatnonzero(counts >= min_samples):
        quantiles[c] = np.quantile(distances[labels == c], q)
    return quantiles


def filter_mask(pred: np.ndarray, confidence: np.ndarray, labels: np.ndarray,
                features: np.ndarray | None, class_means: np.ndarray | None,
                real_distance_quantiles: np.ndarray | None,
                confidence_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Which generated samples to keep, and why each dropped one goes.

    A sample is dropped as ``"confidently_other_class"`` when the real-data classifier predicts
    another class with ``confidence >= confidence_threshold``; otherwise, when ``features`` are
    given, as ``"far_from_class"`` when its distance to ``class_means[label]`` exceeds
    ``real_distance_quantiles[label]`` (see :func:`class_distance_quantiles`).
    Returns ``(keep: bool (N,), reason: str (N,))`` with reason ``""`` for kept samples.
    """
    labels = np.asarray(labels)
    pred, confidence = np.asarray(pred), np.asarray(confidence, dtype=float)
    if labels.ndim != 1 or pred.shape != labels.shape or confidence.shape != labels.shape:
        raise ValueError(f"pred {pred.shape}, confidence {confidence.shape} and labels "
                         f"{labels.shape} must be 1-D arrays of the same length")
    if not 0 < confidence_threshold <= 1:
        raise ValueError(f"confidence_threshold must be in (0, 1], got {confidence_threshold!r}")
    if not np.all((confidence >= 0) & (confidence <= 1)):
        raise ValueError("confidence must hold probabilities in [0, 1]")
    reason = np.full(len(labels), "", dtype=f"<U{max(map(len, REASONS))}")
    far = np.zeros(len(labels), dtype=bool)
    if features is not None:
        if class_means is None or real_distance_quantiles is None:
            raise ValueError("features given without class_means and real_distance_quantiles; "
                             "compute them on the real training features")
        means = np.asarray(class_means, dtype=float)
        radius = np.asarray(real_distance_quantiles, dtype=float)
        features, labels = _features_and_labels(features, labels, len(means))
        if means.ndim != 2 or means.shape[1] != features.shape[1] or radius.shape != (len(means),):
            raise ValueError(f"class_means {means.shape} must be (C, {features.shape[1]}) and "
                             f"real_distance_quantiles {radius.shape} must be (C,)")
        # NaN means or radii (classes without real samples) compare False: such samples stay.
        far = np.linalg.norm(features - means[labels], axis=1) > radius[labels]
    reason[far] = "far_from_class"
    reason[(pred != labels) & (confidence >= confidence_threshold)] = "confidently_other_class"
    return reason == "", reason


def drop_report(labels: np.ndarray, keep: np.ndarray, reasons: np.ndarray,
                num_classes: int) -> pd.DataFrame:
    """One row per class: ``label, generated, kept, dropped`` and the drops per reason."""
    labels, keep, reasons = np.asarray(labels), np.asarray(keep, dtype=bool), np.asarray(reasons)
    if not labels.shape == keep.shape == reasons.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape}, keep {keep.shape} and reasons {reasons.shape} "
                         "must be 1-D arrays of the same length")
    labels = _checked_labels(labels, num_classes)
    unknown = set(reasons.tolist()) - {"", *REASONS}
    if unknown:
        raise ValueError(f"unknown reasons {sorted(unknown)}; expected '' or one of {REASONS}")
    if np.any(keep != (reasons == "")):
        raise ValueError("keep and reasons disagree: a row is kept exactly when its reason is ''")

    def per_class(mask: np.ndarray) -> np.ndarray:
        return np.bincount(labels[mask], minlength=num_classes)

    generated, kept = per_class(np.ones(len(labels), dtype=bool)), per_class(keep)
    return pd.DataFrame({"label": np.arange(num_classes), "generated": generated, "kept": kept,
                         "dropped": generated - kept,
                         **{r: per_class(reasons == r) for r in REASONS}})


def _features_and_labels(features: np.ndarray, labels: np.ndarray,
                         num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=float)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.shape != (len(features),):
        raise ValueError(f"features must be (N, D) and labels (N,), got {features.shape} and "
                         f"{labels.shape}")
    return features, _checked_labels(labels, num_classes)


def _checked_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
    if len(labels) and (not np.issubdtype(labels.dtype, np.integer)
                        or labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be integers in [0, {num_classes}), got "
                         f"{labels.dtype} in [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def filter_synthetic(run_dir: Path, data: LongTailData, cfg: Config) -> pd.DataFrame:
    """DiffuLT filtering with the real-data classifier: record a keep/drop verdict per sample
    (``filter.parquet``) and the drops per class (``filter_report.csv``); returns the report."""
    from ray_lt.evaluate.predict import predict
    from ray_lt.generate.statistics import load_training_features
    from ray_lt.generate.synthetic import FILTER_FILE, SYNTHETIC_DIR, load_synthetic

    f = cfg.synthesis.filter
    if cfg.generator.OUTPUTS == "features":
        raise ConfigError(f"synthesis.filter.enabled: filtering works on images; the "
                          f"{cfg.generator.kind} generator writes feature vectors")
    run_dir = Path(run_dir)
    out = run_dir / SYNTHETIC_DIR
    classifier_dir = run_dir / "classifier"
    ev = cfg.evaluate
    ds = load_synthetic(run_dir, data.image_shape[2], filtered=False)
    ids = ds.select_columns(["shard_id", "seed"]).to_pandas()
    rows = predict(ds, classifier_dir, ev.pool, features=f.distance_quantile is not None)
    features = means = radius = None
    if f.distance_quantile is not None:
        real_features, real_labels = load_training_features(classifier_dir)
        means = class_means(real_features, real_labels, data.num_classes)
        radius = class_distance_quantiles(real_features, real_labels, data.num_classes,
                                          f.distance_quantile)
        features = np.stack(rows["features"].to_numpy())
    labels = rows["label"].to_numpy()
    keep, reasons = filter_mask(rows["pred"].to_numpy(), rows["confidence"].to_numpy(), labels,
                                features, means, radius, f.confidence_threshold)
    with atomic_file(out / FILTER_FILE) as tmp:  # load_synthetic trusts it when present
        pd.DataFrame({"shard_id": ids["shard_id"], "seed": ids["seed"], "keep": keep,
                      "reason": reasons}).to_parquet(tmp, index=False)
    report = drop_report(labels, keep, reasons, data.num_classes)
    write_text_atomic(out / "filter_report.csv", report.to_csv(index=False))
    return report
