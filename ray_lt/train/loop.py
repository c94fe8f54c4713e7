"""``train_loop_per_worker``: the classifier's DDP training loop, run by Ray Train on each worker.

Reads the ``train`` shard (and, when given, a ``synthetic`` shard mixed into every batch at
``synthetic_fraction``), checkpoints every epoch on rank 0 and resumes from Ray Train's latest
checkpoint after a failure or a rerun. An epoch whose loss is not finite on some worker ends
the loop on every worker, without a checkpoint (``report_divergence``).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from ray_lt.evaluate.metrics import HEADLINE, accuracy_report
from ray_lt.train.augment import augment_batch
from ray_lt.train.losses import GroupDRO, group_weights, log_prior, per_sample_loss
from ray_lt.train.models import build_model
from ray_lt.train.progress import finite_everywhere, report_divergence, report_progress
from ray_lt.train.resident import ResidentShard

STATE_FILE = "state.pt"


def to_images(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, C) image column -> float (B, C, H, W) in [0, 1] on ``device``."""
    return batch["image"].to(device).permute(0, 3, 1, 2).float().div_(255.0)


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                               weight_decay=weight_decay, nesterov=momentum > 0)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
                       ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then a half cosine down to 0 at
    ``total_steps``, stepped per optimizer step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(config: dict[str, Any], world_size: int) -> int:
    """Optimizer steps in one epoch of one worker: its equal share of the real training rows
    over the real rows of a batch (``mixed_batches``); the learning-rate schedule's unit."""
    hp = config["train"]
    n_syn = round(hp["batch_size"] * hp["synthetic_fraction"]) if config["has_synthetic"] else 0
    rows = sum(config["class_counts"]) // world_size
    return max(1, math.ceil(rows / max(1, hp["batch_size"] - n_syn)))


def _cycled_batches(synthetic: Any, size: int, kwargs: dict[str, Any]
                    ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of exactly ``size`` synthetic rows, passing over the shard again and
    again (a shard smaller than one batch is repeated within the batch)."""
    buffer: dict[str, torch.Tensor] | None = None
    while True:
        seen = 0
        for batch in synthetic.iter_torch_batches(batch_size=size, **kwargs):
            seen += len(batch["label"])
            batch = {k: batch[k] for k in ("image", "label", "group", "weight") if k in batch}
            buffer = batch if buffer is None else {k: torch.cat([buffer[k], batch[k]])
                                                   for k in buffer}
            while len(buffer["label"]) >= size:
                yield {k: v[:size] for k, v in buffer.items()}
                buffer = {k: v[size:] for k, v in buffer.items()}
        if not seen:
            raise ValueError("the synthetic shard is empty")


def mixed_batches(real: Any, synthetic: Any | None, batch_size: int, synthetic_fraction: float,
                  synthetic_weight: float, shuffle_buffer: int,
                  group_weight: torch.Tensor | None = None
                  ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Batches of real rows, each joined by synthetic rows at ``synthetic_fraction``.

    One pass over the real shard is an epoch; the synthetic shard is cycled as needed. Yields
    the merged batch and its per-sample loss weights; ``group_weight`` (per group id) further
    weights each real row by its group (``train.group_objective: reweight``).
    """
    n_syn = round(batch_size * synthetic_fraction) if synthetic is not None else 0
    kwargs = {"local_shuffle_buffer_size": shuffle_buffer or None}
    real_iter = real.iter_torch_batches(batch_size=batch_size - n_syn, **kwargs)
    syn_iter = _cycled_batches(synthetic, n_syn, kwargs) if n_syn else None
    for batch in real_iter:
        weight = batch.get("weight", torch.ones(len(batch["label"])))
        if group_weight is not None:
            weight = weight * group_weight[batch["group"].long()]
        if syn_iter is None:
            yield batch, weight
            continue
        syn = next(syn_iter)
        syn_weight = syn.get("weight", torch.ones(len(syn["label"]))) * synthetic_weight
        merged = {k: torch.cat([batch[k], syn[k]]) for k in ("image", "label", "group")
                  if k in batch and k in syn}
        yield merged, torch.cat([weight, syn_weight])


@torch.no_grad()
def validate(model: nn.Module, shard: Any, config: dict[str, Any], device: torch.device
             ) -> dict[str, float]:
    """Accuracy, class-balanced accuracy, Few accuracy and (with groups) worst-group and
    unseen-group accuracy over a validation shard: the numbers ``ray-lt tune`` optimises,
    reported every epoch."""
    model.eval()
    labels, preds, groups = [], [], []
    for batch in shard.iter_torch_batches(batch_size=256):
        preds.append(model(to_images(batch, device)).argmax(1).cpu())
        labels.append(batch["label"].cpu())
        groups.append(batch["group"].cpu() if "group" in batch else -torch.ones_like(labels[-1]))
    report = accuracy_report(torch.cat(labels).numpy(), torch.cat(preds).numpy(),
                             torch.cat(groups).numpy(), config["class_counts"],
                             config["num_groups"], config["many_threshold"],
                             config["few_threshold"], config.get("group_counts"))
    metrics = {"val_acc": report["overall"], "val_balanced_acc": report["balanced"]}
    for key in HEADLINE[1:]:  # overall is val_acc
        if report[key] is not None:
            metrics[f"val_{key}"] = report[key]
    return metrics


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function. ``config`` holds plain data: model spec, hyper-parameters,
    class counts, seed and whether a synthetic shard exists."""
    hp = config["train"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"] * 1000 + rank)
    if hp["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    generator = torch.Generator().manual_seed(config["seed"] * 1000 + 7 + rank)

    model = ray.train.torch.prepare_model(build_model(**config["model"]))
    optimizer = make_optimizer(model, hp["optimizer"], hp["lr"], hp["momentum"],
                               hp["weight_decay"])
    per_epoch = steps_per_epoch(config, context.get_world_size())
    scheduler = cosine_with_warmup(optimizer, hp["warmup_epochs"] * per_epoch,
                                   hp["epochs"] * per_epoch)
    # Data sets with groups may train for the worst group (docs/method.md §5).
    objective = hp["group_objective"]
    dro = (GroupDRO(config["num_groups"], hp["dro_step_size"], device)
           if objective == "dro" else None)
    by_group = group_weights(config["group_counts"]) if objective == "reweight" else None
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location=device,
                               weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if dro is not None:
            dro.load_state_dict(state["group_dro"])
        start_epoch, history = state["epoch"] + 1, state["history"]

    prior = log_prior(config["class_counts"]).to(device)
    budget = hp["resident_mib"] * 2**20
    shard_seed = config["seed"] * 1000 + 11 + rank
    real = ResidentShard(ray.train.get_dataset_shard("train"), budget, shard_seed)
    synthetic = (ResidentShard(ray.train.get_dataset_shard("synthetic"), budget, shard_seed + 1)
                 if config["has_synthetic"] else None)
    val = (ResidentShard(ray.train.get_dataset_shard("val"), budget, shard_seed + 2)
           if config["has_val"] else None)
    augment = hp["augment"]

    for epoch in range(start_epoch, hp["epochs"]):
        started = time.perf_counter()
        model.train()
        loss_sum = correct = seen = 0.0
        for batch, weight in mixed_batches(real, synthetic, hp["batch_size"],
                                           hp["synthetic_fraction"], hp["synthetic_weight"],
                                           hp["shuffle_buffer"], by_group):
            images = augment_batch(to_images(batch, device), augment["crop_padding"],
                                   augment["resized_crop_scale"], augment["flip"], generator)
            labels = batch["label"].to(device)
            logits = model(images)
            per_sample = per_sample_loss(logits, labels, prior, hp["balanced_softmax_weight"],
                                         weight.to(device))
            loss = per_sample.mean() if dro is None else dro.loss(per_sample, batch["group"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(labels)
            correct += float((logits.argmax(1) == labels).sum())
            seen += len(labels)
        if not finite_everywhere(loss_sum, device):  # stop at once, keep the last checkpoint
            if rank == 0:
                report_divergence(config, epoch + 1, loss_sum / max(seen, 1),
                                  epoch if epoch > 0 else None)
            return
        metrics = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1),
                   "train_acc": correct / max(seen, 1), "lr": scheduler.get_last_lr()[0],
                   "epoch_seconds": time.perf_counter() - started,
                   # The epoch this worker group started at: > 0 after a restore.
                   "resumed_from": start_epoch}
        if dro is not None:  # how far group DRO leans on its worst group (uniform: 1 / G)
            metrics["dro_q_max"] = float(dro.q.max())
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                if val is not None:
                    metrics.update(validate(_unwrap(model), val, config, device))
                history.append(metrics)
                torch.save({"model": _unwrap(model).state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch,
                            "history": history,
                            **({"group_dro": dro.state_dict()} if dro is not None else {})},
                           Path(folder) / STATE_FILE)
                saved = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=saved)
        if rank == 0:
            report_progress(config, epoch + 1, loss=metrics["train_loss"],
                            **{k: metrics[k] for k in ("val_acc",) if k in metrics})
    if checkpoint is not None and start_epoch >= hp["epochs"]:
        # The interrupted run had finished training: hand its last checkpoint back as result.
        ray.train.report(history[-1], checkpoint=checkpoint if rank == 0 else None)
