"""Image bytes of the synthetic data: PNG per sample, and the raw-pixel Arrow table in which a
sampler actor hands a finished shard to the writer stage."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, C) -> PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes, channels: int) -> np.ndarray:
    """PNG file bytes -> uint8 (H, W, channels)."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def to_ipc(table: pa.Table) -> bytes:
    """An Arrow table as IPC stream bytes (a copy, no encoding)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    """IPC stream bytes -> the Arrow table."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
