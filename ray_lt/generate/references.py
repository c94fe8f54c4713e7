"""The unCLIP image conditions: a few real training images per class and per group, chosen by
row index with the config seed, embedded once by CLIP's image encoder on a Ray Data actor pool
and stored in ``DIR/references/`` (the FG paper's unCLIP conditioning).

Sampler actors read the stored embeddings; no image and no per-image array travels through the
driver or an actor's constructor, whatever the size of the data set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import torch

from ray_lt.atomic import staged_folder
from ray_lt.config import Pool

REFERENCES_DIR = "references"
META_FILE = "references.json"
REFERENCE_STREAM = 0x5EF
"""Spawn key that keeps the reference draw apart from every other use of the config seed."""


def choose_references(labels: np.ndarray, groups: np.ndarray, per_group: int, seed: int
                      ) -> pd.DataFrame:
    """Up to ``per_group`` training rows per class and per group (``group >= 0``), uniformly at
    random given ``seed``: columns ``row`` (position in the split), ``label``, ``group``,
    ``for_class``, ``for_group``, sorted by row. Reads labels only, never an image."""
    labels, groups = np.asarray(labels, dtype=np.int64), np.asarray(groups, dtype=np.int64)
    if labels.shape != groups.shape or labels.ndim != 1:
        raise ValueError(f"labels and groups must be 1-D of one length, got {labels.shape} and "
                         f"{groups.shape}")
    if per_group < 1:
        raise ValueError(f"per_group must be >= 1, got {per_group}")
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(REFERENCE_STREAM,)))
    table = pd.DataFrame({"row": np.arange(len(labels)), "label": labels, "group": groups})
    table = table.iloc[np.argsort(rng.random(len(table)), kind="stable")]
    table["for_class"] = table.groupby("label").cumcount().to_numpy() < per_group
    table["for_group"] = (table["group"].to_numpy() >= 0) & \
        (table.groupby("group").cumcount().to_numpy() < per_group)
    chosen = table[table["for_class"] | table["for_group"]]
    return chosen.sort_values("row").reset_index(drop=True)


@dataclass
class References:
    """Stored reference embeddings (R, E) float32 and, per class and per group, the positions
    of its references in them."""

    embeds: torch.Tensor
    by_class: dict[int, list[int]]
    by_group: dict[int, list[int]]

    @classmethod
    def from_table(cls, table: pd.DataFrame) -> References:
        table = table.sort_values("row").reset_index(drop=True)
        embeds = torch.from_numpy(np.stack(table["embedding"].to_numpy()).astype(np.float32))
        by_class: dict[int, list[int]] = {}
        by_group: dict[int, list[int]] = {}
        for i, (label, group, for_class, for_group) in enumerate(zip(
                table["label"], table["group"], table["for_class"], table["for_group"],
                strict=True)):
            if for_class:
                by_class.setdefault(int(label), []).append(i)
            if for_group:
                by_group.setdefault(int(group), []).append(i)
        return cls(embeds, by_class, by_group)


def reference_settings(pretrained: str, per_group: int, seed: int, image_size: int) -> dict:
    """What the stored references were made from: a change means they are made again."""
    return {"pretrained": str(pretrained), "per_group": int(per_group), "seed": int(seed),
            "image_size": int(image_size)}


def load_references(folder: str | Path) -> References:
    """The references stored in ``folder`` (``ray-lt synthesize`` makes them)."""
    from ray_lt.errors import require_stage

    folder = require_stage(Path(folder) / META_FILE, "references", "ray-lt synthesize").parent
    files = sorted(str(f) for f in folder.glob("*.parquet"))
    table = pads.dataset(files, format="parquet").to_table().to_pandas()
    return References.from_table(table)


class ReferenceEmbedder:
    """Ray Data callable class: CLIP image embeddings of reference rows, decoding each image
    from its file (``root``) or taking it from the row (embedded data sets)."""

    def __init__(self, pretrained: str, root: str | None, image_size: int, channels: int,
                 use_gpu: bool, precision: str):
        from ray_lt.generate.pretrained import load_component

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.dtype = dtype if self.device.type == "cuda" else torch.float32
        self.encoder = load_component(pretrained, "unclip", "image_encoder", self.dtype)
        self.encoder.to(self.device).eval().requires_grad_(False)
        self.processor = load_component(pretrained, "unclip", "feature_extractor")
        self.root = Path(root) if root else None
        self.image_size, self.channels = image_size, channels

    @torch.no_grad()
    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from ray_lt.data.images import load_image
        from ray_lt.generate.unclip import rgb

        if self.root is not None:
            images = [load_image(self.root / p, self.image_size, self.channels)
                      for p in batch["path"]]
        else:
            images = [np.asarray(i, dtype=np.uint8).reshape(self.image_size, self.image_size, -1)
                      for i in batch["image"]]
        pixels = self.processor(images=[rgb(i) for i in images], return_tensors="pt")
        embeds = self.encoder(pixels.pixel_values.to(self.device, self.dtype)).image_embeds
        out = batch[["row", "label", "group", "for_class", "for_group"]].copy()
        out["embedding"] = list(embeds.float().cpu().numpy())
        return out


def embed_references(chosen: pd.DataFrame, folder: Path, settings: dict[str, Any],
                     root: Path | None, channels: int, pool: Pool, precision: str) -> Path:
    """Embed the ``chosen`` rows (with a ``path`` or an ``image`` column) on a Ray Data actor
    ``pool`` (``SynthesisConfig.reference_pool``) and write them to ``folder`` as Parquet;
    skipped when ``folder`` already holds references made with the same ``settings``. Written
    under a temporary name, then renamed."""
    import ray

    folder = Path(folder)
    meta = folder / META_FILE
    if meta.is_file() and json.loads(meta.read_text()).get("settings") == settings:
        return folder
    from ray_lt.data.images import row_blocks

    size = max(pool.batch_size, -(-len(chosen) // (4 * pool.size)))
    ds = ray.data.from_pandas(row_blocks(chosen, size)).map_batches(
        ReferenceEmbedder,
        fn_constructor_kwargs={"pretrained": settings["pretrained"],
                               "root": str(root) if root else None,
                               "image_size": settings["image_size"], "channels": channels,
                               "use_gpu": pool.use_gpu, "precision": precision},
        batch_format="pandas", **pool.map_batches_args())
    with staged_folder(folder) as tmp:
        ds.write_parquet(str(tmp))
        (tmp / META_FILE).write_text(json.dumps({"settings": settings, "rows": len(chosen)}))
    return folder
