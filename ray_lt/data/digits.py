"""The embedded data sets: scikit-learn's bundled handwritten digits (1,797 real 8x8 images).

``digits_lt`` makes the training split long-tailed (exponential profile); ``digits_groups``
draws each digit on a coloured background (its context) with a majority context per class and
some empty class x context groups, the group-imbalanced analogue of NICO++. Val and test splits
are balanced. Everything is deterministic in the seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ray_lt.errors import ConfigError

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def long_tail_counts(max_per_class: int, imbalance_factor: float, num_classes: int) -> np.ndarray:
    """Exponential profile ``n_c = max * IF^(-c / (C - 1))``, at least one image per class."""
    c = np.arange(num_classes)
    counts = max_per_class * imbalance_factor ** (-c / max(num_classes - 1, 1))
    return np.maximum(1, np.floor(counts + 1e-9)).astype(int)


def _shuffled_indices_by_class(target: np.ndarray, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(target == c)) for c in range(10)]


def _render(ink: np.ndarray, size: int, background: np.ndarray, foreground: np.ndarray
            ) -> np.ndarray:
    """Ink in [0, 1] of shape (N, 8, 8) -> uint8 (N, size, size, C) with the given colours.

    ``background`` / ``foreground`` are (N, C) colours in [0, 1].
    """
    x = torch.from_numpy(ink).float()[:, None]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1)[:, 0, :, :, None].numpy()  # (N, H, W, 1)
    rgb = background[:, None, None, :] * (1 - x) + foreground[:, None, None, :] * x
    return np.round(rgb * 255).astype(np.uint8)


def _table(images: np.ndarray, labels, groups, paths) -> pd.DataFrame:
    return pd.DataFrame({"image": list(images), "label": np.asarray(labels, dtype=np.int64),
                         "group": np.asarray(groups, dtype=np.int64), "path": list(paths)})


def digits_lt_tables(
    seed: int, imbalance_factor: float, max_per_class: int, val_per_class: int,
    test_per_class: int, image_size: int, channels: int,
) -> dict[str, pd.DataFrame]:
    """Long-tailed train split, balanced val/test; class 0 is the head, class 9 the tail."""
    from sklearn.datasets import load_digits  # imported where used: a worker that never reads
    # the digits does not pay for scikit-learn

    digits = load_digits()
    ink = digits.images / 16.0
    by_class = _shuffled_indices_by_class(digits.target, seed)
    counts = long_tail_counts(max_per_class, imbalance_factor, 10)
    picks: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c, idx in enumerate(by_class):
        picks["test"] += list(idx[:test_per_class])
        picks["val"] += list(idx[test_per_class:test_per_class + val_per_class])
        start = test_per_class + val_per_class
        picks["train"] += list(idx[start:start + counts[c]])
    tables = {}
    for split, idx in picks.items():
        idx = np.asarray(idx)
        black = np.zeros((len(idx), channels))
        white = np.ones((len(idx), channels))
        images = _render(ink[idx], image_size, black, white)
        tables[split] = _table(images, digits.target[idx], np.full(len(idx), -1),
                               [f"digits/{i}" for i in idx])
    return tables


def context_colours(names: list[str]) -> np.ndarray:
    """RGB in [0, 1] of each context name (any matplotlib colour name)."""
    from matplotlib.colors import is_color_like, to_rgb

    for i, name in enumerate(names):
        if not is_color_like(name):
            raise ConfigError(f"dataset.context_names[{i}]: {name!r} is not a colour name")
    return np.array([to_rgb(name) for name in names])


def group_train_counts(
    train_per_class: int, majority_fraction: float, empty_groups_per_class: int,
    num_contexts: int, seed: int,
) -> np.ndarray:
    """(classes, contexts) training counts: class c's majority context is ``c % contexts``, a
    seeded choice of its other contexts is empty, the rest share what the majority leaves."""
    rng = np.random.default_rng(seed + 1)
    counts = np.zeros((10, num_contexts), dtype=int)
    for c in range(10):
        major = c % num_contexts
        others = [a for a in range(num_contexts) if a != major]
        empty = set(rng.choice(others, size=empty_groups_per_class, replace=False).tolist())
        minority = [a for a in others if a not in empty]
        n_major = round(train_per_class * majority_fraction) if minority else train_per_class
        counts[c, major] = n_major
        rest = train_per_class - n_major
        for j, a in enumerate(minority):
            counts[c, a] = rest // len(minority) + (j < rest % len(minority))
    return counts


def digits_groups_tables(
    seed: int, context_names: list[str], train_per_class: int, majority_fraction: float,
    empty_groups_per_class: int, val_per_group: int, test_per_group: int, image_size: int,
) -> dict[str, pd.DataFrame]:
    """White digits on coloured backgrounds; ``group = label * contexts + context``."""
    colours = context_colours(context_names)
    n_ctx = len(context_names)
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = digits.images / 16.0
    by_class = _shuffled_indices_by_class(digits.target, seed)
    train_counts = group_train_counts(train_per_class, majority_fraction,
                                      empty_groups_per_class, n_ctx, seed)
    rng = np.random.default_rng(seed + 2)
    picks: dict[str, list[tuple[int, int]]] = {"train": [], "val": [], "test": []}
    for c, idx in enumerate(by_class):
        pos = 0
        for split, per_group in (("test", test_per_group), ("val", val_per_group)):
            for a in range(n_ctx):
                picks[split] += [(i, a) for i in idx[pos:pos + per_group]]
                pos += per_group
        for a in range(n_ctx):
            picks["train"] += [(i, a) for i in idx[pos:pos + train_counts[c, a]]]
            pos += train_counts[c, a]
    tables = {}
    for split, pairs in picks.items():
        idx = np.array([i for i, _ in pairs])
        ctx = np.array([a for _, a in pairs])
        # Small colour jitter so a context is a distribution, not one exact colour.
        background = np.clip(colours[ctx] + rng.normal(0, 0.06, (len(idx), 3)), 0, 1)
        foreground = np.ones((len(idx), 3))
        images = _render(ink[idx], image_size, background, foreground)
        labels = digits.target[idx]
        tables[split] = _table(images, labels, labels * n_ctx + ctx,
                               [f"digits/{i}/{context_names[a]}" for i, a in pairs])
    return tables


def _pool_indices(target: np.ndarray, seed: int, per_class: int) -> np.ndarray:
    """Each class's last ``per_class`` digits in the seed's order: the splits take theirs from
    the front, so the pool never shares an image with them while the config's check holds."""
    by_class = _shuffled_indices_by_class(target, seed)
    return np.concatenate([idx[len(idx) - per_class:] for idx in by_class])


def digits_lt_pool(seed: int, per_class: int, image_size: int, channels: int) -> pd.DataFrame:
    """The external pool of ``digits_lt``: ``per_class`` real digits of every class that no
    split holds, drawn as the splits are (white on black)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = _pool_indices(digits.target, seed, per_class)
    images = _render(digits.images[idx] / 16.0, image_size, np.zeros((len(idx), channels)),
                     np.ones((len(idx), channels)))
    return _table(images, digits.target[idx], np.full(len(idx), -1),
                  [f"digits/{i}" for i in idx])


def digits_groups_pool(seed: int, context_names: list[str], per_class: int, image_size: int
                       ) -> pd.DataFrame:
    """The external pool of ``digits_groups``: ``per_class`` digits of every class that no
    split holds, each drawn once in every context, so every class x context group is in it,
    those empty in training too (as the web holds the combinations a data set lacks)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    colours = context_colours(context_names)
    n_ctx = len(context_names)
    idx = np.repeat(_pool_indices(digits.target, seed, per_class), n_ctx)
    ctx = np.tile(np.arange(n_ctx), len(idx) // n_ctx)
    rng = np.random.default_rng(seed + 3)
    background = np.clip(colours[ctx] + rng.normal(0, 0.06, (len(idx), 3)), 0, 1)
    images = _render(digits.images[idx] / 16.0, image_size, background,
                     np.ones((len(idx), 3)))
    labels = digits.target[idx]
    return _table(images, labels, labels * n_ctx + ctx,
                  [f"digits/{i}/{context_names[a]}" for i, a in zip(idx, ctx, strict=True)])

