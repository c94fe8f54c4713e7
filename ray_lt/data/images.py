"""Reading image files into fixed-size uint8 arrays, and checking them all before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ray_lt.errors import DataError

DECODE_BLOCK_ROWS = 256
VERIFY_BLOCK_ROWS = 256


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grey (a 16-bit PNG opens as ``I;16`` or ``I``) scaled to 8-bit ``L``: Pillow's own
    ``convert`` clips every value above 255 to white. Other modes pass unchanged."""
    if img.mode != "I" and not img.mode.startswith("I;16"):
        return img
    values = np.asarray(img).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


def load_image(path: str | Path, size: int, channels: int = 3) -> np.ndarray:
    """Decode a file, resize its shorter side to ``size`` and centre-crop: uint8 (size, size, C).

    Any mode becomes RGB (or L): grey, palette, RGBA (alpha dropped), CMYK, 16-bit grey
    (scaled to 8 bit). Only the centre crop is resampled (``resize`` with a ``box``): the
    pixels of resizing the whole image and cropping it, up to rounding, for less work.
    """
    mode = "RGB" if channels == 3 else "L"
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at reduced scale when the file allows it
        img = _to_8bit(img)
        if img.mode != mode:
            img = img.convert(mode)
        w, h = img.size
        scale = size / min(w, h)
        full_w, full_h = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (full_w - size) // 2, (full_h - size) // 2
        sx, sy = w / full_w, h / full_h
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        arr = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, box=box),
                         dtype=np.uint8)
    return arr if arr.ndim == 3 else arr[:, :, None]


def row_blocks(table: pd.DataFrame, rows: int) -> list[pd.DataFrame]:
    """``table`` cut into consecutive pieces of at most ``rows`` rows (one piece if empty).

    ``ray.data.from_pandas`` makes one block per piece, and Ray Data runs one map task per
    block: a split read as a single block would be decoded by one task on one CPU.
    """
    return [table.iloc[i:i + rows] for i in range(0, len(table), rows)] or [table]


def decode_batch(batch: pd.DataFrame, root: str, size: int, channels: int
                 ) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: add the ``image`` column from the ``path`` column;
    a file that cannot be decoded raises DataError naming it and its list line (``source``).

    Returns numpy columns, the images as one uint8 (B, size, size, C) array, which Ray Data
    stores as a tensor column without converting one object per row.
    """
    images = np.empty((len(batch), size, size, channels), np.uint8)
    sources = batch["source"] if "source" in batch else batch["path"]
    for i, (rel, source) in enumerate(zip(batch["path"], sources, strict=True)):
        try:
            images[i] = load_image(Path(root) / rel, size, channels)
        except Exception as err:  # a decoder failure names the file and its list line
            raise DataError(f"{source}: unreadable image {Path(root) / rel}: "
                            f"{type(err).__name__}: {err} (dataset.verify_images: true finds "
                            f"every such file before training)") from None
    return {"label": batch["label"].to_numpy(), "group": batch["group"].to_numpy(),
            "path": batch["path"].to_numpy(dtype=object), "image": images}


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
    ds = ray.data.from_pandas(row_blocks(table[["path", "source"]], VERIFY_BLOCK_ROWS))
    bad = ds.map_batches(find_unreadable, fn_kwargs={"root": str(root)},
                         batch_format="pandas", batch_size=VERIFY_BLOCK_ROWS).to_pandas()
    if len(bad):
        shown = "\n  ".join(f"{s}: unreadable image: {r}"
                            for s, r in zip(bad["source"][:20], bad["reason"][:20], strict=True))
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(f"{len(bad)} image(s) cannot be read\n  {shown}{more}")
