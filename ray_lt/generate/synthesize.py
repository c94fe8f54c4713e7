"""Feedback-guided synthesis at scale: Ray Data maps a pool of ``GuidedSampler`` actors over
the quota shards; each shard is sampled from its own seed and written as one Parquet file.

A shard's file is written under a temporary name and renamed when complete, and its content
depends on its seed only: a shard retried after an actor died rewrites the same rows, a rerun
skips shards already in the manifest, and the finished data set holds exactly the planned
number of rows per class or group.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image

from ray_lt.config import Config
from ray_lt.data import LongTailData
from ray_lt.errors import ConfigError, StageError
from ray_lt.generate.criteria import CriterionScorer, draw_criteria
from ray_lt.generate.feature import FeatureGenerator
from ray_lt.generate.filtering import (
    class_distance_quantiles,
    class_means,
    drop_report,
    filter_mask,
)
from ray_lt.generate.pixel import PixelGenerator
from ray_lt.generate.quota import class_quotas, group_quotas, per_sample_seeds, plan_shards
from ray_lt.generate.sampler import Guidance, guided_sample
from ray_lt.generate.statistics import FEATURES_FILE, load_criterion_support
from ray_lt.train.features import predict
from ray_lt.train.trainer import MODEL_FILE, load_classifier

SYNTHETIC_DIR = "synthetic"
PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.jsonl"
FILTER_FILE = "filter.parquet"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, C) -> PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes, channels: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def require_stage(path: Path, stage: str, command: str) -> Path:
    if not path.exists():
        raise StageError(f"{path} is missing: the {stage} stage has not run in this run "
                         f"directory; run `{command}` with the same --out first")
    return path


def reference_images(data: LongTailData, per_group: int) -> dict[str, dict[int, list]]:
    """Up to ``per_group`` real training images per class and per group (the training split is
    already shuffled by seed): the unCLIP image conditions (METHOD.md section 3)."""
    refs: dict[str, dict[int, list]] = {"class": {}, "group": {}}
    for batch in data.train.select_columns(["image", "label", "group"]).iter_batches(
            batch_size=256, batch_format="numpy"):
        for image, label, group in zip(batch["image"], batch["label"], batch["group"],
                                       strict=True):
            for kind, key in (("class", int(label)), ("group", int(group))):
                if key >= 0 and len(refs[kind].setdefault(key, [])) < per_group:
                    refs[kind][key].append(np.asarray(image))
    return refs


def build_generator(cfg: Config, run_dir: Path, device: torch.device,
                    data_info: dict[str, Any]) -> Any:
    """The configured generator: trained in the run directory (pixel) or pretrained (unclip)."""
    g = cfg.generator
    if g.kind == "pixel":
        folder = require_stage(run_dir / "generator", "generator", "ray-lt train-generator")
        return PixelGenerator.from_pretrained(folder, device)
    if g.kind == "feature":
        folder = require_stage(run_dir / "generator", "generator", "ray-lt train-generator")
        return FeatureGenerator.from_pretrained(folder, device)
    if g.kind == "unclip":
        from ray_lt.generate.unclip import UnCLIPGenerator

        dtype = PRECISIONS[cfg.synthesis.precision] if device.type == "cuda" else None
        return UnCLIPGenerator.from_pretrained(
            g.pretrained, device=device, dtype=dtype or torch.float32,
            class_names=data_info["class_names"], context_names=data_info["context_names"],
            reference_images=data_info["references"], prompt_template=g.prompt_template,
            embedding_dropout=g.embedding_dropout, noise_level=g.noise_level,
            image_size=data_info["image_size"], height=g.height, width=g.width)
    raise ConfigError(f"generator.kind: {g.kind!r} is not available for synthesis yet")


def check_generator(cfg: Config, run_dir: Path) -> None:
    """Fail on a missing generator before any actor starts (loads no weights)."""
    if cfg.generator.kind in ("pixel", "feature"):
        require_stage(run_dir / "generator", "generator", "ray-lt train-generator")
    elif cfg.generator.kind == "unclip":
        from ray_lt.generate.unclip import check_pretrained

        if cfg.generator.pretrained is None:
            raise ConfigError("generator.pretrained: set the local folder (or cached hub id) of "
                              "Stable Diffusion 2.1 unCLIP")
        check_pretrained(cfg.generator.pretrained)
    else:
        raise ConfigError(f"generator.kind: {cfg.generator.kind!r} is not available for "
                          f"synthesis yet")


def data_info(cfg: Config, data: LongTailData) -> dict[str, Any]:
    """What an actor needs to know about the data set to build its generator."""
    info = {"class_names": data.class_names, "context_names": data.context_names,
            "image_size": data.image_shape[0], "references": {}}
    if cfg.generator.kind == "unclip":
        info["references"] = reference_images(data, cfg.generator.references_per_group)
    return info


def build_scorer(cfg: Config, run_dir: Path, device: torch.device,
                 names: list[str] | None = None) -> CriterionScorer:
    """The baseline classifier scoring ``names`` (default: those of ``synthesis.criteria``)."""
    classifier_dir = run_dir / "classifier"
    require_stage(classifier_dir / MODEL_FILE, "classifier", "ray-lt train")
    statistics, head = load_criterion_support(classifier_dir)
    names = names or list(cfg.synthesis.criteria)
    inputs = "features" if cfg.generator.kind == "feature" else "images"
    return CriterionScorer(load_classifier(classifier_dir, device), names, statistics, head,
                           inputs=inputs).to(device)


class GuidedSampler:
    """Ray Data callable class: generator and classifier are built once per actor; each call
    samples whole shards and writes each as one Parquet file."""

    def __init__(self, config: dict[str, Any], run_dir: str, use_gpu: bool,
                 data_info: dict[str, Any]):
        self.cfg = Config.model_validate(config)
        self.run_dir = Path(run_dir)
        self.out = self.run_dir / SYNTHETIC_DIR
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.generator = build_generator(self.cfg, self.run_dir, self.device, data_info)
        self.scorer = build_scorer(self.cfg, self.run_dir, self.device)
        s = self.cfg.synthesis
        self.names = list(s.criteria)
        self.probabilities = [s.criteria[n] for n in self.names]
        self.guidance = Guidance(s.guidance_scale, s.guidance_every, s.guidance_mode,
                                 s.reuse_gradient, s.through_unet)

    def sample_shard(self, shard: dict[str, Any]) -> pd.DataFrame:
        """All rows of one shard, deterministic in its seed."""
        s = self.cfg.synthesis
        n = int(shard["n"])
        seeds = per_sample_seeds(int(shard["seed"]), n)
        ids = draw_criteria(self.names, self.probabilities, n,
                            torch.Generator().manual_seed(int(shard["seed"])))
        parts = []
        for start in range(0, n, s.batch_size):
            chunk = seeds[start:start + s.batch_size]
            size = len(chunk)
            out = guided_sample(
                self.generator, self.scorer, torch.full((size,), int(shard["label"])),
                torch.full((size,), int(shard["group"])), ids[start:start + size], chunk,
                s.num_steps, s.cfg_scale, self.guidance, s.eta, PRECISIONS[s.precision])
            with torch.no_grad():
                decoded = self.generator.decode_output(out.latents).cpu().float()
            if decoded.dim() == 2:  # feature generator: pseudo-feature vectors
                payload = {"feature": list(decoded.numpy())}
            else:
                pixels = (decoded.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
                payload = {"image": [png_bytes(p) for p in pixels]}
            parts.append(pd.DataFrame({
                **payload,
                "label": int(shard["label"]), "group": int(shard["group"]),
                "criterion": [self.names[i] for i in ids[start:start + size].tolist()],
                "guidance_scale": s.guidance_scale, "seed": chunk,
                "shard_id": int(shard["shard_id"]),
                "criterion_before": out.criterion_before.numpy(),
                "criterion_after": out.criterion_after.numpy(),
                "guidance_norm": out.guidance_norm.numpy(),
                "nonfinite_steps": out.nonfinite_steps.numpy(),
            }))
        return pd.concat(parts, ignore_index=True)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        done = []
        for shard in batch.to_dict("records"):
            started = time.perf_counter()
            rows = self.sample_shard(shard)
            path = self.out / f"shard_{int(shard['shard_id']):06d}.parquet"
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), tmp)
            os.replace(tmp, path)  # atomic: a shard file is complete or absent
            done.append({"shard_id": int(shard["shard_id"]), "n": len(rows),
                         "file": path.name, "seconds": time.perf_counter() - started})
        return pd.DataFrame(done)


def plan(cfg: Config, data: LongTailData) -> list[dict[str, Any]]:
    """The shards that balance the training set (METHOD.md section 4)."""
    s = cfg.synthesis
    if s.balance == "group":
        if data.group_counts is None:
            raise ConfigError("synthesis.balance: 'group' needs a data set with groups")
        quotas = group_quotas(data.group_counts, s.target, s.quota_scale, s.quota_minimum)
        shards = plan_shards(quotas, s.max_shard_size, cfg.seed, True, len(data.context_names))
    else:
        quotas = class_quotas(data.class_counts, s.target, s.quota_scale, s.quota_minimum)
        shards = plan_shards(quotas, s.max_shard_size, cfg.seed, False)
    if not shards:
        raise ConfigError(f"synthesis: the quota is 0 for every {s.balance} (synthesis.target "
                          f"{s.target}, quota_scale {s.quota_scale:g}, quota_minimum "
                          f"{s.quota_minimum}); raise target or quota_scale")
    return shards


def finished_shards(out: Path) -> set[int]:
    """Shard ids in the manifest whose file is present."""
    manifest = out / MANIFEST_FILE
    if not manifest.is_file():
        return set()
    ids = {json.loads(line)["shard_id"] for line in manifest.read_text().splitlines() if line}
    return {i for i in ids if (out / f"shard_{i:06d}.parquet").is_file()}


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
    stored = out / PLAN_FILE
    if stored.is_file() and json.loads(stored.read_text()) != shards:
        raise ConfigError(f"{stored}: the synthesis plan in this run directory was made with "
                          f"other synthesis.* settings or seed; use a new --out or delete "
                          f"{out} to start over")
    stored.write_text(json.dumps(shards))
    build_scorer(cfg, run_dir, torch.device("cpu"))  # missing stage or criterion support
    check_generator(cfg, run_dir)
    info = data_info(cfg, data)
    done = finished_shards(out)
    pending = [sh for sh in shards if sh["shard_id"] not in done]
    print(f"[ray-lt] synthesis: {len(shards)} shards, {sum(sh['n'] for sh in shards)} samples; "
          f"{len(done)} shards already done, {len(pending)} to go")
    if pending:
        results = ray.data.from_items(pending, override_num_blocks=len(pending)).map_batches(
            GuidedSampler,
            fn_constructor_kwargs={"config": cfg.model_dump(mode="json"),
                                   "run_dir": str(run_dir), "use_gpu": s.gpus_per_actor > 0,
                                   "data_info": info},
            compute=ray.data.ActorPoolStrategy(size=s.num_actors),
            batch_size=1, batch_format="pandas",
            num_cpus=s.cpus_per_actor, num_gpus=s.gpus_per_actor)
        with (out / MANIFEST_FILE).open("a") as manifest:
            for row in results.iter_rows():
                manifest.write(json.dumps({k: row[k] for k in ("shard_id", "n", "file",
                                                               "seconds")}) + "\n")
                manifest.flush()
    return check_counts(out, shards)


def check_counts(out: Path, shards: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows per (label, group) on disk against the plan; raises if any differ."""
    planned = pd.DataFrame(shards).groupby(["label", "group"])["n"].sum().rename("planned")
    files = sorted(out.glob("shard_*.parquet"))
    table = pq.read_table(files, columns=["label", "group"]).to_pandas() if files else \
        pd.DataFrame({"label": [], "group": []})
    written = table.groupby(["label", "group"]).size().rename("written")
    counts = pd.concat([planned, written], axis=1).fillna(0).astype(int).reset_index()
    wrong = counts[counts["planned"] != counts["written"]]
    if len(wrong):
        raise RuntimeError(f"synthetic rows in {out} differ from the plan:\n{wrong}")
    return counts


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


def load_synthetic(run_dir: Path, channels: int, filtered: bool = True) -> ray.data.Dataset:
    """The synthetic rows as a Ray Dataset with decoded ``image`` arrays (training format),
    without the rows the filter dropped when it ran (``filtered``)."""
    ds = ray.data.read_parquet(synthetic_files(run_dir))
    verdicts = Path(run_dir) / SYNTHETIC_DIR / FILTER_FILE
    if filtered and verdicts.is_file():
        dropped = pd.read_parquet(verdicts).query("~keep")
        drop = set(zip(dropped["shard_id"].tolist(), dropped["seed"].tolist(), strict=True))
        if drop:
            ds = ds.filter(lambda row: (row["shard_id"], row["seed"]) not in drop)
    if "image" not in ds.columns():
        return ds  # pseudo-features (feature generator)
    return ds.map_batches(_decode_images, fn_kwargs={"channels": channels},
                          batch_format="pandas")


def filter_synthetic(run_dir: Path, data: LongTailData, cfg: Config) -> pd.DataFrame:
    """DiffuLT filtering with the real-data classifier: record a keep/drop verdict per sample
    (``filter.parquet``) and the drops per class (``filter_report.csv``); returns the report."""
    f = cfg.synthesis.filter
    if cfg.generator.kind == "feature":
        raise ConfigError("synthesis.filter.enabled: filtering works on images; the feature "
                          "generator writes feature vectors")
    run_dir = Path(run_dir)
    out = run_dir / SYNTHETIC_DIR
    classifier_dir = run_dir / "classifier"
    ev = cfg.evaluate
    ds = load_synthetic(run_dir, data.image_shape[2], filtered=False)
    ids = ds.select_columns(["shard_id", "seed"]).to_pandas()
    rows = predict(ds, classifier_dir, ev.batch_size, ev.num_actors, ev.cpus_per_actor,
                   ev.gpus_per_actor, features=f.distance_quantile is not None)
    features = means = radius = None
    if f.distance_quantile is not None:
        real = np.load(classifier_dir / FEATURES_FILE)
        means = class_means(real["features"], real["labels"], data.num_classes)
        radius = class_distance_quantiles(real["features"], real["labels"], data.num_classes,
                                          f.distance_quantile)
        features = np.stack(rows["features"].to_numpy())
    labels = rows["label"].to_numpy()
    keep, reasons = filter_mask(rows["pred"].to_numpy(), rows["confidence"].to_numpy(), labels,
                                features, means, radius, f.confidence_threshold)
    pd.DataFrame({"shard_id": ids["shard_id"], "seed": ids["seed"], "keep": keep,
                  "reason": reasons}).to_parquet(out / FILTER_FILE, index=False)
    report = drop_report(labels, keep, reasons, data.num_classes)
    report.to_csv(out / "filter_report.csv", index=False)
    return report
