"""Reading image files into fixed-size uint8 arrays, and checking them all before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ray_lt.errors import DataError


def load_image(path: str | Path, size: int, channels: int = 3) -> np.ndarray:
    """Decode a file, resize its shorter side to ``size`` and centre-crop: uint8 (size, size, C)."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at reduced scale when the file allows it
        img = img.convert("RGB" if channels == 3 else "L")
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                         Image.Resampling.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        arr = np.asarray(img, dtype=np.uint8)
    return arr if arr.ndim == 3 else arr[:, :, None]


def decode_batch(batch: pd.DataFrame, root: str, size: int, channels: int) -> pd.DataFrame:
    """Ray Data ``map_batches`` function: add the ``image`` column from the ``path`` column."""
    images = [load_image(Path(root) / p, size, channels) for p in batch["path"]]
    out = batch[["label", "group", "path"]].copy()
    out["image"] = images
    return out


def find_unreadable(batch: pd.DataFrame, root: str) -> pd.DataFrame:
    """Ray Data ``map_batches`` function: rows whose image cannot be decoded, with the reason."""
    bad_source, bad_reason = [], []
    for rel, source in zip(batch["path"], batch["source"], strict=True):
        try:
            with Image.open(Path(root) / rel) as img:
                img.draft("RGB", (64, 64))
                img.load()
        except Exception as err:  # any decoder failure is a bad file: report, never crash here
            bad_source.append(source)
            bad_reason.append(f"{type(err).__name__}: {err}")
    return pd.DataFrame({"source": bad_source, "reason": bad_reason})


def verify_images(table: pd.DataFrame, root: Path) -> None:
    """Decode every listed image once, in parallel on Ray, and fail naming each bad file:line."""
    import ray

    if table.empty:
        return
    ds = ray.data.from_pandas(table[["path", "source"]])
    bad = ds.map_batches(find_unreadable, fn_kwargs={"root": str(root)},
                         batch_format="pandas", batch_size=256).to_pandas()
    if len(bad):
        shown = "\n  ".join(f"{s}: unreadable image: {r}"
                            for s, r in zip(bad["source"][:20], bad["reason"][:20], strict=True))
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(f"{len(bad)} image(s) cannot be read\n  {shown}{more}")
