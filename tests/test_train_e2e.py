"""End to end on a real local Ray cluster: ``ray-lt train``, determinism and resume, 50/50
mixing (``ray job submit``: test_pipeline.py)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from conftest import ROOT, run_cli

from ray_lt.config import load_config
from ray_lt.data import load_dataset
from ray_lt.train import fit_classifier, load_classifier
from ray_lt.train.loop import mixed_batches
from ray_lt.train.resident import ResidentShard

QUICK = ["train.epochs=2", "evaluate.cpus_per_actor=0.5"]


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_bad_override_fails_before_any_work(tmp_path):
    done = run_cli("train", "configs/digits_lt.yaml", "--out", str(tmp_path / "x"),
                   "--set", "train.epochz=3")
    assert done.returncode == 2
    assert "train.epochz: Extra inputs are not permitted" in done.stderr
    assert not (tmp_path / "x").exists()


def test_train_writes_its_outputs_and_a_longer_rerun_resumes_from_its_checkpoint(tmp_path,
                                                                               ray_session):
    """``ray-lt train`` end to end (metrics, predictions, plot, history, one progress bar);
    a longer run in its place continues where it stopped."""
    out = tmp_path / "run"
    done = run_cli("train", "configs/digits_lt.yaml", "--out", str(out), "--set", *QUICK,
                   f"ray.address={ray_session['address']}")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = _metrics(out)
    for key in ("overall", "many", "medium", "few", "worst_group", "per_class", "per_group"):
        assert key in metrics
    assert len(metrics["per_class"]) == 10 and metrics["per_group"] == []
    assert metrics["num_rows"] == 500
    assert 0.1 <= metrics["overall"] <= 1.0
    assert metrics["class_counts"] == [100, 64, 41, 27, 17, 11, 7, 4, 3, 2]
    assert (out / "per_class_accuracy.png").stat().st_size > 5000
    history = pd.read_csv(out / "classifier" / "history.csv")
    assert history["epoch"].tolist() == [0, 1]
    assert {"train_loss", "val_acc", "val_balanced_acc"} <= set(history.columns)
    # Warm-up over the first epoch's steps, then cosine to zero at the last step: the
    # schedule's step count matches the batches the worker really ran.
    assert history["lr"].tolist() == pytest.approx([0.05, 0.0], abs=1e-9)
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert len(predictions) == 500
    assert np.isclose((predictions["pred"] == predictions["label"]).mean(), metrics["overall"])
    assert "[ray-lt] baseline test: overall" in done.stdout
    # One driver-side bar for the epochs, advanced by rank 0 (tqdm draws on stderr).
    assert "classifier: 100%" in done.stderr and "2/2 [" in done.stderr, done.stderr[-2000:]
    folder = out / "classifier"
    first = pd.read_csv(folder / "history.csv")
    cfg = load_config(ROOT / "configs" / "digits_lt.yaml", QUICK)
    data = load_dataset(cfg.dataset, cfg.seed)
    # (The same config and seed giving the same weights elsewhere is checked byte for byte by
    # test_pipeline.py's sequential twin of the graph run.)
    # A longer run in the same place continues where the first one stopped.
    cfg.train.epochs = 3
    folder = fit_classifier(data, cfg.model, cfg.train, cfg.scaling, cfg.seed, out,
                            "classifier", evaluate=cfg.evaluate)
    second = pd.read_csv(folder / "history.csv")
    assert second["epoch"].tolist() == [0, 1, 2]
    assert np.allclose(second["train_loss"][:2], first["train_loss"])
    model = load_classifier(folder)
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 10)


def _shard(value: int | list[int], rows: int, size: int = 4) -> ResidentShard:
    """A shard in memory of ``rows`` rows, images filled with ``value`` (one label each)."""
    labels = torch.as_tensor(value if isinstance(value, list) else [value] * rows)
    images = torch.stack([torch.full((size, size, 1), int(v == 1) * 255, dtype=torch.uint8)
                          for v in labels.tolist()])
    return ResidentShard.from_columns({"image": images, "label": labels})


def test_mixed_batches_are_half_synthetic():
    batches = list(mixed_batches(_shard(0, 40), _shard(1, 12), batch_size=8,
                                 synthetic_fraction=0.5, synthetic_weight=0.3,
                                 shuffle_buffer=0))
    assert len(batches) == 10  # one pass over the real rows; the synthetic rows cycle
    for batch, weight in batches:
        assert batch["label"].tolist() == [0] * 4 + [1] * 4
        assert batch["image"][4:].min() == 255
        assert torch.allclose(weight, torch.tensor([1.0] * 4 + [0.3] * 4))


def test_a_synthetic_shard_smaller_than_its_share_of_a_batch_is_repeated():
    batches = list(mixed_batches(_shard(0, 12, 2), _shard([1, 2, 3], 3, 2), batch_size=8,
                                 synthetic_fraction=0.5, synthetic_weight=1.0,
                                 shuffle_buffer=0))
    assert len(batches) == 3
    labels = [b["label"][4:].tolist() for b, _ in batches]
    assert labels == [[1, 2, 3, 1], [2, 3, 1, 2], [3, 1, 2, 3]]
    with pytest.raises(ValueError, match="unequal lengths"):
        ResidentShard.from_columns({"image": torch.zeros(2, 1), "label": torch.zeros(3)})


def test_a_small_shard_becomes_resident_and_is_reshuffled_per_pass(ray_session):
    rows = [{"image": np.full((2, 2, 1), i, np.uint8), "label": i} for i in range(10)]
    ds = ray.data.from_items(rows)
    shard = ResidentShard(ds.iterator(), budget_bytes=2**20, seed=0)
    first = torch.cat([b["label"] for b in shard.iter_torch_batches(batch_size=4)])
    assert shard.resident and sorted(first.tolist()) == list(range(10))
    again = list(shard.iter_torch_batches(batch_size=4))  # no shuffle asked: stored order
    assert [b["label"].tolist() for b in again] == [first[:4].tolist(), first[4:8].tolist(),
                                                    first[8:].tolist()]
    orders = []
    for seed in (0, 0, 1):
        twin = ResidentShard(ds.iterator(), budget_bytes=2**20, seed=seed)
        list(twin.iter_torch_batches(batch_size=4))
        batches = list(twin.iter_torch_batches(batch_size=4, local_shuffle_buffer_size=8))
        assert [len(b["label"]) for b in batches] == [4, 4, 2]
        for b in batches:  # every image still carries its own label
            assert (b["image"][:, 0, 0, 0] == b["label"]).all()
        orders.append(torch.cat([b["label"] for b in batches]).tolist())
    assert sorted(orders[0]) == list(range(10)) and orders[0] != first.tolist()
    assert orders[0] == orders[1] and orders[0] != orders[2]  # seeded per shard

    big = ResidentShard(ds.iterator(), budget_bytes=60, seed=0)  # 10 x (4 + 8) bytes > 60
    assert len(list(big.iter_torch_batches(batch_size=4))) == 3 and not big.resident
    cut = ResidentShard(ds.iterator(), budget_bytes=2**20, seed=0)
    next(iter(cut.iter_torch_batches(batch_size=4)))  # an unfinished pass is not kept
    assert not cut.resident


def test_training_with_a_synthetic_dataset(tmp_path, ray_session):
    cfg = load_config(ROOT / "configs" / "digits_lt.yaml",
                      ["train.epochs=1", "train.synthetic_weight=0.5"])
    data = load_dataset(cfg.dataset, cfg.seed)
    synthetic = data.test.select_columns(["image", "label"])
    folder = fit_classifier(data, cfg.model, cfg.train, cfg.scaling, cfg.seed, tmp_path,
                            "mixed", evaluate=cfg.evaluate, synthetic=synthetic)
    history = pd.read_csv(folder / "history.csv")
    assert len(history) == 1 and np.isfinite(history["train_loss"][0])


