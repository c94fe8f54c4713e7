"""Long-tail and group metrics (docs/method.md §6), pure functions of labels and predictions."""

from __future__ import annotations

from typing import Any

import numpy as np

HEADLINE = ("overall", "many", "medium", "few", "worst_group", "unseen_groups")
"""The accuracies every summary shows: metrics files, the report, the console, tune results."""


def class_splits(class_counts: np.ndarray, many_threshold: int, few_threshold: int
                 ) -> dict[str, np.ndarray]:
    """Boolean class masks: Many (n > many), Few (n < few), Medium (the rest)."""
    counts = np.asarray(class_counts)
    many = counts > many_threshold
    few = counts < few_threshold
    return {"many": many, "medium": ~many & ~few, "few": few}


def accuracy_by(keys: np.ndarray, correct: np.ndarray, size: int) -> list[float | None]:
    """Accuracy of the rows sharing each key in ``[0, size)``; None where a key has no row."""
    total = np.bincount(keys, minlength=size)
    hits = np.bincount(keys, weights=correct.astype(float), minlength=size)
    return [float(h / t) if t else None for h, t in zip(hits, total, strict=True)]


def _mean_or_none(mask: np.ndarray, correct: np.ndarray) -> float | None:
    return float(correct[mask].mean()) if mask.any() else None


def accuracy_report(labels: np.ndarray, preds: np.ndarray, groups: np.ndarray,
                    class_counts: np.ndarray, num_groups: int, many_threshold: int,
                    few_threshold: int, group_counts: np.ndarray | None = None
                    ) -> dict[str, Any]:
    """Overall, Many/Medium/Few, per-class, per-group, worst-group (and worst-class) accuracy.

    Many/Medium/Few are accuracies over the evaluation rows of the classes in each split.
    ``worst_group`` is the minimum over groups with evaluation rows; None without groups.
    ``unseen_groups`` is the accuracy over the evaluation rows of the groups with no training
    image (``group_counts`` zero): the class x context combinations only synthesis can show;
    None when every group was seen or the counts are not given.
    """
    labels, preds, groups = (np.asarray(a, dtype=np.int64) for a in (labels, preds, groups))
    correct = labels == preds
    num_classes = len(class_counts)
    per_class = accuracy_by(labels, correct, num_classes)
    splits = class_splits(class_counts, many_threshold, few_threshold)
    report: dict[str, Any] = {"overall": float(correct.mean()) if len(correct) else None}
    for name, mask in splits.items():
        report[name] = _mean_or_none(mask[labels], correct)
    present = [a for a in per_class if a is not None]
    report["balanced"] = float(np.mean(present)) if present else None
    report["worst_class"] = min(present) if present else None
    per_group = accuracy_by(groups[groups >= 0], correct[groups >= 0], num_groups)
    present_groups = [a for a in per_group if a is not None]
    report["worst_group"] = min(present_groups) if num_groups and present_groups else None
    report["unseen_groups"] = None
    if num_groups and group_counts is not None and len(group_counts):
        unseen = np.asarray(group_counts) == 0
        in_unseen = (groups >= 0) & unseen[np.clip(groups, 0, None)]
        report["unseen_groups"] = _mean_or_none(in_unseen, correct)
    report["per_class"] = per_class
    report["per_group"] = per_group
    report["split_sizes"] = {name: int(mask.sum()) for name, mask in splits.items()}
    report["num_rows"] = int(len(labels))
    return report
