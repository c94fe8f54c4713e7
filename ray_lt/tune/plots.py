"""The search's plot: every trial's objectives, the Pareto front marked."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def plot_search(table: pd.DataFrame, metrics: list[str], path: Path) -> Path:
    """Objective(s) against the guidance scale per trial; Pareto-optimal trials filled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_col = "config/synthesis/guidance_scale"
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        x = table[x_col] if x_col in table else pd.Series(range(len(table)))
        front = table["pareto"].to_numpy(bool)
        ax.scatter(x[~front], table[m][~front], facecolors="none", edgecolors="tab:blue",
                   label="trial")
        ax.scatter(x[front], table[m][front], color="tab:red", label="Pareto front")
        if x_col in table:
            ax.set_xscale("log")
            ax.set_xlabel("guidance scale")
        else:
            ax.set_xlabel("trial")
        ax.set_ylabel(m)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
