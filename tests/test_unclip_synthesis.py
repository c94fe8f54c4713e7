"""Pretrained generators' synthesis on a real local Ray cluster over a small data set in
ImageNet-LT's layout. unCLIP: references chosen by index and embedded once on an actor pool,
small actor constructors, the writer stage, exact quotas, and a rerun that redoes nothing.
``sd`` and ``sdxl`` from tiny folders in the diffusers layout: the exact quota, each row's
prompt, and img2img rows that name their source image in the training split."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
from conftest import ROOT, load_bench, untrained_classifier

from ray_lt import commands, pipeline
from ray_lt.config import load_config
from ray_lt.generate.quota import class_quotas
from ray_lt.generate.references import META_FILE, REFERENCES_DIR, load_references
from ray_lt.generate.synthesize import actor_payload_bytes, sampler_kwargs
from ray_lt.testing import save_tiny

lt_shape = load_bench("lt_shape")
CLASSES = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_session):
    """A written ImageNet-LT-layout data set, a tiny unCLIP folder, a config and a run
    directory holding an (untrained) classifier."""
    base = tmp_path_factory.mktemp("lt")
    lt_shape.write_lt_shape(base / "data", "imagenet_lt", image_size=16, num_classes=CLASSES,
                            workers=1)
    unclip = lt_shape.save_tiny_unclip(base / "unclip")
    cfg = load_config(ROOT / "configs" / "imagenet_lt.yaml", [
        f"dataset.root={base / 'data'}", f"dataset.num_classes={CLASSES}",
        "dataset.image_size=16", "dataset.class_names_file=null", "model.name=small_cnn",
        "model.checkpoint=null", f"generator.pretrained={unclip}", "generator.height=32",
        "generator.width=32", "generator.references_per_group=3", "synthesis.num_steps=3",
        "synthesis.guidance_every=1", "synthesis.quota_scale=0.004", "synthesis.max_shard_size=2",
        "synthesis.batch_size=2", "synthesis.precision=fp32", "synthesis.cpus_per_actor=0.5",
        "synthesis.compile=false",  # the config compiles for GPUs: minutes on a CPU
        "synthesis.criteria={entropy: 1.0}", "synthesis.num_actors=1",
        "synthesis.gpus_per_actor=0", "evaluate.num_actors=1", "evaluate.gpus_per_actor=0",
        "evaluate.cpus_per_actor=0.5", "scaling.use_gpu=false"])
    out = base / "run"
    untrained_classifier(out, CLASSES, cfg)
    return cfg, out


def test_unclip_synthesis_uses_stored_references(run, caplog):
    cfg, out = run
    commands.synthesize(cfg, out)
    references = load_references(out / REFERENCES_DIR)
    meta = json.loads((out / REFERENCES_DIR / META_FILE).read_text())
    assert references.embeds.shape == (meta["rows"], 32)  # tiny CLIP: 32-d embeddings
    assert sorted(references.by_class) == list(range(CLASSES))
    assert all(1 <= len(pool) <= 3 for pool in references.by_class.values())

    data = pipeline.prepare(cfg, out).data
    s = cfg.synthesis
    expected = class_quotas(data.class_counts, s.target, s.quota_scale, s.quota_minimum)
    assert expected.min() >= 1 and expected.sum() > 2 * CLASSES
    rows = pd.concat(pd.read_parquet(p) for p in sorted((out / "synthetic").glob("shard_*")))
    assert rows.groupby("label").size().to_dict() == dict(enumerate(expected.tolist()))
    assert rows["image"].map(len).gt(0).all() and rows["seed"].is_unique
    assert actor_payload_bytes(sampler_kwargs(cfg, data, out)) < 64 * 1024
    manifest = [json.loads(line) for line in
                (out / "synthetic" / "manifest.jsonl").read_text().splitlines()]
    assert all(m["write_seconds"] >= 0 and m["seconds"] > 0 for m in manifest)

    caplog.set_level(logging.INFO, logger="ray_lt")
    caplog.clear()
    stamp = (out / REFERENCES_DIR / META_FILE).stat().st_mtime_ns
    commands.synthesize(cfg, out)
    assert "0 to go" in caplog.text
    assert (out / REFERENCES_DIR / META_FILE).stat().st_mtime_ns == stamp


@pytest.mark.parametrize("kind, init", [("sd", "noise"), ("sdxl", "real")])
def test_sd_and_sdxl_fill_the_quota_with_prompts_and_sources(run, kind, init):
    base = run[1].parent
    save_tiny(base / kind, kind)
    cfg = load_config(ROOT / "configs" / "imagenet_lt_sd.yaml", [
        f"dataset.root={base / 'data'}", f"dataset.num_classes={CLASSES}",
        "dataset.image_size=16", "model.name=small_cnn", "model.width=8", "rounds.count=1",
        f"generator.kind={kind}", f"generator.pretrained={base / kind}",
        "generator.height=32", "generator.width=32",
        "generator.prompts=['a photo of a {class_name}', 'a {class_name}, close up']",
        "generator.negative_prompt=blurry", f"synthesis.init={init}",
        f"synthesis.strength={0.5 if init == 'real' else 1.0}", "synthesis.num_steps=4",
        "synthesis.guidance_every=2", "synthesis.criteria={entropy: 1.0}",
        "synthesis.quota_scale=0.004", "synthesis.max_shard_size=3", "synthesis.batch_size=3",
        "synthesis.precision=fp32", "synthesis.compile=false", "synthesis.num_actors=1",
        "synthesis.cpus_per_actor=0.5", "synthesis.gpus_per_actor=0",
        "synthesis.guidance_decoder=latent_resize", "evaluate.num_actors=1",
        "evaluate.gpus_per_actor=0", "evaluate.cpus_per_actor=0.5", "scaling.use_gpu=false"])
    out = base / f"run_{kind}"
    untrained_classifier(out, CLASSES, cfg, width=8)
    commands.synthesize(cfg, out)
    data = pipeline.prepare(cfg, out).data
    s = cfg.synthesis
    expected = class_quotas(data.class_counts, s.target, s.quota_scale, s.quota_minimum)
    rows = pd.concat(pd.read_parquet(p) for p in sorted((out / "synthetic").glob("shard_*")))
    assert rows.groupby("label").size().to_dict() == dict(enumerate(expected.tolist()))
    names = [data.class_names[label] for label in rows["label"]]
    allowed = [{f"a photo of a {n}", f"a {n}, close up"} for n in names]
    assert all(p in a for p, a in zip(rows["prompt"], allowed, strict=True))
    assert rows["prompt"].nunique() > CLASSES  # both templates drawn
    if init == "real":
        index = data.train_index
        assert (index["label"].to_numpy()[rows["source_row"]] == rows["label"]).all()
    else:
        assert "source_row" not in rows
