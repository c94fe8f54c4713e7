"""Figures people look at: per-class accuracy against training count."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ray_lt.evaluate.metrics import class_splits  # noqa: E402

SPLIT_COLOURS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}


def plot_per_class_accuracy(per_class: dict[str, list[float | None]], class_counts: np.ndarray,
                            many_threshold: int, few_threshold: int, path: Path,
                            title: str = "") -> Path:
    """Scatter of per-class accuracy (y) over training images per class (x, log scale).

    ``per_class`` maps a model name to its per-class accuracies, so a baseline and a final
    model can share one figure; the Many/Medium/Few thresholds are drawn as dashed lines.
    """
    counts = np.asarray(class_counts)
    splits = class_splits(counts, many_threshold, few_threshold)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    markers = "osD^v"
    for i, (name, accs) in enumerate(per_class.items()):
        acc = np.array([np.nan if a is None else a for a in accs], dtype=float)
        for split, mask in splits.items():
            if mask.any():
                ax.scatter(counts[mask], acc[mask], marker=markers[i % len(markers)],
                           color=SPLIT_COLOURS[split], alpha=0.75, s=28,
                           label=f"{name}: {split}")
    for x in (few_threshold, many_threshold):
        ax.axvline(max(x, 0.5), color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class")
    ax.set_ylabel("test accuracy of the class")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "per-class accuracy")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_class_counts(class_counts: np.ndarray, quotas: np.ndarray | None, many_threshold: int,
                      few_threshold: int, path: Path, title: str = "") -> Path:
    """The long tail: training images per class, sorted from the largest class (bars coloured
    Many / Medium / Few), with the synthetic quota stacked on top where one is given."""
    counts = np.asarray(class_counts)
    order = np.argsort(-counts, kind="stable")
    splits = class_splits(counts, many_threshold, few_threshold)
    colours = np.empty(len(counts), dtype=object)
    for split, mask in splits.items():
        colours[mask] = SPLIT_COLOURS[split]
    x = np.arange(len(counts))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 1.0 if len(counts) > 50 else 0.8
    ax.bar(x, counts[order], width=width, color=list(colours[order]), linewidth=0)
    if quotas is not None:
        ax.bar(x, np.asarray(quotas)[order], width=width, bottom=counts[order], color="0.8",
               linewidth=0, label="synthetic quota")
    for split, colour in SPLIT_COLOURS.items():
        ax.bar([0], [0], color=colour, label=f"{split}: {int(splits[split].sum())} classes")
    ax.set_yscale("log")
    top = (counts + (np.asarray(quotas) if quotas is not None else 0)).max()
    ax.set_ylim(0.8, max(2.0, float(top)) * 1.6)
    ax.set_xlabel("classes, largest first")
    ax.set_ylabel("training images" + (" + synthetic quota" if quotas is not None else ""))
    ax.set_title(title or "training images per class")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
