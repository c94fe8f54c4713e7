"""What guidance does, scale by scale: the guidance sweep behind the sample grid.

For the grid's class (its rarest context on data sets with groups) and each grid criterion,
``draw_sweep`` draws the same seeds at every scale of ``synthesis.sweep_scales`` (a Ray task,
on a GPU when the sampler pool has one). Of every sample the driver then measures:

- the guide's criterion on the final sample (what guidance pushes up);
- whether the guide (the classifier that guided) puts it in its class;
- whether an independent judge does: an RBF SVM on the pixels (downsampled to at most 32 x
  32) of the real validation images and the generator's external pool, which never saw a
  synthetic image; on data sets with groups, also whether it puts it in its class x context
  group;
- its RMS pixel distance to the nearest training image of its class, beside the same
  distance of the class's held-out validation images: a sample far closer than those is a
  near-copy (memorisation).

The grid's columns are chosen from it (``grid_columns``): from scale 0 to the first scale
where the judge's in-class rate has fallen by ``synthesis.sweep_drop``, so the grid reaches
where samples visibly change. ``report/guidance_sweep.csv`` and ``.png`` keep the numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

JUDGE_SIDE = 32  # pixels of the judge's input side, at most


def sweep_seeds(seed: int, n: int) -> list[int]:
    """The seeds of every cell (the grid's cells show the first ``grid_samples``)."""
    return [seed * 7919 + i for i in range(n)]


def draw_sweep(config: dict, run_dir: str, info: dict, label: int, group: int,
               scales: list[float], use_gpu: bool) -> dict[str, np.ndarray]:
    """Samples of one class (group) for every grid criterion x scale, the same seeds in every
    cell: ``images`` (criteria, scales, n, H, W, C) uint8, the guide's ``criterion`` values
    and its predicted class ``guide`` (criteria, scales, n). Runs as a Ray task."""
    import torch

    from ray_lt.config import Config
    from ray_lt.generate.grid import Drawer

    cfg = Config.model_validate(config)
    s = cfg.synthesis
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    drawer = Drawer(cfg, Path(run_dir), info, list(s.grid_criteria), device)
    seeds = sweep_seeds(cfg.seed, s.sweep_samples)
    images = np.stack([np.stack([drawer.draw(label, group, name, scale, seeds)
                                 for scale in scales]) for name in s.grid_criteria])
    criterion = np.zeros(images.shape[:3])
    guide = np.zeros(images.shape[:3], dtype=np.int64)
    scorer = drawer.scorer
    with torch.no_grad():
        for i in range(len(s.grid_criteria)):
            for j in range(len(scales)):
                x = torch.from_numpy(images[i, j]).permute(0, 3, 1, 2).float().to(device) / 255
                n = len(x)
                ids = torch.full((n,), i, device=device)
                labels = torch.full((n,), label, device=device)
                groups = torch.full((n,), group, device=device)
                criterion[i, j] = scorer(x, labels, ids, groups if group >= 0 else None
                                         ).float().cpu().numpy()
                guide[i, j] = scorer.classifier(x).argmax(1).cpu().numpy()
    return {"images": images, "criterion": criterion, "guide": guide}


def _flat(images: np.ndarray) -> np.ndarray:
    """(n, H, W, C) uint8 -> (n, features) in [0, 1], at most ``JUDGE_SIDE`` pixels a side."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 255
    if x.shape[-1] > JUDGE_SIDE:
        x = F.adaptive_avg_pool2d(x, JUDGE_SIDE)
    return x.reshape(len(x), -1).numpy()


class Judge:
    """An RBF SVM on pixels of real images the guide's training never weighed against the
    samples (validation split and external pool): class, and class x context group."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, groups: np.ndarray):
        from sklearn.svm import SVC

        target = groups if (groups >= 0).all() else labels
        self.by_group = bool((groups >= 0).all())
        self.svm = SVC(C=10.0).fit(_flat(images), target)

    def predict(self, images: np.ndarray, contexts: int) -> tuple[np.ndarray, np.ndarray]:
        """Predicted (class, group) of each image; the group is -1 without groups."""
        verdict = self.svm.predict(_flat(images))
        if self.by_group:
            return verdict // contexts, verdict
        return verdict, np.full(len(verdict), -1)


def nearest_distance(images: np.ndarray, train: np.ndarray) -> np.ndarray:
    """RMS pixel distance (in [0, 1] units) of each image to its nearest ``train`` image."""
    a = images.reshape(len(images), -1).astype(np.float32) / 255
    b = train.reshape(len(train), -1).astype(np.float32) / 255
    d2 = (a ** 2).sum(1)[:, None] - 2 * a @ b.T + (b ** 2).sum(1)[None, :]
    return np.sqrt(np.maximum(d2.min(1), 0) / a.shape[1])


def sweep_table(drawn: dict[str, np.ndarray], criteria: list[str], scales: list[float],
                label: int, group: int, contexts: int, judge: Judge, train: np.ndarray
                ) -> pd.DataFrame:
    """One row per criterion x scale: the guide's mean criterion, the guide's and the judge's
    in-class rates (and the judge's in-group rate with groups), the mean distance to the
    nearest training image of the class."""
    rows = []
    for i, name in enumerate(criteria):
        for j, scale in enumerate(scales):
            images = drawn["images"][i, j]
            label_of, group_of = judge.predict(images, contexts)
            rows.append({
                "criterion": name, "scale": scale, "samples": len(images),
                "guide_criterion": float(drawn["criterion"][i, j].mean()),
                "guide_criterion_sd": float(drawn["criterion"][i, j].std()),
                "guide_in_class": float((drawn["guide"][i, j] == label).mean()),
                "judge_in_class": float((label_of == label).mean()),
                "judge_in_group": float((group_of == group).mean()) if group >= 0 else None,
                "nearest_train": float(nearest_distance(images, train).mean())})
    return pd.DataFrame(rows)


def grid_columns(table: pd.DataFrame, drop: float, most: int) -> list[float]:
    """The grid's scales: from 0 up to the first scale where the judge's in-class rate (mean
    over criteria) is ``drop`` below its rate at the smallest scale, or up to the largest
    scale; at most ``most`` of them, spread evenly over that range with both ends kept."""
    rate = table.groupby("scale")["judge_in_class"].mean().sort_index()
    scales = rate.index.tolist()
    fallen = np.flatnonzero(rate.to_numpy() <= rate.iloc[0] - drop)
    last = int(fallen[0]) if len(fallen) else len(scales) - 1
    chosen = scales[:last + 1]
    if len(chosen) > most:
        keep = np.unique(np.round(np.linspace(0, len(chosen) - 1, most)).astype(int))
        chosen = [chosen[k] for k in keep]
    return chosen


def plot_sweep(table: pd.DataFrame, reference: float, path: Path, title: str) -> Path:
    """Three panels against the guidance scale: the guide's criterion (its change from the
    smallest scale, in that scale's standard deviations), the in-class rates
    (judge solid, guide dashed; judge in-group dotted), the distance to the nearest training
    image with the held-out images' distance as a line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8), dpi=100)
    axes = fig.subplots(1, 3)
    scales = sorted(table["scale"].unique())
    positive = [s for s in scales if s > 0]
    linthresh = min(positive) if positive else 1.0
    for k, (name, rows) in enumerate(table.groupby("criterion", sort=False)):
        colour = f"C{k}"
        rows = rows.sort_values("scale")
        # Criteria differ in size by orders (hardness is a squared distance): each is shown
        # as its mean's change from the smallest scale, in that scale's standard deviations.
        first = rows.iloc[0]
        change = (rows["guide_criterion"] - first["guide_criterion"]) / max(
            first["guide_criterion_sd"], 1e-12)
        axes[0].plot(rows["scale"], change, "o-", color=colour, label=name)
        axes[1].plot(rows["scale"], rows["judge_in_class"], "o-", color=colour,
                     label=f"{name}: judge")
        axes[1].plot(rows["scale"], rows["guide_in_class"], "s--", color=colour, alpha=0.6,
                     label=f"{name}: guide")
        if rows["judge_in_group"].notna().any():
            axes[1].plot(rows["scale"], rows["judge_in_group"], "^:", color=colour,
                         label=f"{name}: judge, in group")
        axes[2].plot(rows["scale"], rows["nearest_train"], "o-", color=colour, label=name)
    if np.isfinite(reference):
        axes[2].axhline(reference, color="grey", linestyle="--",
                        label="held-out real images of the class")
    labels = ("guide's criterion: change from unguided (SDs)", "in-class rate",
              "RMS distance to nearest training image")
    for ax, ylabel in zip(axes, labels, strict=True):
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_xlim(-0.3 * linthresh, max(scales) * 1.5 if positive else 1.0)
        ax.set_xlabel("guidance scale")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=1.0)  # a few SDs and hundreds on one axis
    axes[1].set_ylim(-0.05, 1.05)
    axes[2].set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6, ncol=1)
    axes[2].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def class_images(data: Any, split: str, label: int, limit: int = 2000) -> np.ndarray:
    """Up to ``limit`` images of class ``label`` in ``split`` (the ``external`` pool too), as
    (n, H, W, C) uint8, decoded on the driver for the file data sets."""
    return _images(_rows(data, split).query("label == @label").head(limit), data, split)


def judge_images(data: Any, limit: int = 2000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The judge's training images: the validation split and the external pool, a seeded
    ``limit`` of each at most (images, labels, groups)."""
    parts = [("val", _rows(data, "val"))]
    if data.external is not None:
        parts.append(("external", data.external))
    images, labels, groups = [], [], []
    for split, rows in parts:
        rows = rows.sample(n=min(len(rows), limit), random_state=data.seed)
        images.append(_images(rows, data, split))
        labels.append(rows["label"].to_numpy())
        groups.append(rows["group"].to_numpy())
    return np.concatenate(images), np.concatenate(labels), np.concatenate(groups)


def _rows(data: Any, split: str) -> pd.DataFrame:
    return data.external if split == "external" else data.tables[split]


def _images(rows: pd.DataFrame, data: Any, split: str) -> np.ndarray:
    size, _, channels = data.image_shape
    if "image" in rows:
        return (np.stack(rows["image"].to_numpy()) if len(rows)
                else np.zeros((0, size, size, channels), np.uint8))
    from ray_lt.data.images import load_image

    root = Path(data.external_root if split == "external" else data.root)
    return np.stack([load_image(root / p, size, channels) for p in rows["path"]]) if len(rows) \
        else np.zeros((0, size, size, channels), np.uint8)
