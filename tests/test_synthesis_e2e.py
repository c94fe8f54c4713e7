"""Synthesis on a real local Ray cluster: train-generator, the actor pool, exact quotas,
resume, and clear errors for missing stages (faults: test_faults.py)."""

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BASE, ROOT, SYNTHESIS, SYNTHESIZED_ROWS, copy_stages, run_cli
from PIL import Image

from ray_lt import commands, pipeline
from ray_lt.config import load_config
from ray_lt.data import load_dataset
from ray_lt.errors import ConfigError, StageError
from ray_lt.generate.codec import decode_png
from ray_lt.generate.filtering import filter_synthetic
from ray_lt.generate.synthetic import load_synthetic


def _rows(out: Path) -> pd.DataFrame:
    return pd.concat(pd.read_parquet(p) for p in sorted((out / "synthetic").glob("shard_*")))


def test_generator_is_saved_with_safetensors(trained):
    assert (trained / "generator" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((trained / "generator" / "generator.json").read_text())["kind"] == "pixel"
    # The fixture fitted the criteria's support once, for every copy of these stages.
    assert (trained / "classifier" / "class_statistics.safetensors").is_file()


def test_synthesis_fills_the_quota_and_resumes(synthesized, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(synthesized, out)  # drawn by `ray-lt synthesize` with SYNTHESIS
    cfg = load_config(ROOT / "configs" / "digits_lt.yaml", SYNTHESIS)
    rows = _rows(out)
    assert len(rows) == SYNTHESIZED_ROWS
    # quota_scale 0.1 of (100 - n_c): 0, 4, 6, 7, 8, 9, 9, 10, 10, 10
    assert rows.groupby("label").size().to_dict() == {1: 4, 2: 6, 3: 7, 4: 8, 5: 9, 6: 9,
                                                       7: 10, 8: 10, 9: 10}
    assert set(rows["criterion"]) <= {"entropy", "hardness", "total_uncertainty"}
    assert (rows["guidance_scale"] == 0.03).all() and (rows["group"] == -1).all()
    assert rows["seed"].is_unique
    image = np.asarray(Image.open(io.BytesIO(rows["image"].iloc[0])))
    assert image.shape == (16, 16) and image.dtype == np.uint8
    assert (out / "classifier" / "class_statistics.safetensors").is_file()
    assert (out / "classifier" / "epistemic_head.safetensors").is_file()

    # A rerun samples nothing; a lost shard file is redrawn identically from its seed.
    caplog.set_level(logging.INFO, logger="ray_lt")
    caplog.clear()
    commands.synthesize(cfg, out)
    assert "0 to go" in caplog.text
    victim = out / "synthetic" / "shard_000004.parquet"
    before = pd.read_parquet(victim)
    victim.unlink()
    caplog.clear()
    commands.synthesize(cfg, out)
    assert "1 to go" in caplog.text
    pd.testing.assert_frame_equal(pd.read_parquet(victim), before)

    synthetic = load_synthetic(out, channels=1)
    assert synthetic.count() == 73
    assert synthetic.take(1)[0]["image"].shape == (16, 16, 1)

    filtering = load_config(ROOT / "configs" / "digits_lt.yaml",
                            [*BASE, "synthesis.quota_scale=0.1",
                             "synthesis.filter.confidence_threshold=0.3",
                             "synthesis.filter.distance_quantile=0.9"])
    report = filter_synthetic(out, load_dataset(filtering.dataset, 0), filtering)
    assert report["generated"].sum() == 73
    assert (report["dropped"] == report["confidently_other_class"] + report["far_from_class"]).all()
    assert load_synthetic(out, channels=1).count() == report["kept"].sum()
    assert load_synthetic(out, channels=1, filtered=False).count() == 73

    changed = load_config(ROOT / "configs" / "digits_lt.yaml", [*BASE, "synthesis.quota_scale=0.2"])
    with pytest.raises(ConfigError, match="its synthesis stage was made with another config: "
                                          "synthesis.quota_scale: 0.1 -> 0.2"):
        commands.synthesize(changed, out)
    (out / "stages.json").unlink()  # without the record, the stored plan still catches it
    with pytest.raises(ConfigError, match="plan.json: the synthesis plan"):
        commands.synthesize(changed, out)


def test_missing_stages_are_named(tmp_path):
    cfg = load_config(ROOT / "configs" / "digits_lt.yaml", BASE)
    with pytest.raises(StageError, match="classifier stage has not run.*ray-lt train"):
        commands.synthesize(cfg, tmp_path)
    done = run_cli("synthesize", "configs/digits_lt.yaml", "--out", str(tmp_path / "empty"))
    assert done.returncode == 2
    assert "the classifier stage has not run" in done.stderr
    with pytest.raises(ConfigError, match="generator.kind: 'unclip' is not trained"):
        unclip = load_config(ROOT / "configs" / "digits_lt.yaml",
                             ["generator.kind=unclip", "dataset.channels=3"])
        commands.train_generator(unclip, tmp_path)


def test_feature_generator_stage_writes_pseudo_features(trained, tmp_path):
    out = tmp_path / "feature"
    out.mkdir()
    shutil.copytree(trained / "classifier", out / "classifier")
    cfg = load_config(ROOT / "configs" / "digits_lt.yaml",
                      [*BASE, "generator.kind=feature", "generator.train_steps=200",
                       "synthesis.quota_scale=0.05", "synthesis.criteria={loss: 1.0}"])
    commands.train_generator(cfg, out)
    assert json.loads((out / "generator" / "generator.json").read_text())["kind"] == "feature"
    commands.synthesize(cfg, out)
    rows = _rows(out)
    assert "image" not in rows.columns
    assert len(rows) == 37  # round(0.05 * (100 - n_c)) summed over the classes
    assert {len(f) for f in rows["feature"]} == {64}  # small_cnn width 32 -> 64 features
    assert load_synthetic(out, channels=1).count() == 37
    # LDMLR's last step: the baseline's head fine-tuned on real + pseudo features.
    cfg = load_config(ROOT / "configs" / "digits_lt.yaml",
                      [*BASE, "generator.kind=feature", "generator.train_steps=200",
                       "synthesis.quota_scale=0.05", "synthesis.criteria={loss: 1.0}",
                       "final.init=baseline", "final.epochs=3"])
    session = pipeline.Session(cfg, out, load_dataset(cfg.dataset, cfg.seed))
    folder = pipeline.run_stage(pipeline.FINAL, session)
    import torch

    before = torch.load(out / "classifier" / "model.pt", weights_only=True)
    after = torch.load(folder / "model.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("head."))
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert len(pd.read_csv(folder / "history.csv")) == 3
    metrics = pipeline.run_stage(pipeline.EVALUATION, session)
    assert metrics["num_rows"] == 500 and (out / "final" / "metrics.json").is_file()


def test_rounds_fine_tune_the_guide_between_shares_and_resume(trained, tmp_path, caplog):
    """Closed-loop synthesis in two rounds: the quota of one-shot synthesis, split per class;
    round 2 guided by the guide fine-tuned on real + round 1's rows; each class guided at the
    scale the baseline's validation error gives it, in both rounds."""
    from ray_lt.generate.factory import build_scorer
    from ray_lt.generate.plan import plan
    from ray_lt.train.trainer import load_classifier

    out = copy_stages(trained, tmp_path / "rounds")
    settings = [*BASE, "synthesis.quota_scale=0.05", "synthesis.criteria={entropy: 1.0}"]
    cfg = load_config(ROOT / "configs" / "digits_lt.yaml",
                      [*settings, "rounds.count=2", "rounds.epochs=1",
                       "synthesis.scale_by=val_error", "synthesis.scale_slope=1.0"])
    caplog.set_level(logging.INFO, logger="ray_lt")
    commands.synthesize(cfg, out)
    assert caplog.text.count("guidance scale per class from the baseline's validation error") == 1
    shards = pd.DataFrame(json.loads((out / "synthetic" / "plan.json").read_text()))
    one_shot = pd.DataFrame(plan(load_config(ROOT / "configs" / "digits_lt.yaml", settings),
                                 load_dataset(cfg.dataset, cfg.seed)))
    assert sorted(shards["round"].unique()) == [1, 2]
    per_class = shards.groupby("label")["n"].sum()
    assert per_class.to_dict() == one_shot.groupby("label")["n"].sum().to_dict()
    first = shards[shards["round"] == 1].groupby("label")["n"].sum()
    assert ((first - (per_class - first)).between(0, 1)).all()  # equal shares, +1 early
    assert set(shards.loc[shards["round"] == 1, "seed"]) <= set(one_shot["seed"])
    assert not set(shards.loc[shards["round"] == 2, "seed"]) & set(one_shot["seed"])
    rows = _rows(out)
    assert len(rows) == shards["n"].sum()
    assert (rows["round"] == rows["shard_id"].map(shards.set_index("shard_id")["round"])).all()
    planned = shards.groupby("label")["scale"].agg(["min", "max"])
    assert (planned["min"] == planned["max"]).all()  # one scale per class, in every round
    used = rows.groupby("label")["guidance_scale"].agg(["min", "max"])
    assert (used["min"] == used["max"]).all()
    assert used["min"].to_dict() == pytest.approx(planned["min"].to_dict())
    drawn = (shards["scale"] * shards["n"]).sum() / shards["n"].sum()
    assert drawn == pytest.approx(0.03, rel=1e-6) and planned["min"].nunique() > 1

    guide = out / "rounds" / "round1" / "classifier"
    assert len(pd.read_csv(guide / "history.csv")) == 1
    for piece in ("class_statistics.safetensors", "epistemic_head.safetensors"):
        assert (guide / piece).is_file()
    baseline, tuned = load_classifier(out / "classifier"), load_classifier(guide)
    assert not torch.equal(baseline.head.weight, tuned.head.weight)
    # Round 2's recorded criterion is the fine-tuned guide's, not the baseline's.
    second = rows[rows["round"] == 2]
    images = torch.from_numpy(np.stack([decode_png(b, 1) for b in second["image"]]))
    images = images.permute(0, 3, 1, 2).float() / 255.0
    labels, ids = torch.tensor(second["label"].to_numpy()), torch.zeros(len(second), dtype=int)
    with torch.no_grad():
        by = {name: build_scorer(cfg, out, torch.device("cpu"), classifier_dir=folder)(
            images, labels, ids).numpy() for name, folder in
            (("tuned", guide), ("baseline", out / "classifier"))}
    error = {k: np.abs(v - second["criterion_after"].to_numpy()).mean() for k, v in by.items()}
    assert error["tuned"] < error["baseline"] / 3

    summary = pd.read_csv(out / "rounds" / "rounds.csv")
    assert summary["round"].tolist() == [1, 2] and summary["samples"].sum() == len(rows)
    assert summary["guide"].tolist() == ["classifier", "rounds/round1/classifier"]
    assert (summary["sampler_seconds"] > 0).all() and "val_acc" in summary
    assert (out / "rounds" / "rounds.png").stat().st_size > 10_000
    # The fine-tune is a stage of its own: recorded and timed inside the synthesis stage.
    record = json.loads((out / "stages.json").read_text())
    assert record["config"]["fine_tune.round1"] == {"rounds.epochs": 1, "rounds.lr": None}
    assert {"statistics", "synthesis", "fine_tune.round1"} <= set(record["timings"])
    fine_tune = record["timings"]["fine_tune.round1"][0]["seconds"]
    assert 0 < fine_tune < record["timings"]["synthesis"][0]["seconds"]
    # A rerun trains and samples nothing; another round schedule is refused.
    written = (guide / "model.pt").stat().st_mtime_ns
    manifest = (out / "synthetic" / "manifest.jsonl").read_text()
    commands.synthesize(cfg, out)
    assert "guide fine-tune already done" in caplog.text
    assert (guide / "model.pt").stat().st_mtime_ns == written
    assert (out / "synthetic" / "manifest.jsonl").read_text() == manifest
    with pytest.raises(ConfigError, match="rounds.count: 2 -> 3"):
        commands.synthesize(cfg.model_copy(update={"rounds": cfg.rounds.model_copy(
            update={"count": 3})}), out)
