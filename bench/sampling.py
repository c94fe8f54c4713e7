"""Cost of feedback guidance and of the ways to run the sampler, measured side by side.

    python bench/sampling.py [--batch 32] [--steps 30] [--actors-run DIR]

1. guided / unguided sampling time at k = 1 and k = 5 (same batch, same seeds) for the pixel
   generator (the digits_lt architecture) and a tiny unCLIP built from configs;
2. one batch of 32 vs 32 one-by-one calls;
3. with ``--actors-run DIR`` (a run directory holding ``classifier/`` and ``generator/``):
   Ray Data synthesis throughput with 2 sampler actors vs 1 on this machine (twice each,
   alternating), with actor start-up and in the steady state after the first shard.
Weights are random: the cost of a step does not depend on them.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import DDIMScheduler

from ray_lt.generate.criteria import CriterionScorer
from ray_lt.generate.pixel import (
    ConditionedUNet,
    PixelGenerator,
    build_unet,
    training_scheduler,
)
from ray_lt.generate.sampler import Guidance, guided_sample
from ray_lt.generate.unclip import UnCLIPGenerator
from ray_lt.testing import tiny_unclip_components
from ray_lt.train.models import build_model


def timed(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def pixel_parts() -> tuple[PixelGenerator, CriterionScorer]:
    torch.manual_seed(0)
    unet = build_unet(16, 1, 10, [32, 64, 64], 1, True)
    generator = PixelGenerator(ConditionedUNet(unet, 10),
                               DDIMScheduler.from_config(training_scheduler().config), False)
    classifier = build_model("small_cnn", 10, 1, 32).eval()
    return generator, CriterionScorer(classifier, ["entropy"])


def unclip_parts() -> tuple[UnCLIPGenerator, CriterionScorer]:
    rng = np.random.default_rng(0)
    refs = {"class": {c: [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)]
                      for c in range(10)}}
    generator = UnCLIPGenerator(**tiny_unclip_components(0), class_names=[str(c) for c in
                                                                         range(10)],
                                reference_images=refs, embedding_dropout=0.5, noise_level=0,
                                image_size=32, height=64, width=64)
    classifier = build_model("small_cnn", 10, 3, 32).eval()
    return generator, CriterionScorer(classifier, ["entropy"])


def sample(parts, seeds: list[int], steps: int, guidance: Guidance) -> None:
    generator, scorer = parts
    n = len(seeds)
    guided_sample(generator, scorer, torch.arange(n) % 10, torch.full((n,), -1),
                  torch.zeros(n, dtype=torch.long), seeds, steps, 3.0, guidance)


def guidance_costs(name: str, parts, batch: int, steps: int) -> None:
    seeds = list(range(batch))
    plain = timed(lambda: sample(parts, seeds, steps, Guidance(scale=0.0)))
    print(f"\n{name}: batch {batch}, {steps} DDIM steps, CFG on; unguided {plain:.2f} s")
    for label, guidance in [
        ("k=1", Guidance(0.03, every=1)),
        ("k=5", Guidance(0.03, every=5)),
        ("k=5, reuse last gradient", Guidance(0.03, every=5, reuse=True)),
        ("k=5, gradient through the UNet", Guidance(0.03, every=5, through_unet=True)),
    ]:
        t = timed(lambda g=guidance: sample(parts, seeds, steps, g))
        print(f"  guided {label:32s} {t:6.2f} s   guided/unguided {t / plain:.2f}")


def batching_costs(parts, batch: int, steps: int) -> None:
    seeds = list(range(batch))
    print(f"\npixel: one batch of {batch} vs {batch} one-by-one calls ({steps} steps)")
    for label, guidance in [("unguided", Guidance(0.0)), ("guided k=5", Guidance(0.03, 5))]:
        batched = timed(lambda g=guidance: sample(parts, seeds, steps, g), repeats=1)
        single = timed(lambda g=guidance: [sample(parts, [s], steps, g) for s in seeds],
                       repeats=1)
        print(f"  {label:12s} batched {batched:6.2f} s  one-by-one {single:6.2f} s  "
              f"speed-up {single / batched:.1f}x")


def _matmul_steps(n: int) -> float:
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    started = time.perf_counter()
    for _ in range(n):
        a = torch.tanh(a @ a / 512)
    return time.perf_counter() - started


def process_scaling(steps: int = 400) -> None:
    """What this machine gives two single-thread processes against one, without Ray: the
    ceiling for the 2-vs-1 actor ratio."""
    import multiprocessing as mp

    rates = {}
    for procs in (1, 2, 1, 2):
        with mp.get_context("spawn").Pool(procs) as pool:
            started = time.perf_counter()
            pool.map(_matmul_steps, [steps] * procs)
            rates.setdefault(procs, []).append(procs * steps / (time.perf_counter() - started))
    print(f"\nplain torch, one thread per process: 2 processes / 1 process "
          f"{np.mean(rates[2]) / np.mean(rates[1]):.2f}")


def actor_costs(run_dir: Path, quota_scale: float) -> None:
    import ray

    from ray_lt import pipeline
    from ray_lt.cluster import init_ray
    from ray_lt.config import load_config
    from ray_lt.generate import synthesize

    print(f"\nRay Data synthesis on this machine, same plan (quota_scale {quota_scale:g}, "
          "30 steps, k=5); steady state: rows after the first finished shard / time since it")
    rates = {}
    for actors in (1, 2, 1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            out.mkdir()
            for stage in ("classifier", "generator"):
                shutil.copytree(run_dir / stage, out / stage)
            cfg = load_config("configs/digits_lt.yaml", [
                f"synthesis.quota_scale={quota_scale}", "synthesis.max_shard_size=16",
                f"synthesis.num_actors={actors}", "synthesis.cpus_per_actor=0.85",
                "synthesis.writer_cpus=0.25", "ray.address=local"])
            init_ray(cfg.ray)
            ray.data.DataContext.get_current().enable_progress_bars = False
            data = pipeline.prepare(cfg, out).data
            pipeline.criterion_support(cfg, out, data)
            started = time.time()
            synthesize.synthesize(cfg, data, out)
            wall = time.time() - started
            manifest = pd.read_json(out / "synthetic" / "manifest.jsonl", lines=True)
            arrivals = sorted(zip(manifest["finished"], manifest["n"], strict=True))
            total = sum(n for _, n in arrivals)
            first, first_n = arrivals[0]
            steady = (total - first_n) / (arrivals[-1][0] - first)
            rates.setdefault(actors, []).append((total / wall, steady))
            print(f"  {actors} actor(s): {total} samples in {len(arrivals)} shards, wall "
                  f"{wall:.1f} s ({total / wall:.2f} samples/s, actor start-up included); "
                  f"steady state {steady:.2f} samples/s")
    for i, name in enumerate(("wall, start-up included", "steady state")):
        one = np.mean([r[i] for r in rates[1]])
        two = np.mean([r[i] for r in rates[2]])
        print(f"  throughput 2 actors / 1 actor, {name}: {two / one:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--actors-run", type=Path, default=None)
    parser.add_argument("--quota-scale", type=float, default=0.5)
    parser.add_argument("--actors-only", action="store_true",
                        help="with --actors-run: skip the single-process measurements")
    args = parser.parse_args()
    if args.actors_only and args.actors_run is not None:
        process_scaling()
        actor_costs(args.actors_run, args.quota_scale)
        return
    torch.set_num_threads(2)
    pixel = pixel_parts()
    guidance_costs("pixel generator (digits_lt UNet2DModel, 16x16x1)", pixel, args.batch,
                   args.steps)
    guidance_costs("tiny unCLIP (64x64 generation, decoded to 32x32)", unclip_parts(), 8,
                   args.steps)
    batching_costs(pixel, args.batch, args.steps)
    if args.actors_run is not None:
        process_scaling()
        actor_costs(args.actors_run, args.quota_scale)


if __name__ == "__main__":
    main()
