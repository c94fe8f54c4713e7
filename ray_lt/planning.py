"""``ray-lt plan``: what a run will make and cost, before anything runs.

Reads and checks the data (no Ray: the index files only), then gives the class-count profile
(Many / Medium / Few, and a histogram of the long tail with the quota on top), the synthetic
quota (total, per split of classes, shards), the disk the samples will take (PNG bytes
measured on a few training images at the run's image size) and the sampler time per GPU kind
and count from ``SAMPLER_COSTS``: a per-image cost measured on one GPU and scaled to others,
an estimate (docs/performance.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ray_lt.config import Config
from ray_lt.data import LongTailData, load_dataset
from ray_lt.evaluate.metrics import class_splits
from ray_lt.evaluate.plots import plot_class_counts
from ray_lt.generate.codec import png_bytes
from ray_lt.generate.plan import plan

PLAN_SUMMARY = "plan_summary.json"
HISTOGRAM = "class_counts.png"


@dataclass(frozen=True)
class SamplerCost:
    """Guided images per second of one sampler on one GPU, at ``size`` px and ``steps`` DDIM
    steps, with the settings named in ``setting``."""

    models: tuple[str, ...]
    size: int
    steps: int
    images_per_second: float
    setting: str


# Measured on one H100 80GB (docs/performance.md, "Measured on one H100"): SD 2.1 unCLIP,
# bf16, CFG, guidance every 5 steps, batch 32 at 512 px and 16 at 768 px. SD 1.x / 2.x have
# the same UNet size (about 865M parameters), so their cost per image is taken to be the same.
SAMPLER_COSTS = (
    SamplerCost(("unclip", "sd"), 512, 30, 6.18, "guided, latent_resize decode, compiled, "
                                                  "batch 32"),
    SamplerCost(("unclip", "sd"), 768, 30, 0.65, "guided, full VAE decode, eager, batch 16"),
)
MEASURED_ON = "H100"
# Peak dense bf16 tensor FLOP/s from the vendors' data sheets (TFLOP/s): an estimate for the
# other cards scales the H100's measured rate by this ratio.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}
GPU_COUNTS = (1, 8, 64)
DEFAULT_SIZE = {"unclip": 768, "sd": 512, "sdxl": 1024}
PNG_PROBES = 16


def sampler_cost(cfg: Config) -> tuple[SamplerCost, float, int] | None:
    """The cost row for the config's generator, its scale to the config's image size and
    steps (work grows with the pixels and the steps) and that size; None where nothing was
    measured."""
    kind = cfg.generator.kind
    rows = [r for r in SAMPLER_COSTS if kind in r.models]
    if not rows:
        return None
    size = generator_size(cfg)
    row = min(rows, key=lambda r: abs(r.size - size))
    scale = (size / row.size) ** 2 * cfg.synthesis.num_steps / row.steps
    return row, scale, size


def generator_size(cfg: Config) -> int:
    """The side in pixels the generator samples at: ``generator.height``, else the model
    folder's own (UNet sample size x the VAE factor), else the model family's default."""
    g = cfg.generator
    if getattr(g, "height", None):
        return int(g.height)
    folder = Path(str(getattr(g, "pretrained", "") or ""))
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_SIZE.get(g.kind, cfg.dataset.image_size)


def png_bytes_per_image(data: LongTailData, seed: int) -> tuple[float, str]:
    """Mean PNG size of a training image at the run's image size (a few decoded and encoded
    as the writer does), and how it was found."""
    from ray_lt.data.images import load_image

    size, _, channels = data.image_shape
    table = data.tables["train"]
    picks = np.random.default_rng(seed).choice(len(table), min(PNG_PROBES, len(table)),
                                               replace=False)
    if data.root is None:
        sizes = [len(png_bytes(table["image"].iloc[i])) for i in picks]
    else:
        sizes = [len(png_bytes(load_image(data.root / table["path"].iloc[i], size, channels)))
                 for i in picks]
    return float(np.mean(sizes)), f"{len(sizes)} training images encoded at {size} px"


def summarize(cfg: Config, out: Path | None = None) -> dict[str, Any]:
    """Everything ``ray-lt plan`` prints, as a dict; with ``out``, the histogram and the dict
    are written there too."""
    started = time.perf_counter()
    data = load_dataset(cfg.dataset, cfg.seed)
    loaded = time.perf_counter() - started
    ev, s = cfg.evaluate, cfg.synthesis
    counts = np.asarray(data.class_counts)
    splits = class_splits(counts, ev.many_threshold, ev.few_threshold)
    shards = plan(cfg, data)
    per_class = np.zeros(len(counts), np.int64)
    for shard in shards:
        per_class[shard["label"]] += shard["n"]
    total = int(per_class.sum())
    png, png_how = png_bytes_per_image(data, cfg.seed)
    summary: dict[str, Any] = {
        "dataset": cfg.dataset.kind, "load_seconds": round(loaded, 2),
        "images": {k: len(v) for k, v in data.tables.items()},
        "classes": len(counts), "contexts": len(data.context_names),
        "class_counts": {"max": int(counts.max()), "median": float(np.median(counts)),
                         "min": int(counts.min())},
        "profile": {name: {"classes": int(mask.sum()), "images": int(counts[mask].sum()),
                           "quota": int(per_class[mask].sum())}
                    for name, mask in splits.items()},
        "quota": {"total": total, "shards": len(shards), "max_shard_size": s.max_shard_size,
                  "target": s.target if s.target is not None else int(counts.max()),
                  "balance": s.balance, "quota_scale": s.quota_scale},
        "disk": {"bytes_per_image": round(png), "total_bytes": int(png * total),
                 "how": png_how},
    }
    if data.group_counts is not None:
        summary["groups"] = {"count": int(len(data.group_counts)),
                             "empty": int((data.group_counts == 0).sum())}
    summary["sampler"] = sampler_estimate(cfg, total)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plot_class_counts(counts, per_class, ev.many_threshold, ev.few_threshold,
                          out / HISTOGRAM, title=f"{cfg.dataset.kind}: training images and "
                                                 f"synthetic quota per class")
        summary["histogram"] = str(out / HISTOGRAM)
        (out / PLAN_SUMMARY).write_text(json.dumps(summary, indent=1))
    return summary


def sampler_estimate(cfg: Config, total: int) -> dict[str, Any]:
    """Hours of sampling ``total`` images per GPU kind and count (an estimate), or why there
    is none."""
    found = sampler_cost(cfg)
    if found is None:
        return {"estimate": None,
                "why": f"no GPU cost is measured for generator.kind {cfg.generator.kind}; "
                       f"bench/sampling.py measures this config's rate"}
    row, scale, size = found
    seconds = scale / row.images_per_second  # per image on an H100
    hours = {gpu: {n: round(total * seconds * PEAK_BF16_TFLOPS[MEASURED_ON] / peak / n / 3600,
                            2) for n in GPU_COUNTS}
             for gpu, peak in PEAK_BF16_TFLOPS.items()}
    return {"estimate": hours, "seconds_per_image_h100": round(seconds, 4),
            "size": size, "steps": cfg.synthesis.num_steps,
            "from": f"{row.images_per_second} img/s measured on one {MEASURED_ON} at {row.size} "
                    f"px, {row.steps} steps ({row.setting}), scaled by pixels and steps; "
                    f"other cards scaled by peak bf16 FLOP/s"}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return ""


def render(summary: dict[str, Any], cfg: Config) -> list[str]:
    """The lines ``ray-lt plan`` prints."""
    ev, im, q = cfg.evaluate, summary["images"], summary["quota"]
    c = summary["class_counts"]
    lines = [f"data: {summary['dataset']}, {summary['classes']:,} classes, "
             f"{im['train']:,} training / {im['val']:,} validation / {im['test']:,} test "
             f"images (read and checked in {summary['load_seconds']:.1f} s)",
             f"training images per class: {c['max']:,} largest, {c['median']:g} median, "
             f"{c['min']:,} smallest"]
    profile = summary["profile"]
    lines.append("  ".join(
        f"{name.capitalize()} ({rule}): {p['classes']:,} classes, {p['images']:,} images"
        for (name, p), rule in zip(profile.items(), (f"> {ev.many_threshold}",
                                                      f"{ev.few_threshold}-{ev.many_threshold}",
                                                      f"< {ev.few_threshold}"), strict=True)))
    if "groups" in summary:
        g = summary["groups"]
        lines.append(f"groups: {g['count']:,} class x context groups, {g['empty']:,} without "
                     f"a training image")
    if "histogram" in summary:
        lines.append(f"histogram: {summary['histogram']}")
    lines.append(f"quota: {q['total']:,} synthetic images to {q['target']:,} per {q['balance']}"
                 f" (quota_scale {q['quota_scale']:g}), in {q['shards']:,} shards of <= "
                 f"{q['max_shard_size']}; " + ", ".join(
                     f"{name} {p['quota']:,}" for name, p in profile.items()))
    d = summary["disk"]
    lines.append(f"disk: about {_size(d['total_bytes'])} of PNG ({_size(d['bytes_per_image'])}"
                 f" per image, from {d['how']})")
    sampler = summary["sampler"]
    if sampler["estimate"] is None:
        lines.append(f"sampler time: {sampler['why']}")
    else:
        lines.append(f"sampler time, an ESTIMATE at {sampler['size']} px, {sampler['steps']} "
                     f"steps ({sampler['from']}):")
        lines.append("  GPU     " + "".join(f"{f'{n} GPU' + ('s' if n > 1 else ''):>11}"
                                             for n in GPU_COUNTS))
        for gpu, by_count in sampler["estimate"].items():
            lines.append(f"  {gpu:7s} " + "".join(f"{_hours(h):>11}" for h in
                                                  by_count.values()))
    return lines


def _hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:,.1f} h"
