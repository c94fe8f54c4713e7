"""Source images of img2img synthesis (``synthesis.init: real``, DA-Fusion's real guidance): every
sample starts from a real training image of its group (its class where the group has none),
chosen by the sample's seed.

The training split's labels, groups and file paths (the images themselves for the embedded data
sets) are stored once in ``DIR/sources/``; sampler actors read that table and decode only the
images their samples draw, each encoded alone and cached by row, so that a sample's start never
depends on its batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ray_lt.errors import DataError, require_stage
from ray_lt.generate.base import sample_generators

if TYPE_CHECKING:
    import pandas as pd

SOURCES_DIR = "sources"
SOURCES_FILE = "sources.parquet"
META_FILE = "sources.json"
SOURCE_STREAM = 3  # the per-sample generator stream of the source draw


def store_sources(index: pd.DataFrame, root: Path | None, image_size: int, channels: int,
                  run_dir: Path) -> Path:
    """Write the training split's ``row``, ``label``, ``group`` and ``path`` (or ``image``)
    to ``run_dir/sources`` unless the same table is already there."""
    import pandas as pd

    from ray_lt.atomic import staged_folder

    folder = Path(run_dir) / SOURCES_DIR
    column = "path" if root is not None else "image"
    meta = {"root": str(root) if root is not None else None, "image_size": int(image_size),
            "channels": int(channels), "rows": len(index)}
    stored = folder / META_FILE
    if stored.is_file() and json.loads(stored.read_text()) == meta:
        return folder
    table = pd.DataFrame({"row": np.arange(len(index)), "label": index["label"].to_numpy(),
                          "group": index["group"].to_numpy(), column: index[column].to_numpy()})
    if column == "image":
        table["image"] = [np.asarray(i, dtype=np.uint8).tobytes() for i in table["image"]]
    with staged_folder(folder) as tmp:
        tmp.mkdir(parents=True)
        table.to_parquet(tmp / SOURCES_FILE, index=False)
        (tmp / META_FILE).write_text(json.dumps(meta))
    return folder


class Sources:
    """The stored training rows: which rows each class and group holds, and each row's image
    as uint8 (H, W, C) at a requested size."""

    def __init__(self, table: pd.DataFrame, root: str | None, image_size: int, channels: int):
        self.table = table.set_index("row", drop=False)
        self.root = Path(root) if root else None
        self.image_size, self.channels = int(image_size), int(channels)
        self.by_class = {int(k): v.to_numpy() for k, v in table.groupby("label")["row"]}
        self.by_group = {int(k): v.to_numpy() for k, v in table.groupby("group")["row"]
                         if k >= 0}

    @classmethod
    def load(cls, run_dir: Path) -> Sources:
        import pandas as pd

        folder = require_stage(Path(run_dir) / SOURCES_DIR / META_FILE, "img2img sources",
                               "ray-lt synthesize").parent
        meta = json.loads((folder / META_FILE).read_text())
        return cls(pd.read_parquet(folder / SOURCES_FILE), meta["root"], meta["image_size"],
                   meta["channels"])

    def pick(self, labels: list[int], groups: list[int], seeds: list[int]) -> list[int]:
        """The source row of each sample, uniform over its group's rows (its class's when the
        group has none), drawn from the seed's own stream."""
        rows = []
        for label, group, gen in zip(labels, groups,
                                     sample_generators(seeds, stream=SOURCE_STREAM), strict=True):
            pool = self.by_group.get(group)
            if pool is None or not len(pool):
                pool = self.by_class.get(label)
            if pool is None or not len(pool):
                raise DataError(f"synthesis.init: real needs a training image of class {label}, "
                                f"and it has none")
            rows.append(int(pool[int(torch.randint(len(pool), (1,), generator=gen))]))
        return rows

    def image(self, row: int, height: int, width: int, channels: int) -> np.ndarray:
        """Row ``row``'s image, resized (shorter side) and centre-cropped to (height, width)."""
        entry = self.table.loc[row]
        if self.root is not None:
            from ray_lt.data.images import load_image

            image = load_image(self.root / entry["path"], max(height, width), channels)
        else:
            stored = np.frombuffer(entry["image"], dtype=np.uint8).reshape(
                self.image_size, self.image_size, self.channels)
            pil = Image.fromarray(stored[..., 0] if self.channels == 1 else stored)
            side = max(height, width)
            image = np.asarray(pil.convert("L" if channels == 1 else "RGB").resize(
                (side, side), Image.Resampling.BILINEAR))
            image = image[:, :, None] if image.ndim == 2 else image
        top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
        return image[top:top + height, left:left + width]


class SourceLatents:
    """The starting latents of img2img: each sample's source row, its image encoded by
    ``encode`` (uint8 (H, W, C) -> latent), one image at a time and cached by row."""

    def __init__(self, sources: Sources, encode: Callable[[np.ndarray], torch.Tensor],
                 height: int, width: int, channels: int):
        self.sources, self.encode = sources, encode
        self.height, self.width, self.channels = height, width, channels
        self._cache: dict[int, torch.Tensor] = {}

    def __call__(self, labels: list[int], groups: list[int], seeds: list[int]
                 ) -> tuple[torch.Tensor, list[int]]:
        rows = self.sources.pick(labels, groups, seeds)
        for row in rows:
            if row not in self._cache:
                image = self.sources.image(row, self.height, self.width, self.channels)
                self._cache[row] = self.encode(image)
        return torch.stack([self._cache[row] for row in rows]), rows
