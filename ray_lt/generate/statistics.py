"""What the criteria need beside the classifier, computed once from the real training set and
saved beside the classifier checkpoint: class means / shrunk covariances (hardness) and the
epistemic head (total uncertainty)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ray_lt.config import EvaluateConfig
from ray_lt.data import LongTailData
from ray_lt.generate.criteria import (
    ClassStatistics,
    EpistemicHead,
    fit_class_statistics,
    fit_epistemic_head,
)
from ray_lt.train.features import predict

STATISTICS_FILE = "class_statistics.safetensors"
HEAD_FILE = "epistemic_head.safetensors"
FEATURES_FILE = "train_features.npz"


def fit_criterion_support(classifier_dir: Path, data: LongTailData, heads: int,
                          evaluate: EvaluateConfig, seed: int) -> None:
    """Embed the training set on Ray Data and save statistics and epistemic head (skipped when
    both files exist)."""
    classifier_dir = Path(classifier_dir)
    if (classifier_dir / STATISTICS_FILE).is_file() and (classifier_dir / HEAD_FILE).is_file():
        return
    rows = predict(data.train, classifier_dir, evaluate.batch_size, evaluate.num_actors,
                   evaluate.cpus_per_actor, evaluate.gpus_per_actor, features=True)
    features = np.stack(rows["features"].to_numpy()).astype(np.float32)
    labels = rows["label"].to_numpy()
    np.savez_compressed(classifier_dir / FEATURES_FILE, features=features, labels=labels)
    fit_class_statistics(features, labels, data.num_classes).save(
        classifier_dir / STATISTICS_FILE)
    fit_epistemic_head(features, labels, data.num_classes, k=heads, seed=seed).save(
        classifier_dir / HEAD_FILE)


def load_criterion_support(classifier_dir: Path) -> tuple[ClassStatistics | None,
                                                          EpistemicHead | None]:
    """The saved statistics and head, or None for each one not computed yet."""
    classifier_dir = Path(classifier_dir)
    stats = (ClassStatistics.load(classifier_dir / STATISTICS_FILE)
             if (classifier_dir / STATISTICS_FILE).is_file() else None)
    head = (EpistemicHead.load(classifier_dir / HEAD_FILE)
            if (classifier_dir / HEAD_FILE).is_file() else None)
    return stats, head
