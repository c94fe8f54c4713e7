"""Pretrained generators' synthesis on a real local Ray cluster over a small data set in
ImageNet-LT's layout. unCLIP: references chosen by index and embedded once on an actor pool,
small actor constructors, the writer stage, exact quotas, and a rerun that redoes nothing.
``sd`` and ``sdxl`` from tiny folders in the diffusers layout: the exact quota, each row's
prompt, and img2img rows that name their source image in the training split."""

from __future__ import annotations

import json
import logging
import shutil

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
    settings = [
        f"dataset.root={base / 'data'}", f"dataset.num_classes={CLASSES}",
        "dataset.image_size=16", "dataset.class_names_file=null", "model.name=small_cnn",
        "model.checkpoint=null", f"generator.pretrained={unclip}", "generator.height=32",
        "generator.width=32", "generator.references_per_group=3", "synthesis.num_steps=3",
        "synthesis.guidance_every=1", "synthesis.quota_scale=0.004", "synthesis.max_shard_size=2",
        "synthesis.batch_size=2", "synthesis.precision=fp32", "synthesis.cpus_per_actor=0.5",
        "synthesis.compile=false",  # the config compiles for GPUs: minutes on a CPU
        "synthesis.criteria={entropy: 1.0}", "synthesis.num_actors=1",
        "synthesis.gpus_per_actor=0", "evaluate.num_actors=1", "evaluate.gpus_per_actor=0",
        "evaluate.cpus_per_actor=0.5", "scaling.use_gpu=false"]
    cfg = load_config(ROOT / "configs" / "imagenet_lt.yaml", settings)
    out = base / "run"
    untrained_classifier(out, CLASSES, cfg)
    return cfg, out, settings


def test_unclip_synthesis_uses_stored_references(run, caplog):
    cfg, out, _ = run
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


def test_mining_between_rounds_prompts_the_next_round_and_reruns_nothing(run, tmp_path,
                                                                         caplog):
    """LTG's closed loop with the tiny unCLIP: round 1, the guide's fine-tune, the mining of
    round 1 (the tiny vision-language model describes each class's hardest and easiest
    samples, the tiny language model writes the prompts), round 2 sampled with the mined
    prompts; a rerun redoes nothing; ``ray-lt mine`` on the finished run (templates) writes the
    same files twice; the report's section shows the keywords and prompts."""
    from ray_lt.generate.mining import PROMPT_START, read_entries
    from ray_lt.report import mining_blocks, to_markdown
    from ray_lt.testing import save_tiny_llm, save_tiny_vlm

    _, base, settings = run
    vlm, llm = save_tiny_vlm(tmp_path / "vlm"), save_tiny_llm(tmp_path / "llm")
    mining = [*settings, "synthesis.quota_scale=0.008", "rounds.count=2", "rounds.epochs=1",
              "scaling.num_workers=1", "scaling.cpus_per_worker=0.5",
              "scaling.gpus_per_worker=0", "train.batch_size=32", "train.warmup_epochs=0",
              "tune.space.criteria=null",  # no class statistics to fit for the guides
              "mining.enabled=true", f"mining.vlm={vlm}", f"mining.llm={llm}",
              "mining.classes=all", "mining.k=2", "mining.min_count=1", "mining.prompts=4",
              "mining.max_new_tokens=6",
              "mining.cpus_per_actor=0.5", "mining.batch_size=4"]
    cfg = load_config(ROOT / "configs" / "imagenet_lt.yaml", mining)
    out = tmp_path / "mined"
    untrained_classifier(out, CLASSES, cfg)
    caplog.set_level(logging.INFO, logger="ray_lt")
    commands.synthesize(cfg, out)
    data = pipeline.prepare(cfg, out).data
    names = data.class_names

    folder = out / "mining" / "round1"
    record = json.loads((folder / "mining.json").read_text())
    entries = {e["class"]: e for e in read_entries(folder / "prompts.jsonl")}
    rows = pd.concat(pd.read_parquet(p) for p in sorted((out / "synthetic").glob("shard_*")))
    first, second = rows[rows["round"] == 1], rows[rows["round"] == 2]
    assert sorted(entries) == sorted(record["mined"]) and len(entries) >= 2, record
    described = [json.loads(line) for line in
                 (folder / "descriptions.jsonl").read_text().splitlines()]
    assert record["images"] == len(described) == sum(
        len(e["hard"]) + len(e["easy"]) for e in entries.values())
    assert all(d["text"] for d in described) and record["seconds_per_image"] > 0
    for name, entry in entries.items():
        label = names.index(name)
        seeds = set(first.loc[first["label"] == label, "seed"])
        assert len(entry["hard"]) == len(entry["easy"]) == min(2, len(seeds) // 2)
        assert set(entry["hard"]) | set(entry["easy"]) <= seeds
        assert not set(entry["hard"]) & set(entry["easy"])
        # the guide's criterion on them: every hard sample above every easy one (one criterion)
        after = first.set_index("seed")["criterion_after"]
        assert after[entry["hard"]].min() >= after[entry["easy"]].max()
        assert 1 <= len(entry["prompts"]) <= 4
        assert all(p.startswith(PROMPT_START) for p in entry["prompts"])
        assert all(score > 0 for _, score in entry["keywords"])
        # round 2 drew this class's prompts from the mined ones, round 1 from the template
        mined = {p.format(class_name=name, context="") for p in entry["prompts"]}
        assert set(second.loc[second["label"] == label, "prompt"]) <= mined
        assert set(first.loc[first["label"] == label, "prompt"]) == {f"a photo of a {name}"}
    assert (folder / "hard_easy.png").stat().st_size > 2000
    keywords = pd.read_csv(folder / "keywords.csv")
    assert set(keywords["class"]) <= set(entries) and (keywords["score"] > 0).all()

    stamp = (folder / "prompts.jsonl").stat().st_mtime_ns
    caplog.clear()
    commands.synthesize(cfg, out)
    assert "mining already done" in caplog.text and "0 to go" in caplog.text
    assert (folder / "prompts.jsonl").stat().st_mtime_ns == stamp

    # ray-lt mine on the finished run: round 2's samples, prompts by templates; the same
    # inputs give the same files.
    templates = load_config(ROOT / "configs" / "imagenet_lt.yaml", [*mining, "mining.llm=null"])
    twin = tmp_path / "twin"
    shutil.copytree(out, twin)
    paths = [commands.mine(templates, run_dir) for run_dir in (out, twin)]
    assert paths[0] == out / "mining" / "round2" / "prompts.jsonl"
    for name in ("prompts.jsonl", "descriptions.jsonl", "keywords.csv", "sets.csv"):
        assert (out / "mining" / "round2" / name).read_bytes() == \
            (twin / "mining" / "round2" / name).read_bytes(), name
    last = read_entries(paths[0])
    assert last and all(e["prompts"][0].startswith(PROMPT_START + " shows ") for e in last)

    text = to_markdown(mining_blocks(out, names))
    assert "## What the model misses" in text and "mining/round1/hard_easy.png" in text
    some = next(iter(entries.values()))
    assert some["prompts"][0].format(class_name=some["class"], context="") in text
