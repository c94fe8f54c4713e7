"""``sd`` and ``sdxl`` synthesis on a real local Ray cluster, from tiny folders in the diffusers
layout, over a small data set in ImageNet-LT's layout: the exact quota per class, each row's
prompt, and img2img rows that name their source image in the training split."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import ROOT, load_bench, untrained_classifier

from ray_lt import commands, pipeline
from ray_lt.config import load_config
from ray_lt.generate.quota import class_quotas

lt_shape = load_bench("lt_shape")
tiny_parts = load_bench("tiny_parts")
CLASSES = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory, ray_session):
    """A written ImageNet-LT-layout data set and tiny sd and sdxl folders."""
    base = tmp_path_factory.mktemp("sd_lt")
    lt_shape.write_lt_shape(base / "data", "imagenet_lt", image_size=16, num_classes=CLASSES,
                            workers=1)
    for kind in ("sd", "sdxl"):
        tiny_parts.save_tiny(base / kind, kind)
    return base


@pytest.mark.parametrize("kind, init", [("sd", "noise"), ("sdxl", "real")])
def test_synthesis_fills_the_quota_with_prompts_and_sources(base, kind, init):
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
    _, data = pipeline.prepare(cfg, out)
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
