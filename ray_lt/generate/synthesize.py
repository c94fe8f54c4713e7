"""Feedback-guided synthesis at scale: Ray Data maps a pool of ``GuidedSampler`` actors over the
quota shards, and a small pool of CPU writer actors after them writes each shard as one Parquet
file.

A shard's file is written under a temporary name and renamed when complete, and its content
depends on its seed only: a shard retried after an actor died rewrites the same rows, a rerun
skips shards already in the manifest, and the finished data set holds exactly the planned
number of rows per class or group.
"""

from __future__ import annotations

import errno
import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
from tqdm.auto import tqdm

from ray_lt.atomic import write_text_atomic
from ray_lt.cluster import cluster_capacity, request_pool
from ray_lt.config import Config
from ray_lt.data import LongTailData
from ray_lt.errors import DataError, RayLTError
from ray_lt.evaluate.predict import predict
from ray_lt.generate.factory import check_generator, check_scorer, generator_info
from ray_lt.generate.kinds import generator_kind
from ray_lt.generate.plan import (
    MANIFEST_FILE,
    MANIFEST_KEYS,
    check_counts,
    finished_shards,
    plan,
    round_of,
    store_plan,
    unlisted_shards,
)
from ray_lt.generate.sources import store_sources
from ray_lt.generate.synthetic import SYNTHETIC_DIR
from ray_lt.generate.writer import ShardWriter

log = logging.getLogger(__name__)

VAL_ERRORS_FILE = "validation_errors.json"  # the baseline's, per class (group): scale_by
MAX_BLOCKS = 2048
"""Upper bound on the input blocks of one synthesis job: one shard per block up to this many,
so that small jobs balance across actors and 18,500-shard jobs do not make 18,500 objects."""


def prepare_inputs(cfg: Config, data: LongTailData, run_dir: Path) -> None:
    """What the sampler actors read from the run directory besides the models, made once: the
    generator kind's own inputs (unCLIP's reference embeddings) and, for img2img, the
    training rows the sources are drawn from."""
    generator_kind(cfg).prepare(cfg, data, run_dir)
    if cfg.synthesis.init == "real":
        store_sources(data.train_index, data.root, data.image_shape[0], data.image_shape[2],
                      run_dir)


def sampler_kwargs(cfg: Config, data: LongTailData, run_dir: Path, guide: Path | None = None
                   ) -> dict[str, Any]:
    """The sampler actors' constructor arguments (kept small: see ``actor_payload_bytes``);
    ``guide`` is the classifier folder that guides (default ``run_dir/classifier``)."""
    return {"config": cfg.model_dump(mode="json"), "run_dir": str(run_dir),
            "use_gpu": cfg.synthesis.pool.use_gpu,
            "info": generator_info(data.class_names, data.context_names, data.image_shape[0]),
            "guide": str(guide) if guide is not None else None}


def actor_payload_bytes(kwargs: dict[str, Any]) -> int:
    """Pickled size of a constructor's arguments, what Ray ships to every actor."""
    return len(pickle.dumps(kwargs))


# Above this share of pixel values at 0 or 255 over a run's new samples, synthesis warns that
# the guidance drives them out of the images' range.
SATURATED_WARNING = 0.25


class SamplerStartError(RayLTError):
    """A sampler actor's constructor failed (weights that do not load, out of memory): Ray
    Data gives up at the first such failure instead of retrying forever."""


def _last_line(err: Exception) -> str:
    """The original exception of a Ray error: the last line of its traceback text."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _disk_full(err: BaseException) -> bool:
    """Whether a (Ray-wrapped) error is a write that ran out of disk space."""
    for candidate in (err, getattr(err, "cause", None)):
        if isinstance(candidate, OSError) and candidate.errno == errno.ENOSPC:
            return True
    return "No space left on device" in str(err)


def validation_errors(cfg: Config, data: LongTailData, run_dir: Path) -> np.ndarray:
    """The baseline classifier's error on the validation split per class (per group with
    ``synthesis.balance: group``); a unit without validation images gets the overall error."""
    e = cfg.evaluate
    rows = predict(data.val, run_dir / "classifier", e.pool)
    by_group = cfg.synthesis.balance == "group"
    units = len(data.group_counts) if by_group else data.num_classes
    wrong = (rows["pred"] != rows["label"]).to_numpy(dtype=np.float64)
    key = rows["group" if by_group else "label"].to_numpy()
    seen = np.bincount(key, minlength=units)[:units]
    missed = np.bincount(key, weights=wrong, minlength=units)[:units]
    errors = np.where(seen > 0, missed / np.maximum(seen, 1), wrong.mean())
    log.info("synthesis: guidance scale per %s from the baseline's validation error "
             "(mean %.3f, max %.3f)", "group" if by_group else "class", errors.mean(),
             errors.max())
    return errors


def synthesize(cfg: Config, data: LongTailData, run_dir: Path, round_index: int | None = None,
               guide: Path | None = None) -> pd.DataFrame:
    """Generate every planned shard not yet finished (those of round ``round_index`` only,
    when given), guided by the classifier in ``guide`` (default ``run_dir/classifier``);
    returns the per-(label, group) counts of those shards.

    Fails before any sampling when an earlier stage is missing or the stored plan differs
    from the configured one.
    """
    run_dir = Path(run_dir).resolve()
    s = cfg.synthesis
    out = run_dir / SYNTHETIC_DIR
    errors = None
    if s.scale_by == "val_error":
        # One Predictor pass per run directory: every round and every rerun reads it back.
        stored = out / VAL_ERRORS_FILE
        if stored.is_file():
            errors = np.asarray(json.loads(stored.read_text()), dtype=np.float64)
        else:
            errors = validation_errors(cfg, data, run_dir)
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(stored, json.dumps(errors.tolist()))
    shards = plan(cfg, data, errors)
    out.mkdir(parents=True, exist_ok=True)
    store_plan(out, shards)
    check_scorer(cfg, run_dir, classifier_dir=guide)
    check_generator(cfg, run_dir)
    prepare_inputs(cfg, data, run_dir)
    for stale in out.glob(".shard_*.tmp"):  # left by a writer killed mid-write
        stale.unlink(missing_ok=True)
    done = finished_shards(out)
    recovered = unlisted_shards(out, shards, done)
    if recovered:
        with (out / MANIFEST_FILE).open("a") as manifest:
            manifest.writelines(json.dumps(r) + "\n" for r in recovered)
        done |= {r["shard_id"] for r in recovered}
    shards = round_of(shards, round_index)
    pending = [sh for sh in shards if sh["shard_id"] not in done]
    kwargs = sampler_kwargs(cfg, data, run_dir, guide)
    name = "synthesis" + (f" round {round_index}/{cfg.rounds.count}" if round_index else "")
    log.info(f"{name}: {len(shards)} shards, {sum(sh['n'] for sh in shards)} samples; "
             f"{len(done)} shards already done, {len(pending)} to go; "
             f"{actor_payload_bytes(kwargs) / 1024:.1f} KB per sampler actor's constructor")
    if pending:
        # On an autoscaling cluster: the nodes of the whole pool, asked for at once.
        capacity = cluster_capacity(cfg.ray.autoscaler_config)
        writers = [{"CPU": b["CPU"]} for b in s.writer_pool.demand()]
        request_pool(s.pool.demand() + writers, capacity)
        try:
            _sample(cfg, pending, kwargs, out, name, len(done))
        finally:
            request_pool([], capacity)
    return check_counts(out, shards)


def _sample(cfg: Config, pending: list[dict[str, Any]], kwargs: dict[str, Any], out: Path,
            name: str, done: int) -> None:
    """The sampler pool over the ``pending`` shards, each shard's manifest line written once
    its file is; ``done`` shards were finished before."""
    # The sampler's module imports diffusers (seconds): a driver pays for it only here.
    from ray_lt.generate.actor import GuidedSampler

    s = cfg.synthesis
    results = ray.data.from_items(
        pending, override_num_blocks=min(len(pending), MAX_BLOCKS)).map_batches(
        # Asks for num_actors, goes on with as many as the cluster can place (at least
        # one): a pool that starts short, or loses a node, still finishes.
        GuidedSampler, fn_constructor_kwargs=kwargs, batch_format="pandas",
        **s.pool.map_batches_args()).map_batches(
        ShardWriter, fn_constructor_kwargs={"out": str(out)}, batch_format="pandas",
        **s.writer_pool.map_batches_args())
    nonfinite = redrawn = written = 0
    saturated = 0.0  # pixel values at 0 or 255, summed over the samples
    with (out / MANIFEST_FILE).open("a") as manifest, \
            tqdm(total=sum(sh["n"] for sh in pending), unit="sample", desc=name,
                 dynamic_ncols=True, mininterval=2.0) as bar:
        try:
            for row in results.iter_rows():
                manifest.write(json.dumps({k: row[k] for k in MANIFEST_KEYS}) + "\n")
                manifest.flush()
                bar.update(int(row["n"]))
                nonfinite, redrawn = nonfinite + row["nonfinite"], redrawn + row["redrawn"]
                saturated += float(row["saturated"]) * int(row["n"])
                written += 1
        except ray.exceptions.ActorDiedError as err:
            if "creation task" not in str(err):
                raise
            raise SamplerStartError(
                f"synthesis: a sampler actor could not start: {_last_line(err)}; the "
                f"{done + written} finished shard(s) in {out} are kept, rerun the "
                "same command once the cause is fixed") from None
        except (ray.exceptions.RayTaskError, OSError) as err:  # the writers' or the manifest's
            if _disk_full(err):
                raise DataError(
                    f"synthesis: the disk holding {out} is full (No space left on device, "
                    f"{shutil.disk_usage(out).free / 2**20:.1f} MiB free); the "
                    f"{done + written} finished shard(s) are kept and no partial "
                    "shard file is left: free some space, then rerun the same command"
                ) from None
            raise
    share = saturated / max(sum(sh["n"] for sh in pending), 1)
    if share > SATURATED_WARNING:
        log.warning(f"synthesis: {share:.1%} of the new samples' pixel values are saturated "
                    f"(0 or 255): guidance this strong (synthesis.guidance_scale "
                    f"{s.guidance_scale:g}) pushes the samples out of the images' range; "
                    f"per sample in the shards' saturated column. Look at the sample grid, "
                    f"or lower synthesis.guidance_scale")
    if nonfinite or redrawn:
        log.warning(f"synthesis: {nonfinite} sample(s) had guidance steps with a non-finite "
                    f"criterion gradient (skipped), {redrawn} were redrawn in float32 after "
                    f"a non-finite decode; per sample in the shards' nonfinite_steps and "
                    f"redrawn columns")
