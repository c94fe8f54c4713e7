"""Where a small run's time goes: Ray's fixed costs against the real work, per stage of the
embedded default, at Ray Train's default controller poll (2 s) and at ray_lt's
(``scaling.poll_seconds``), beside the same work in a plain loop, in one run:

    python bench/stage_overhead.py [--config configs/digits_lt.yaml] [--epochs 30]

Rows (seconds):
- Ray start-up: ``ray.init`` of a local cluster.
- classifier: ``fit_classifier`` (the baseline stage's call) split into the worker group's
  start and stop (a ``TorchTrainer`` whose loop returns at once), dataset planning and the
  first pass that makes the shards resident (a loop that only does that), the epochs' real
  work (``epoch_seconds`` of its history) and the rest (validation, checkpoints and the
  ``ray.train.report`` waits); beside it the same epochs in a plain PyTorch loop.
- evaluation: the prediction pool over the test split (``evaluate_classifier``) against the
  same predictions in this process.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from ray_lt.cluster import init_ray
from ray_lt.config import load_config
from ray_lt.data import load_dataset
from ray_lt.evaluate.classifier import evaluate_classifier
from ray_lt.train import fit_classifier
from ray_lt.train.resident import ResidentShard
from ray_lt.train.trainer import POLL_ENV, _training_columns, model_spec, run_trainer

RAY_DEFAULT_POLL = 2.0  # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S when nobody sets it


def noop_loop(config: dict) -> None:
    """A Train worker that does nothing: what starting and stopping the group costs."""


def ingest_loop(config: dict) -> None:
    """A Train worker that only makes its shards resident, as the training loop's first
    epoch does."""
    import ray.train

    for name in ("train", "val"):
        shard = ResidentShard(ray.train.get_dataset_shard(name), 2**30, 0)
        for _ in shard.iter_torch_batches(batch_size=64):
            pass


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def classifier_rows(cfg, data, poll: float, out: Path) -> dict[str, float]:
    os.environ[POLL_ENV] = f"{poll:g}"
    scaling = cfg.scaling.model_copy(update={"poll_seconds": poll})
    datasets = {"train": _training_columns(data.train),
                "val": _training_columns(data.val, extra=("group",))}
    start, _ = timed(lambda: run_trainer(noop_loop, {}, {}, scaling, out, f"noop{poll:g}",
                                         split=[]))
    ingest, _ = timed(lambda: run_trainer(ingest_loop, {}, datasets, scaling, out,
                                          f"ingest{poll:g}", split=["train"]))
    total, folder = timed(lambda: fit_classifier(
        data, cfg.model, cfg.train, scaling, cfg.seed, out, f"classifier{poll:g}",
        evaluate=cfg.evaluate))
    epochs = float(pd.read_csv(Path(folder) / "history.csv")["epoch_seconds"].sum())
    return {"worker group start/stop": start, "dataset planning + first pass": ingest - start,
            "epochs (real work)": epochs, "validation, checkpoints, reports":
            total - ingest - epochs, "stage total": total}


def plain_epochs(cfg, data) -> float:
    """The same epochs (model, batches, augmentation, loss) in this process, one thread."""
    from train_overhead import plain_epochs as epochs

    rows = data.train.select_columns(["image", "label"]).to_pandas()
    torch.set_num_threads(1)
    return float(sum(epochs(np.stack(rows["image"].to_numpy()), rows["label"].to_numpy(),
                            model_spec(cfg.model, data), cfg, data.class_counts,
                            cfg.train.epochs)))


def plain_predict(folder: Path, data) -> float:
    from ray_lt.train.trainer import load_classifier

    rows = data.test.select_columns(["image", "label"]).to_pandas()
    images = torch.from_numpy(np.stack(rows["image"].to_numpy())).permute(0, 3, 1, 2)
    started = time.perf_counter()
    model = load_classifier(folder)
    with torch.no_grad():
        model(images.float() / 255).argmax(1)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/digits_lt.yaml")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    cfg = load_config(args.config, [f"train.epochs={args.epochs}"])
    ray_start, _ = timed(lambda: init_ray(cfg.ray))
    ray.data.DataContext.get_current().enable_progress_bars = False
    data = load_dataset(cfg.dataset, cfg.seed)
    table: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for poll, column in ((RAY_DEFAULT_POLL, "Ray Train poll 2 s (before)"),
                             (cfg.scaling.poll_seconds,
                              f"poll {cfg.scaling.poll_seconds:g} s (after)")):
            table[column] = classifier_rows(cfg, data, poll, out)
        plain = plain_epochs(cfg, data)
        folder = out / f"classifier{cfg.scaling.poll_seconds:g}"
        evaluation, _ = timed(lambda: evaluate_classifier(folder, data, cfg.evaluate,
                                                          out / "evaluation"))
        predict = plain_predict(folder, data)
    rows = list(next(iter(table.values())))
    frame = pd.DataFrame({column: [values[row] for row in rows]
                          for column, values in table.items()}, index=rows)
    frame["plain loop"] = [np.nan, np.nan, plain, np.nan, plain]
    print(f"{args.config}: {len(data.class_counts)} classes, {int(data.class_counts.sum())} "
          f"training images, {args.epochs} epochs, 1 training worker")
    print(f"Ray start-up (ray.init, local cluster): {ray_start:.1f} s")
    print("classifier stage, seconds:")
    print(frame.round(2).to_string())
    before, after = (frame.loc["stage total", c] for c in table)
    print(f"ratio stage before / after: {before / after:.2f}; after / plain loop: "
          f"{after / plain:.1f}")
    print(f"evaluation stage (prediction pool over {data.test.count()} test images): "
          f"{evaluation:.1f} s; the same predictions in this process: {predict:.2f} s "
          f"(ratio {evaluation / predict:.0f})")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_overhead's plain loop
    main()
