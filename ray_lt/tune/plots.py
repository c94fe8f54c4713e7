"""The search's plot: every trial's objectives, the Pareto front marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

NICE_TICKS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
MARKERS = "osD^v<>"


def marker_column(table: pd.DataFrame) -> str | None:
    """The first searched choice (a ``config/`` column that is not a float range: the group
    objective, the number of rounds), whose values the plot tells apart by marker."""
    choices = [c for c in table.columns if c.startswith("config/")
               and not pd.api.types.is_float_dtype(table[c])]
    return choices[0] if choices else None


def plot_search(table: pd.DataFrame, metrics: list[str], path: Path) -> Path:
    """Objective(s) against the guidance scale per trial; Pareto-optimal trials filled. When
    a choice is searched (the final group objective, the number of rounds), its values get
    their own marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    x_col = "config/synthesis/guidance_scale"
    kind = marker_column(table)
    values = sorted(table[kind].astype(str).unique()) if kind else ["all"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        x = table[x_col] if x_col in table else pd.Series(range(len(table)))
        front = table["pareto"].to_numpy(bool)
        for value, marker in zip(values, MARKERS * len(values), strict=False):
            mine = (table[kind].astype(str) == value).to_numpy() if kind else \
                np.ones(len(table), bool)
            label = f"{kind.rsplit('/', 1)[-1]} {value}" if kind else "trial"
            if (mine & ~front).any():
                ax.scatter(x[mine & ~front], table[m][mine & ~front], marker=marker,
                           facecolors="none", edgecolors="tab:blue", label=label)
            if (mine & front).any():
                ax.scatter(x[mine & front], table[m][mine & front], marker=marker,
                           color="tab:red", label=f"{label}, Pareto front" if kind
                           else "Pareto front")
        if x_col in table:
            ax.set_xscale("log")
            low, high = x.min(), x.max()
            ticks = [t for t in NICE_TICKS if low / 1.5 <= t <= high * 1.5]
            if ticks:
                ax.set_xticks(ticks)
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("guidance scale")
        else:
            ax.set_xlabel("trial")
        ax.set_ylabel(m)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
