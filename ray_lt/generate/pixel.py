"""``pixel`` generator (DiffuLT): a class- or group-conditional ``UNet2DModel`` trained from
scratch on the long-tailed training set, with label dropout for classifier-free guidance.

Conditions are class labels (or class x context groups); index ``num_conditions`` is the null
condition used for the unconditional branch. Training runs on Ray Train; the exported model is
``save_pretrained`` folders (safetensors) plus ``generator.json``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from ray_lt.atomic import staged_folder
from ray_lt.config import PixelSection, ScalingSection
from ray_lt.generate.base import SPEC_FILE, Conditioning, read_spec
from ray_lt.generate.sources import SourceLatents, Sources
from ray_lt.train.progress import finite_everywhere, report_divergence, report_progress
from ray_lt.train.trainer import run_trainer

EMBEDDING_FILE = "condition_embedding.safetensors"
TRAINING_FILE = "training.json"
PROGRESS_EVERY = 10  # generator steps between updates of the driver's progress bar


def build_unet(image_size: int, channels: int, num_conditions: int,
               block_out_channels: list[int], layers_per_block: int, attention: bool,
               embedded_outside: bool = False) -> UNet2DModel:
    """A small conditional UNet; attention at the middle resolution when ``attention``. With
    ``embedded_outside`` the condition arrives as an embedding vector (``ConditionedUNet``)."""
    n = len(block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention and n >= 2:
        down[1], up[n - 2] = "AttnDownBlock2D", "AttnUpBlock2D"
    conditioning = ({"class_embed_type": "identity"} if embedded_outside
                    else {"num_class_embeds": num_conditions + 1})
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up),
        norm_num_groups=min(8, block_out_channels[0]), attention_head_dim=8, **conditioning)


class ConditionedUNet(nn.Module):
    """The UNet and how conditions enter it: an id per sample (class or group; the UNet's own
    table, ``num_conditions`` = null), or with ``num_contexts`` a (class, context) pair whose
    embeddings are summed, so that a class x context group absent from training is composed
    of a class and a context that were not (nulls: ``num_conditions``, ``num_contexts``)."""

    def __init__(self, unet: UNet2DModel, num_conditions: int, num_contexts: int = 0):
        super().__init__()
        self.unet, self.num_conditions, self.num_contexts = unet, num_conditions, num_contexts
        if num_contexts:
            dim = unet.config.block_out_channels[0] * 4  # UNet2DModel's time-embedding size
            self.classes = nn.Embedding(num_conditions + 1, dim)
            self.contexts = nn.Embedding(num_contexts + 1, dim)

    def null(self, cond: torch.Tensor) -> torch.Tensor:
        if self.num_contexts:
            return torch.tensor([self.num_conditions, self.num_contexts],
                                device=cond.device).expand_as(cond)
        return torch.full_like(cond, self.num_conditions)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.num_contexts:
            embedding = self.classes(cond[:, 0]) + self.contexts(cond[:, 1])
            return self.unet(z_t, t, class_labels=embedding).sample
        return self.unet(z_t, t, class_labels=cond).sample


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon")


class PixelGenerator:
    """The Generator interface over a ConditionedUNet in pixel space ([-1, 1])."""

    def __init__(self, model: ConditionedUNet, scheduler: DDIMScheduler, by_group: bool,
                 device: str | torch.device = "cpu", sources: Sources | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.scheduler = scheduler
        self.by_group = by_group
        channels, size, _ = self.latent_shape()
        self.sources = (SourceLatents(sources, self.encode, size, size, channels)
                        if sources is not None else None)

    def latent_shape(self) -> tuple[int, ...]:
        config = self.model.unet.config
        return (config.in_channels, config.sample_size, config.sample_size)

    def condition(self, labels: torch.Tensor, groups: torch.Tensor, seeds: list[int]
                  ) -> Conditioning:
        # checked where the labels are (the host, from the sampler), then moved
        m = self.model
        if m.num_contexts:
            if (groups < 0).any():
                raise ValueError("a class x context generator needs the group of every sample")
            cond = torch.stack([labels, groups % m.num_contexts], dim=1)
        else:
            cond = groups if self.by_group else labels
        if (cond < 0).any() or (cond[..., 0] >= m.num_conditions).any():
            raise ValueError(f"condition ids must lie in [0, {m.num_conditions})")
        inputs, record = {"cond": cond.to(self.device)}, {}
        if self.sources is not None:
            latents, rows = self.sources(labels.tolist(), groups.tolist(), seeds)
            inputs["init_latents"], record["source_row"] = latents.to(self.device), rows
        return Conditioning(labels.to(self.device), groups.to(self.device), inputs, record)

    def encode(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, C) -> the pixel latent (C, H, W) in [-1, 1]."""
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      cfg_scale: float) -> torch.Tensor:
        ids = cond.inputs["cond"]
        if cfg_scale == 1.0:
            return self.model(z_t, t, ids)
        both = self.model(torch.cat([z_t, z_t]), t, torch.cat([self.model.null(ids), ids]))
        uncond, conditional = both.chunk(2)
        return uncond + cfg_scale * (conditional - uncond)

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Per-sample min-max to [0, 1]: keeps gradients where a clamp would cut them."""
        flat = z0.flatten(1)
        low = flat.min(1).values.view(-1, 1, 1, 1)
        high = flat.max(1).values.view(-1, 1, 1, 1)
        return (z0 - low) / (high - low + 1e-6)

    def decode_output(self, z0: torch.Tensor, upcast: bool = False) -> torch.Tensor:
        """The saved image: [-1, 1] clamped and mapped to [0, 1] (float32 already: ``upcast``
        changes nothing)."""
        return ((z0 + 1) / 2).clamp(0, 1)

    def save_pretrained(self, folder: Path) -> None:
        folder = Path(folder)
        m = self.model
        m.unet.save_pretrained(folder / "unet", safe_serialization=True)
        if m.num_contexts:
            save_file({"classes": m.classes.weight.contiguous(),
                       "contexts": m.contexts.weight.contiguous()}, folder / EMBEDDING_FILE)
        self.scheduler.save_pretrained(folder / "scheduler")
        (folder / SPEC_FILE).write_text(json.dumps(
            {"kind": "pixel", "num_conditions": m.num_conditions, "by_group": self.by_group,
             "num_contexts": m.num_contexts}, indent=2))

    @classmethod
    def from_pretrained(cls, folder: Path, device: str | torch.device = "cpu",
                        sources: Sources | None = None) -> PixelGenerator:
        folder = Path(folder)
        spec = read_spec(folder, "pixel")
        model = ConditionedUNet(UNet2DModel.from_pretrained(folder / "unet"),
                                spec["num_conditions"], spec.get("num_contexts", 0))
        if model.num_contexts:
            weights = load_file(folder / EMBEDDING_FILE)
            model.classes.weight.data.copy_(weights["classes"])
            model.contexts.weight.data.copy_(weights["contexts"])
        scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
        return cls(model, scheduler, spec["by_group"], device, sources)


def _load_shard(shard: Any, by_group: bool, num_contexts: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows of a (small) training shard as tensors: images in [-1, 1], conditions."""
    images, conds = [], []
    for batch in shard.iter_torch_batches(batch_size=1024):
        images.append(batch["image"].permute(0, 3, 1, 2).float() / 127.5 - 1)
        if num_contexts:
            conds.append(torch.stack([batch["label"], batch["group"] % num_contexts], dim=1))
        else:
            conds.append(batch["group" if by_group else "label"])
    return torch.cat(images), torch.cat(conds)


def generator_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function: denoising score matching with label dropout (DDPM eps loss),
    EMA weights, a checkpoint every ``checkpoint_every`` steps and resume from the latest."""
    hp = config["generator"]
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"] * 1000 + rank)
    rng = torch.Generator().manual_seed(config["seed"] * 1000 + 11 + rank)
    n_ctx = config["num_contexts"]
    net = ConditionedUNet(
        build_unet(config["image_size"], config["channels"], config["num_conditions"],
                   hp["block_out_channels"], hp["layers_per_block"], hp["attention"],
                   embedded_outside=n_ctx > 0), config["num_conditions"], n_ctx)
    from diffusers.training_utils import EMAModel  # imports transformers: training only

    ema = EMAModel(net.parameters(), decay=hp["ema_decay"])
    model = ray.train.torch.prepare_model(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=0.0)
    noise_scheduler = training_scheduler()
    step, losses = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses = state["step"], state["losses"]
    resumed_from = last_saved = step  # > 0 when this worker group restored a checkpoint
    starts = (state.get("starts", [0]) if checkpoint is not None else []) + [step]
    ema.to(device)
    images, conds = _load_shard(ray.train.get_dataset_shard("train"), config["by_group"], n_ctx)
    if hp.get("threads"):  # after the data is in memory: the steps alone use these threads
        torch.set_num_threads(hp["threads"])
    started = time.perf_counter()
    if checkpoint is not None and step >= hp["train_steps"]:
        # The interrupted run had finished: hand its last checkpoint back as the result.
        ray.train.report({"step": step, "loss": losses[-1]},
                         checkpoint=checkpoint if rank == 0 else None)
    while step < hp["train_steps"]:
        idx = torch.randint(0, len(images), (hp["batch_size"],), generator=rng)
        x0 = images[idx].to(device)
        cond = conds[idx].clone()
        drop = torch.rand(len(cond), generator=rng) < hp["label_dropout"]
        cond[drop] = net.null(cond[drop])
        if n_ctx:  # also learn class-only conditioning: drop the context alone as often
            drop_context = torch.rand(len(cond), generator=rng) < hp["label_dropout"]
            cond[drop_context, 1] = n_ctx
        noise = torch.randn(x0.shape, generator=rng).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),),
                          generator=rng).to(device)
        z_t = noise_scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(model(z_t, t, cond.to(device)), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.step(net.parameters())
        losses.append(float(loss.detach()))
        step += 1
        if rank == 0 and (step % PROGRESS_EVERY == 0 or step == hp["train_steps"]):
            report_progress(config, step, loss=losses[-1])
        if step % hp["checkpoint_every"] == 0 or step == hp["train_steps"]:
            recent = float(np.mean(losses[-hp["checkpoint_every"]:]))
            if not finite_everywhere(recent, device):  # stop, keeping the last checkpoint
                if rank == 0:
                    report_divergence(config, step, recent, last_saved or None)
                return
            last_saved = step
            metrics = {"step": step, "resumed_from": resumed_from,
                       "loss": float(np.mean(losses[-hp["checkpoint_every"]:])),
                       "steps_per_second": len(losses[-hp["checkpoint_every"]:]) /
                       max(time.perf_counter() - started, 1e-9)}
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as folder:
                saved = None
                if rank == 0:
                    torch.save({"model": net.state_dict(), "ema": ema.state_dict(),
                                "optimizer": optimizer.state_dict(), "step": step,
                                "losses": losses, "starts": starts}, Path(folder) / "state.pt")
                    saved = ray.train.Checkpoint.from_directory(folder)
                ray.train.report(metrics, checkpoint=saved)


def fit_pixel_generator(train: ray.data.Dataset, cfg: PixelSection, scaling: ScalingSection,
                        image_shape: tuple[int, int, int], num_conditions: int, seed: int,
                        out_dir: Path, name: str = "generator", num_contexts: int = 0,
                        trained_on: dict | None = None) -> Path:
    """Train the pixel generator on Ray Train and export its EMA weights to ``out_dir/name``;
    ``trained_on`` (what ``train`` is: the long tail or the external pool, with its sizes) is
    kept in its ``training.json``."""
    by_group = cfg.condition_on == "group"
    loop_config = {"generator": cfg.model_dump(mode="json"), "seed": seed,
                   "image_size": image_shape[0], "channels": image_shape[2],
                   "num_conditions": num_conditions, "by_group": by_group,
                   "num_contexts": num_contexts}
    result = run_trainer(generator_loop_per_worker, loop_config,
                         {"train": train.select_columns(["image", "label", "group"])},
                         scaling, out_dir, name, split=["train"],
                         progress=(name, cfg.train_steps, "step"), lr=("generator.lr", cfg.lr))
    if result.checkpoint is None:
        raise RuntimeError(f"generator training in {out_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
    net = ConditionedUNet(
        build_unet(image_shape[0], image_shape[2], num_conditions, cfg.block_out_channels,
                   cfg.layers_per_block, cfg.attention, embedded_outside=num_contexts > 0),
        num_conditions, num_contexts)
    net.load_state_dict(state["model"])
    from diffusers.training_utils import EMAModel

    ema = EMAModel(net.parameters(), decay=cfg.ema_decay)
    ema.load_state_dict(state["ema"])
    ema.copy_to(net.parameters())
    scheduler = DDIMScheduler.from_config(training_scheduler().config)
    folder = Path(out_dir) / name
    with staged_folder(folder) as tmp:
        PixelGenerator(net, scheduler, by_group).save_pretrained(tmp)
        np.savetxt(tmp / "loss.csv", np.asarray(state["losses"]), fmt="%.6f", header="loss")
        # The step each worker group started at: more than one entry after a restore.
        (tmp / TRAINING_FILE).write_text(json.dumps({"steps": state["step"],
                                                     "starts": state["starts"],
                                                     "trained_on": trained_on}))
    return folder
