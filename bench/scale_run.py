"""The whole pipeline on a data set of ImageNet-LT's (or Places-LT's) real shape, stage by
stage, with each stage's wall time and this driver's peak resident memory.

    python bench/lt_shape.py imagenet_lt --out /data/lt/imagenet_lt --unclip /data/lt/unclip
    python bench/scale_run.py --root /data/lt/imagenet_lt --unclip /data/lt/unclip \
        --out runs/scale_imagenet_lt [--set key=value ...]

Quotas and the plan are those of the full data set (1.18M samples for ImageNet-LT) when the
plan is timed; the sampled share is cut by ``synthesis.quota_scale`` so that a CPU finishes.
Prints one line per stage and writes ``stages.csv`` into the run directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray_lt import pipeline  # noqa: E402
from ray_lt.config import load_config  # noqa: E402
from ray_lt.stages import StageMeter  # noqa: E402


@contextmanager
def meter(rows: list[dict], stage: str):
    """Wall time and peak RSS of this process over the block, one printed line."""
    with StageMeter(every=0.05) as measured:
        yield
    rows.append({"stage": stage, "seconds": measured.seconds,
                 "driver_peak_rss_mb": measured.peak_rss_mb})
    print(f"{stage:24s} {measured.seconds:8.1f} s   driver peak RSS "
          f"{measured.peak_rss_mb:7.0f} MB", flush=True)


def actor_payload(cfg, data, out_dir: Path) -> int:
    """Pickled bytes of one sampler actor's constructor arguments."""
    from ray_lt.generate.synthesize import actor_payload_bytes, sampler_kwargs

    return actor_payload_bytes(sampler_kwargs(cfg, data, out_dir))


def full_plan(cfg, data, rows: list[dict]) -> None:
    """Plan, store, manifest and count check of the full quota (quota_scale 1)."""
    from ray_lt.generate.plan import check_counts, finished_shards, store_plan
    from ray_lt.generate.quota import class_quotas, plan_shards

    s = cfg.synthesis
    with meter(rows, "plan (full quota)"):
        shards = plan_shards(class_quotas(data.class_counts, s.target, 1.0, s.quota_minimum),
                             s.max_shard_size, cfg.seed, False)
    print(f"  full plan: {len(shards)} shards, {sum(x['n'] for x in shards)} samples")
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for shard in shards:  # stand-in shard files: label and group columns only
            n = shard["n"]
            pq.write_table(pa.table({"label": [shard["label"]] * n,
                                     "group": [shard["group"]] * n}),
                           out / f"shard_{shard['shard_id']:06d}.parquet")
        with (out / "manifest.jsonl").open("w") as f:
            for shard in shards:
                f.write(json.dumps({"shard_id": shard["shard_id"], "n": shard["n"]}) + "\n")
        with meter(rows, "store + manifest + count"):
            store_plan(out, shards)
            done = finished_shards(out)
            counts = check_counts(out, shards)
        print(f"  {len(done)} finished shards, {int(counts['written'].sum())} rows checked")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--unclip", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default=str(ROOT / "configs/imagenet_lt.yaml"))
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--set", nargs="*", default=[])
    args = parser.parse_args()
    overrides = [f"dataset.root={args.root}", f"dataset.num_classes={args.num_classes}",
                 "dataset.image_size=16", "dataset.class_names_file=null",
                 f"generator.pretrained={args.unclip}", "generator.height=32",
                 "generator.width=32", "model.name=small_cnn", "model.checkpoint=null",
                 "train.epochs=1", "train.batch_size=256", "synthesis.num_steps=10",
                 "synthesis.quota_scale=0.0005", "synthesis.batch_size=16",
                 "synthesis.precision=fp32", "synthesis.compile=false",
                 "synthesis.cpus_per_actor=0.9",
                 "scaling.num_workers=1", "scaling.use_gpu=false", "scaling.cpus_per_worker=1",
                 "synthesis.gpus_per_actor=0", "synthesis.num_actors=1",
                 "evaluate.gpus_per_actor=0", "evaluate.num_actors=1",
                 "evaluate.cpus_per_actor=0.5", "report.quality=false", "report.grid=false",
                 "ray.address=local",
                 *args.set]
    cfg = load_config(args.config, overrides)
    rows: list[dict] = []
    with meter(rows, "load + check data"):
        session = pipeline.prepare(cfg, args.out)
    out_dir, data = session.out_dir, session.data
    print(f"  {data.num_classes} classes, {int(data.class_counts.sum())} training images")
    full_plan(cfg, data, rows)
    print(f"  sampler actor constructor: {actor_payload(cfg, data, out_dir) / 2**20:.2f} MB")
    for stage in pipeline.RUN_STAGES:
        with meter(rows, stage.title):
            pipeline.run_stage(stage, session)
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "stages.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))


if __name__ == "__main__":
    main()
