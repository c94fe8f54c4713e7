"""The writer stage of synthesis: a small pool of CPU actors after the sampler actors that
encodes a shard's images as PNG and writes the shard as one Parquet file, atomically.

The writers are actors rather than tasks so that their worker processes live as long as the
job: when the sampler actors hold every CPU slot, Ray would otherwise start (and import into) a
fresh worker process for each shard's write task.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ray_lt.atomic import atomic_file
from ray_lt.generate.codec import from_ipc, png_bytes
from ray_lt.generate.synthetic import shard_file


def encode_images(table: pa.Table) -> pa.Table:
    """Raw ``pixels`` (shape in the schema metadata) -> PNG ``image`` as the first column;
    tables without pixels (pseudo-features) pass through."""
    if "pixels" not in table.column_names:
        return table
    shape = tuple(int(v) for v in table.schema.metadata[b"shape"].decode().split(","))
    images = [png_bytes(np.frombuffer(raw, dtype=np.uint8).reshape(shape))
              for raw in table.column("pixels").to_pylist()]
    rest = table.drop_columns(["pixels"]).replace_schema_metadata(None)
    return pa.table({"image": pa.array(images, type=pa.binary()),
                     **{name: rest.column(name) for name in rest.column_names}})


def write_shards(batch: pd.DataFrame, out: str) -> pd.DataFrame:
    """Ray Data ``map_batches`` function over the sampler's output rows: write each shard under
    a temporary name and rename it, so a shard file is complete or absent; returns the
    manifest rows (sampling and writing seconds, the Unix time the file was complete)."""
    done = []
    for row in batch.to_dict("records"):
        started = time.perf_counter()
        table = encode_images(from_ipc(row["payload"]))
        path = shard_file(Path(out), row["shard_id"])
        with atomic_file(path) as tmp:
            pq.write_table(table, tmp)
        done.append({"shard_id": int(row["shard_id"]), "n": table.num_rows, "file": path.name,
                     "nonfinite": _count(table, "nonfinite_steps"),
                     "redrawn": _count(table, "redrawn"),
                     "saturated": _mean(table, "saturated"),
                     "seconds": float(row["seconds"]),
                     "write_seconds": time.perf_counter() - started, "finished": time.time()})
    return pd.DataFrame(done)


def _count(table: pa.Table, column: str) -> int:
    """Rows whose ``column`` is non-zero (0 when the column is absent)."""
    if column not in table.column_names:
        return 0
    return int(np.count_nonzero(table.column(column).to_numpy(zero_copy_only=False)))


def _mean(table: pa.Table, column: str) -> float:
    """The mean of ``column`` (0 when the column is absent or the table empty)."""
    if column not in table.column_names or table.num_rows == 0:
        return 0.0
    return float(np.mean(table.column(column).to_numpy(zero_copy_only=False)))


class ShardWriter:
    """Ray Data callable class around ``write_shards`` (one per writer actor)."""

    def __init__(self, out: str):
        self.out = out

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return write_shards(batch, self.out)
