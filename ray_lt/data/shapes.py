"""A small long-tailed data set of drawn shapes, written as image files in the layouts that
``dataset.kind: folder`` and ``dataset.kind: manifest`` read: something to try those kinds on
without data of your own.

Each class is a shape (filled circle, square, triangle, ...) of a random size, place and
colour; with contexts, the background colour is the context and each class has a majority
context, so some class x context groups are rare or empty, as in NICO++.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "bar", "ring", "star")
BACKGROUNDS = {"sand": (222, 200, 150), "sky": (120, 170, 230), "grass": (90, 160, 80),
               "night": (30, 30, 60)}


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return [(cx + a * np.cos(t), cy - a * np.sin(t)) for a, t in zip(radii, angles,
                                                                         strict=True)]
    raise ValueError(shape)


def draw_shape(shape: str, size: int, background: tuple[int, int, int],
               rng: np.random.Generator) -> Image.Image:
    """One RGB image of ``shape`` on ``background``, its size, place and colour drawn by
    ``rng``."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r, 2)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(1, int(r / 3)))
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
    elif shape == "bar":
        draw.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=colour)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=colour)
    return image


def shape_rows(counts: dict[str, list[int]], classes: int, contexts: list[str] | None,
               seed: int) -> pd.DataFrame:
    """The images to write: one row per image with ``split``, ``label``, ``context`` (its
    index, -1 without contexts) and ``name`` (``<class>/[<context>/]<nnnn>``). ``counts`` gives
    per split the images of each class; with contexts, a class's majority context (``label %
    contexts``) gets 80% of its training images, the next one none (an empty group), the rest
    share what is left; validation and test images are spread evenly."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, per_class in counts.items():
        for label in range(classes):
            n = per_class[label]
            if contexts:
                k = len(contexts)
                if split == "train":
                    major = label % k
                    empty = (label + 1) % k
                    others = [c for c in range(k) if c not in (major, empty)]
                    in_major = n if not others else max(1, round(0.8 * n))
                    spread = [others[i % len(others)] for i in range(n - in_major)] if others \
                        else []
                    which = [major] * in_major + spread
                else:
                    which = [i % k for i in range(n)]
            else:
                which = [-1] * n
            for i, context in enumerate(which):
                folder = SHAPES[label] + (f"/{contexts[context]}" if context >= 0 else "")
                rows.append({"split": split, "label": label, "context": context,
                             "name": f"{folder}/{split}_{i:04d}", "seed": int(rng.integers(2**31))})
    return pd.DataFrame(rows)


def write_shapes(root: Path, counts: dict[str, list[int]], contexts: list[str] | None = None,
                 size: int = 24, seed: int = 0, formats: tuple[str, ...] = ("png", "jpg"),
                 layout: str = "folder") -> pd.DataFrame:
    """Write the shapes of ``shape_rows`` under ``root`` as ``root/<split>/<class>/...``
    (``layout="folder"``) or as ``root/images/...`` plus ``root/manifest.csv`` with the columns
    path, label (the class name), context and split (``layout="manifest"``). File formats
    alternate over ``formats``. Returns the rows with their ``path`` relative to ``root``."""
    classes = len(next(iter(counts.values())))
    if classes > len(SHAPES):
        raise ValueError(f"at most {len(SHAPES)} shape classes")
    names = list(contexts or [])
    rows = shape_rows(counts, classes, names or None, seed)
    backgrounds = list(BACKGROUNDS.values())
    paths = []
    for i, row in enumerate(rows.itertuples()):
        fmt = formats[i % len(formats)]
        rel = (f"{row.split}/{row.name}.{fmt}" if layout == "folder"
               else f"images/{row.name}.{fmt}")
        background = backgrounds[row.context % len(backgrounds)] if row.context >= 0 \
            else (245, 245, 245)
        image = draw_shape(SHAPES[row.label], size, background,
                           np.random.default_rng(row.seed))
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(rel)
    rows["path"] = paths
    if layout == "manifest":
        table = pd.DataFrame({"path": rows["path"],
                              "label": [SHAPES[c] for c in rows["label"]],
                              "split": rows["split"]})
        if names:
            table.insert(2, "context", [names[c] for c in rows["context"]])
        table.to_csv(Path(root) / "manifest.csv", index=False)
    return rows
