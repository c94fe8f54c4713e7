"""Sample grids for the report: one row per criterion, one column per guidance scale (FG paper
Figure 3 layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

CELL_INCHES = 1.3
LEFT_INCHES = 1.6
TOP_INCHES = 0.45
TITLE_INCHES = 0.35
DPI = 100


def save_grid(images: np.ndarray, row_labels: list[str], col_labels: list[str], path: Path,
              title: str = "") -> Path:
    """Write ``images`` (rows, cols, H, W, C) uint8 as a labelled PNG grid at ``path``.

    Row labels go on the left, column labels on top; each cell is a fixed size, so the image
    grows with rows and columns. ``C == 1`` is drawn in grey.
    """
    images = np.asarray(images)
    if images.ndim != 5 or images.shape[4] not in (1, 3, 4):
        raise ValueError(f"images must be (rows, cols, H, W, C) with C in 1, 3 or 4, got shape "
                         f"{images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    rows, cols = images.shape[:2]
    if rows == 0 or cols == 0:
        raise ValueError(f"images has an empty grid: {rows} rows x {cols} columns")
    if len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row_labels for {rows} rows of images")
    if len(col_labels) != cols:
        raise ValueError(f"{len(col_labels)} col_labels for {cols} columns of images")
    top = TOP_INCHES + (TITLE_INCHES if title else 0.0)
    width, height = LEFT_INCHES + cols * CELL_INCHES, top + rows * CELL_INCHES
    fig = Figure(figsize=(width, height), dpi=DPI)
    fig.subplots_adjust(left=LEFT_INCHES / width, right=1.0, bottom=0.0, top=1 - top / height,
                        wspace=0.05, hspace=0.05)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax, image = axes[r, c], images[r, c]
            if image.shape[-1] == 1:
                ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
            if c == 0:
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=9)
            if r == 0:
                ax.set_title(col_labels[c], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.1 / height, va="top")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def tile(images: np.ndarray) -> np.ndarray:
    """(n, H, W, C) -> one near-square mosaic (rows x cols of samples), blank where short."""
    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    canvas = np.zeros((rows * h, cols * w, c), dtype=images.dtype)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        canvas[r * h:(r + 1) * h, q * w:(q + 1) * w] = image
    return canvas


class Drawer:
    """A run's generator and criterion scorer, built once on ``device``, drawing batches of
    one class (group) with the product's own sampling path (``sample_finite``: a sample that
    overflows in reduced precision is redrawn in float32). ``criteria`` are the names a
    ``draw`` picks from; ``guide`` is the classifier folder that scores (default the
    baseline's)."""

    def __init__(self, cfg: Any, run_dir: Path, info: dict, criteria: list[str],
                 device: Any, guide: Path | None = None):
        from ray_lt.generate.factory import build_generator, build_scorer

        self.cfg, self.criteria = cfg, list(criteria)
        self.generator = build_generator(cfg, Path(run_dir), device, info)
        self.scorer = build_scorer(cfg, Path(run_dir), device, self.criteria,
                                   classifier_dir=guide)

    def draw(self, label: int, group: int, criterion: str, scale: float, seeds: list[int]
             ) -> np.ndarray:
        """(len(seeds), H, W, C) uint8 samples of ``label`` (``group``, -1 for none) guided by
        ``criterion`` at ``scale`` (0: unguided); sample i depends only on seeds[i]."""
        import torch

        from ray_lt.generate.actor import sample_finite
        from ray_lt.generate.sampler import Guidance

        s = self.cfg.synthesis
        ids = torch.full((len(seeds),), self.criteria.index(criterion))
        _, images, _ = sample_finite(self.generator, self.scorer, label, group, ids, seeds, s,
                                     Guidance.of(s, scale), f"class {label}")
        return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
