"""Evaluating an exported classifier on a split: predictions on a Ray Data actor pool,
metrics.json, predictions.parquet and the per-class accuracy plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray_lt.atomic import atomic_file, write_text_atomic
from ray_lt.config import EvaluateConfig
from ray_lt.data import LongTailData
from ray_lt.evaluate.metrics import accuracy_report
from ray_lt.evaluate.plots import plot_per_class_accuracy
from ray_lt.evaluate.predict import predict

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"
PLOT_FILE = "per_class_accuracy.png"


def evaluate_classifier(classifier_dir: Path, data: LongTailData, cfg: EvaluateConfig,
                        out_dir: Path, split: str = "test") -> dict[str, Any]:
    """Predict ``split`` with the exported classifier and write metrics, predictions and plot
    into ``out_dir``; returns the metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = predict(getattr(data, split), classifier_dir, cfg.pool)
    metrics = accuracy_report(rows["label"].to_numpy(), rows["pred"].to_numpy(),
                              rows["group"].to_numpy(), data.class_counts, data.num_groups,
                              cfg.many_threshold, cfg.few_threshold, data.group_counts)
    metrics["split"] = split
    metrics["class_counts"] = data.class_counts.tolist()
    if data.group_counts is not None:
        metrics["group_counts"] = data.group_counts.tolist()
    with atomic_file(out_dir / PREDICTIONS_FILE) as tmp:
        rows.to_parquet(tmp, index=False)
    write_text_atomic(out_dir / METRICS_FILE, json.dumps(metrics, indent=2))
    plot_per_class_accuracy({Path(classifier_dir).name: metrics["per_class"]},
                            data.class_counts, cfg.many_threshold, cfg.few_threshold,
                            out_dir / PLOT_FILE, title=f"per-class {split} accuracy")
    return metrics
