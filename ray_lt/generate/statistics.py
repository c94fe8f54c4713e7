"""What the criteria need beside the classifier, computed once from the real training set and
saved beside the classifier checkpoint: the training embeddings (Parquet files written by the
Ray Data workers), class means / shrunk covariances (hardness), the epistemic head (total
uncertainty) and, for data sets with groups, the context head (the group criteria), each
fitted by streaming over those files."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ray_lt.atomic import staged_folder
from ray_lt.config import EvaluateConfig
from ray_lt.data import LongTailData
from ray_lt.evaluate.predict import predict_dataset
from ray_lt.generate.criteria import (
    CRITERIA,
    Batches,
    ClassStatistics,
    Covariance,
    EpistemicHead,
    fit_class_statistics_streamed,
    fit_epistemic_head_streamed,
)

log = logging.getLogger(__name__)

STATISTICS_FILE = "class_statistics.safetensors"
HEAD_FILE = "epistemic_head.safetensors"
CONTEXT_HEAD_FILE = "context_head.safetensors"
FEATURES_DIR = "train_features"
READ_ROWS = 4096


def feature_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """Label, group and the embedding as a fixed-size list column (a Ray Data batch UDF)."""
    features = np.ascontiguousarray(batch["features"], dtype=np.float32)
    return pa.table({
        "label": pa.array(np.asarray(batch["label"], dtype=np.int64)),
        "group": pa.array(np.asarray(batch["group"], dtype=np.int64)),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)),
                                                      features.shape[1]),
    })


def write_training_features(classifier_dir: Path, data: LongTailData,
                            evaluate: EvaluateConfig) -> Path:
    """Embed the training set on Ray Data; the workers write Parquet files to
    ``classifier_dir/train_features/``, renamed into place once complete."""
    out = Path(classifier_dir) / FEATURES_DIR
    with staged_folder(out, suffix=".partial") as partial:
        predict_dataset(data.train, classifier_dir, evaluate.pool, features=True
                        ).map_batches(feature_table, batch_format="numpy").write_parquet(
                            str(partial.resolve()))
    return out


def ensure_training_features(classifier_dir: Path, data: LongTailData,
                             evaluate: EvaluateConfig | None) -> Path:
    """``classifier_dir/train_features/``, written (``write_training_features``) unless there."""
    folder = Path(classifier_dir) / FEATURES_DIR
    if not folder.is_dir():
        write_training_features(classifier_dir, data, evaluate)
    return folder


def _feature_files(classifier_dir: Path) -> list[Path]:
    folder = Path(classifier_dir) / FEATURES_DIR
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no Parquet files; they are written by "
                                "fit_criterion_support when the criteria are first needed")
    return files


def _as_matrix(column: pa.Array) -> np.ndarray:
    if isinstance(column.type, pa.ExtensionType):
        column = column.storage
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)


def feature_batches(classifier_dir: Path, rows: int = READ_ROWS, contexts: int = 0) -> Batches:
    """Passes over the training features as (features (b, d) float32, labels (b,)) batches of
    at most ``rows`` rows, in file order: memory O(rows x d). With ``contexts`` > 0 the labels
    are the contexts, ``group % contexts``."""
    files = _feature_files(classifier_dir)
    column = "group" if contexts else "label"

    def one_pass():
        for file in files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=rows,
                                                           columns=["features", column]):
                labels = batch.column(column).to_numpy().astype(np.int64)
                if contexts:
                    if (labels < 0).any():
                        raise ValueError(f"{file}: rows without a group; the context head "
                                         "needs a data set with class x context groups")
                    labels = labels % contexts
                yield _as_matrix(batch.column("features")), labels

    return one_pass


def load_training_features(classifier_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every training embedding (N, d) float32 and its label (N,), for the consumers that need
    them all at once (DiffuLT's distance filter, the LDMLR feature generator)."""
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in _feature_files(classifier_dir))
    features, labels, start = None, np.empty(n, dtype=np.int64), 0
    for x, y in feature_batches(classifier_dir)():
        if features is None:
            features = np.empty((n, x.shape[1]), dtype=np.float32)
        features[start:start + len(y)], labels[start:start + len(y)] = x, y
        start += len(y)
    return (features if features is not None else np.zeros((0, 0), np.float32)), labels


SUPPORT_PIECES = ("statistics", "epistemic_head", "context_head")
"""What the criteria may need beside the classifier (``Criterion.needs``)."""


def support_pieces(criteria: Iterable[str]) -> set[str]:
    """The pieces that scoring ``criteria`` needs: the class statistics for ``hardness``, the
    epistemic head for ``total_uncertainty``, the context head for the group criteria."""
    return {CRITERIA[name].needs for name in criteria} - {None}


def missing_support(classifier_dir: Path, data: Any, needs: Iterable[str],
                    covariance: Covariance) -> set[str]:
    """The pieces of ``needs`` not yet beside the classifier (the statistics also when stored
    in another form; the context head only for data with groups)."""
    classifier_dir = Path(classifier_dir)
    missing = set()
    for piece in set(needs):
        if piece == "statistics":
            if ClassStatistics.stored_covariance(classifier_dir / STATISTICS_FILE) != covariance:
                missing.add(piece)
        elif piece == "epistemic_head":
            if not (classifier_dir / HEAD_FILE).is_file():
                missing.add(piece)
        elif piece == "context_head":
            if data.num_groups and not (classifier_dir / CONTEXT_HEAD_FILE).is_file():
                missing.add(piece)
        else:
            raise ValueError(f"unknown criterion support {piece!r}; one of {SUPPORT_PIECES}")
    return missing


@dataclass(frozen=True)
class SupportShape:
    """What fitting the criterion support needs of the data set: a few numbers and names,
    small enough to ship to a Ray task."""

    num_classes: int
    num_groups: int
    context_names: list[str]

    @classmethod
    def of(cls, data: Any) -> SupportShape:
        return cls(int(data.num_classes), int(data.num_groups), list(data.context_names))


def fit_criterion_support(classifier_dir: Path, data: Any, heads: int,
                          evaluate: EvaluateConfig | None, seed: int,
                          covariance: Covariance = "full",
                          needs: Iterable[str] = SUPPORT_PIECES) -> None:
    """Embed the training set on Ray Data into ``train_features/`` (unless there) and fit, by
    streaming over those files, the pieces of ``needs`` that are missing: the class statistics
    in the ``covariance`` form, the epistemic head of ``heads`` heads and (data with groups)
    the context head. Each piece on disk is kept, and a piece no criterion needs is not fitted:
    a later call that needs it fits it then."""
    classifier_dir = Path(classifier_dir)
    ensure_training_features(classifier_dir, data, evaluate)
    report_support(classifier_dir, fit_missing_support(
        classifier_dir, SupportShape.of(data), heads, seed, covariance,
        missing_support(classifier_dir, data, needs, covariance)))


def report_support(classifier_dir: Path, fitted: dict[str, float | None]) -> None:
    """Log what ``fit_missing_support`` fitted."""
    if fitted:
        log.info(f"criterion support of {classifier_dir}: fitted {', '.join(sorted(fitted))}")
    if fitted.get("context_head") is not None:
        # How much of the context the guide's embedding keeps: what the group criteria see.
        log.info(f"context head of {classifier_dir}: {fitted['context_head']:.3f} of the "
                 f"training images' contexts read from the embedding")


def fit_missing_support(classifier_dir: Path, shape: SupportShape, heads: int, seed: int,
                        covariance: Covariance, missing: set[str]) -> dict[str, float | None]:
    """Fit the ``missing`` pieces from the feature files beside the classifier (no Ray: the
    pipeline runs this as a Ray task on the cluster); the heads train on the task's GPU where
    it was given one. Returns what it fitted (for the context head, the share of training
    contexts it reads from the embedding)."""
    classifier_dir = Path(classifier_dir)
    batches = feature_batches(classifier_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fitted: dict[str, float | None] = {}
    if "statistics" in missing:
        fit_class_statistics_streamed(batches, shape.num_classes, covariance).save(
            classifier_dir / STATISTICS_FILE)
        fitted["statistics"] = None
    if "epistemic_head" in missing:
        fit_epistemic_head_streamed(batches, shape.num_classes, k=heads, seed=seed,
                                    device=device).save(classifier_dir / HEAD_FILE)
        fitted["epistemic_head"] = None
    contexts = len(shape.context_names) if shape.num_groups else 0
    if contexts and "context_head" in missing:
        by_context = feature_batches(classifier_dir, contexts=contexts)
        head = fit_epistemic_head_streamed(by_context, contexts, k=1, seed=seed,
                                           bootstrap=False, device=device)
        head.save(classifier_dir / CONTEXT_HEAD_FILE)
        right = seen = 0
        with torch.no_grad():
            for x, a in by_context():
                right += int((head(torch.from_numpy(x))[0].argmax(-1).numpy() == a).sum())
                seen += len(a)
        fitted["context_head"] = right / max(seen, 1)
    return fitted


def load_criterion_support(classifier_dir: Path) -> tuple[ClassStatistics | None,
                                                          EpistemicHead | None]:
    """The saved statistics and head, or None for each one not computed yet."""
    classifier_dir = Path(classifier_dir)
    stats = (ClassStatistics.load(classifier_dir / STATISTICS_FILE)
             if (classifier_dir / STATISTICS_FILE).is_file() else None)
    head = (EpistemicHead.load(classifier_dir / HEAD_FILE)
            if (classifier_dir / HEAD_FILE).is_file() else None)
    return stats, head


def load_context_head(classifier_dir: Path) -> EpistemicHead | None:
    """The saved context head (K = 1: logits (1, B, contexts)), None when there is none."""
    path = Path(classifier_dir) / CONTEXT_HEAD_FILE
    return EpistemicHead.load(path) if path.is_file() else None
