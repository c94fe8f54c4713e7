"""One classifier epoch through Ray Train's TorchTrainer (1 worker) vs a plain PyTorch loop.

Same model, data, batch size, augmentation and loss, measured side by side in one run:

    python bench/train_overhead.py [--config configs/digits_groups.yaml] [--epochs 3]

Prints the plain loop's epoch time, TorchTrainer's in-worker epoch time (data streamed from
Ray Data) and its whole ``fit()`` wall time, and their ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ray_lt.cluster import init_ray
from ray_lt.config import load_config
from ray_lt.data import load_dataset
from ray_lt.train import fit_classifier
from ray_lt.train.augment import augment_batch
from ray_lt.train.loop import make_optimizer
from ray_lt.train.losses import classification_loss, log_prior
from ray_lt.train.models import build_model
from ray_lt.train.trainer import model_spec


def plain_epochs(images: np.ndarray, labels: np.ndarray, spec: dict, cfg, counts, epochs: int
                 ) -> list[float]:
    """Seconds per epoch of the same training step in a bare PyTorch loop over tensors."""
    torch.manual_seed(0)
    model = build_model(**spec)
    hp = cfg.train
    optimizer = make_optimizer(model, hp.optimizer, hp.lr, hp.momentum, hp.weight_decay)
    prior = log_prior(counts)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    y_all = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(y_all), generator=generator)
        for start in range(0, len(order), hp.batch_size):
            idx = order[start:start + hp.batch_size]
            x = augment_batch(x_all[idx], hp.augment.crop_padding, hp.augment.resized_crop_scale,
                              hp.augment.flip, generator)
            loss = classification_loss(model(x), y_all[idx], prior,
                                       hp.balanced_softmax_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/digits_groups.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(args.config, [f"train.epochs={args.epochs}"])
    init_ray(cfg.ray)
    data = load_dataset(cfg.dataset, cfg.seed)
    rows = data.train.select_columns(["image", "label"]).to_pandas()
    images = np.stack(rows["image"].to_numpy())
    labels = rows["label"].to_numpy()
    spec = model_spec(cfg.model, data)
    torch.set_num_threads(1)  # the Ray worker gets one CPU: give the plain loop the same
    plain = plain_epochs(images, labels, spec, cfg, data.class_counts, args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        folder = fit_classifier(data, cfg.model, cfg.train, cfg.scaling, cfg.seed, Path(tmp),
                                "bench", evaluate=cfg.evaluate)
        fit_wall = time.perf_counter() - started
        history = pd.read_csv(folder / "history.csv")
    ray_epochs = history["epoch_seconds"].tolist()
    steady_plain = float(np.median(plain[1:] or plain))
    steady_ray = float(np.median(ray_epochs[1:] or ray_epochs))
    print(f"data: {args.config}, {len(labels)} training images, batch {cfg.train.batch_size}, "
          f"{args.epochs} epochs, 1 worker / 1 thread")
    print(f"plain loop epoch (median after the first): {steady_plain:.3f} s")
    print(f"TorchTrainer in-worker epoch (median after the first): {steady_ray:.3f} s")
    print(f"TorchTrainer fit() wall for {args.epochs} epochs: {fit_wall:.1f} s "
          f"(plain loop: {sum(plain):.1f} s)")
    print(f"ratio in-worker epoch / plain epoch: {steady_ray / steady_plain:.2f}")
    print(f"ratio fit() wall / plain loop wall: {fit_wall / sum(plain):.2f}")


if __name__ == "__main__":
    main()
