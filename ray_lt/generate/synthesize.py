"""Feedback-guided synthesis at scale: Ray Data maps a pool of ``GuidedSampler`` actors over the
quota shards, and a small pool of CPU writer actors after them writes each shard as one Parquet
file.

A shard's file is written under a temporary name and renamed when complete, and its content
depends on its seed only: a shard retried after an actor died rewrites the same rows, a rerun
skips shards already in the manifest, and the finished data set holds exactly the planned
number of rows per class or group.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from tqdm.auto import tqdm

from ray_lt.config import Config
from ray_lt.data import LongTailData
from ray_lt.generate.actor import GuidedSampler
from ray_lt.generate.factory import check_generator, check_scorer, generator_info
from ray_lt.generate.plan import (
    MANIFEST_FILE,
    MANIFEST_KEYS,
    check_counts,
    finished_shards,
    plan,
    store_plan,
)
from ray_lt.generate.references import (
    REFERENCES_DIR,
    choose_references,
    embed_references,
    reference_settings,
)
from ray_lt.generate.synthetic import SYNTHETIC_DIR
from ray_lt.generate.writer import ShardWriter

log = logging.getLogger(__name__)

MAX_BLOCKS = 2048
"""Upper bound on the input blocks of one synthesis job: one shard per block up to this many,
so that small jobs balance across actors and 18,500-shard jobs do not make 18,500 objects."""


def prepare_references(cfg: Config, data: LongTailData, run_dir: Path) -> Path | None:
    """For ``unclip``: choose the reference rows by index with the config seed and store their
    CLIP image embeddings in ``DIR/references/`` (once; redone when their settings change)."""
    g = cfg.generator
    if g.kind != "unclip":
        return None
    index = data.train_index
    settings = reference_settings(g.pretrained, g.references_per_group, cfg.seed,
                                  data.image_shape[0])
    chosen = choose_references(index["label"].to_numpy(), index["group"].to_numpy(),
                               g.references_per_group, cfg.seed)
    column = "path" if data.root is not None else "image"
    chosen[column] = index[column].to_numpy()[chosen["row"].to_numpy()]
    s = cfg.synthesis
    return embed_references(chosen, Path(run_dir) / REFERENCES_DIR, settings, data.root,
                            data.image_shape[2], s.num_actors, s.cpus_per_actor,
                            s.gpus_per_actor, s.precision)


def sampler_kwargs(cfg: Config, data: LongTailData, run_dir: Path) -> dict[str, Any]:
    """The sampler actors' constructor arguments (kept small: see ``actor_payload_bytes``)."""
    return {"config": cfg.model_dump(mode="json"), "run_dir": str(run_dir),
            "use_gpu": cfg.synthesis.gpus_per_actor > 0,
            "info": generator_info(data.class_names, data.context_names, data.image_shape[0])}


def actor_payload_bytes(kwargs: dict[str, Any]) -> int:
    """Pickled size of a constructor's arguments, what Ray ships to every actor."""
    return len(pickle.dumps(kwargs))


def synthesize(cfg: Config, data: LongTailData, run_dir: Path) -> pd.DataFrame:
    """Generate every planned shard not yet finished; returns the per-(label, group) counts.

    Fails before any sampling when an earlier stage is missing or the stored plan differs
    from the configured one.
    """
    run_dir = Path(run_dir).resolve()
    s = cfg.synthesis
    shards = plan(cfg, data)
    out = run_dir / SYNTHETIC_DIR
    out.mkdir(parents=True, exist_ok=True)
    store_plan(out, shards)
    check_scorer(cfg, run_dir)
    check_generator(cfg, run_dir)
    prepare_references(cfg, data, run_dir)
    done = finished_shards(out)
    pending = [sh for sh in shards if sh["shard_id"] not in done]
    kwargs = sampler_kwargs(cfg, data, run_dir)
    log.info(f"synthesis: {len(shards)} shards, {sum(sh['n'] for sh in shards)} samples; "
             f"{len(done)} shards already done, {len(pending)} to go; "
             f"{actor_payload_bytes(kwargs) / 1024:.1f} KB per sampler actor's constructor")
    if pending:
        results = ray.data.from_items(
            pending, override_num_blocks=min(len(pending), MAX_BLOCKS)).map_batches(
            GuidedSampler, fn_constructor_kwargs=kwargs,
            compute=ray.data.ActorPoolStrategy(size=s.num_actors),
            batch_size=1, batch_format="pandas",
            num_cpus=s.cpus_per_actor, num_gpus=s.gpus_per_actor).map_batches(
            ShardWriter, fn_constructor_kwargs={"out": str(out)},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=s.writer_actors),
            batch_size=1, batch_format="pandas", num_cpus=s.writer_cpus)
        with (out / MANIFEST_FILE).open("a") as manifest, \
                tqdm(total=sum(sh["n"] for sh in pending), unit="sample", desc="synthesis",
                     dynamic_ncols=True, mininterval=2.0) as bar:
            for row in results.iter_rows():
                manifest.write(json.dumps({k: row[k] for k in MANIFEST_KEYS}) + "\n")
                manifest.flush()
                bar.update(int(row["n"]))
    return check_counts(out, shards)
