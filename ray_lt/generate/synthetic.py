"""The synthetic data set on disk: ``DIR/synthetic/shard_*.parquet`` (one file per shard) and the
filter's verdicts, read back as a Ray Dataset for training."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import ray

from ray_lt.errors import StageError, require_stage
from ray_lt.generate.codec import decode_png

SYNTHETIC_DIR = "synthetic"
FILTER_FILE = "filter.parquet"


def shard_file(out: Path, shard_id: int) -> Path:
    """Where shard ``shard_id`` is written."""
    return Path(out) / f"shard_{int(shard_id):06d}.parquet"


def synthetic_files(run_dir: Path) -> list[str]:
    out = require_stage(Path(run_dir) / SYNTHETIC_DIR, "synthesis", "ray-lt synthesize")
    files = sorted(str(p) for p in out.glob("shard_*.parquet"))
    if not files:
        raise StageError(f"{out} holds no synthetic shard: run `ray-lt synthesize` first")
    return files


def synthetic_count(run_dir: Path) -> int:
    """Synthetic rows training will see: the rows on disk less those the filter dropped (from
    the Parquet footers; no image is read)."""
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in synthetic_files(run_dir))
    verdicts = Path(run_dir) / SYNTHETIC_DIR / FILTER_FILE
    if verdicts.is_file():
        total -= int((~pd.read_parquet(verdicts, columns=["keep"])["keep"]).sum())
    return total


def _decode_images(batch: pd.DataFrame, channels: int) -> pd.DataFrame:
    batch = batch.copy()
    batch["image"] = [decode_png(b, channels) for b in batch["image"]]
    return batch


def load_synthetic(run_dir: Path, channels: int, filtered: bool = True,
                   shards: Collection[int] | None = None) -> ray.data.Dataset:
    """The synthetic rows as a Ray Dataset with decoded ``image`` arrays (training format; or
    the pseudo-features of the ``feature`` generator), in the order of the shard files,
    without the rows the filter dropped when it ran (``filtered``); only the shards with ids
    in ``shards`` when given (the rounds so far of closed-loop synthesis)."""
    files = synthetic_files(run_dir)
    if shards is not None:
        wanted = {str(shard_file(Path(run_dir) / SYNTHETIC_DIR, i)) for i in shards}
        files = [f for f in files if f in wanted]
        if not files:
            raise StageError(f"{Path(run_dir) / SYNTHETIC_DIR} holds none of the {len(wanted)} "
                             "shards asked for")
    ds = ray.data.read_parquet(files)
    verdicts = Path(run_dir) / SYNTHETIC_DIR / FILTER_FILE
    if filtered and verdicts.is_file():
        dropped = pd.read_parquet(verdicts).query("~keep")
        drop = set(zip(dropped["shard_id"].tolist(), dropped["seed"].tolist(), strict=True))
        if drop:
            ds = ds.filter(lambda row: (row["shard_id"], row["seed"]) not in drop)
    if "image" in ds.columns():
        ds = ds.map_batches(_decode_images, fn_kwargs={"channels": channels},
                            batch_format="pandas")
    # Rows in file order however the tasks finish (materialized or not), so that training on
    # them repeats batch for batch, whatever else runs on the cluster meanwhile.
    ds.context.execution_options.preserve_order = True
    return ds
