"""``pixel`` generator (DiffuLT): a class- or group-conditional ``UNet2DModel`` trained from
scratch on the long-tailed training set, with label dropout for classifier-free guidance.

Conditions are class labels (or class x context groups); index ``num_conditions`` is the null
condition used for the unconditional branch. Training runs on Ray Train; the exported model is
``save_pretrained`` folders (safetensors) plus ``generator.json``.
"""

from __future__ import annotations

import json
import shutil
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
from diffusers.training_utils import EMAModel

from ray_lt.config import GeneratorConfig, ScalingConfig
from ray_lt.generate.base import SPEC_FILE, Conditioning, read_spec
from ray_lt.train.trainer import run_trainer


def build_unet(image_size: int, channels: int, num_conditions: int,
               block_out_channels: list[int], layers_per_block: int, attention: bool
               ) -> UNet2DModel:
    """A small conditional UNet; attention at the middle resolution when ``attention``."""
    n = len(block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention and n >= 2:
        down[1], up[n - 2] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up),
        num_class_embeds=num_conditions + 1, norm_num_groups=min(8, block_out_channels[0]),
        attention_head_dim=8)


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon")


class PixelGenerator:
    """The Generator interface over a conditional UNet2DModel in pixel space ([-1, 1])."""

    def __init__(self, unet: UNet2DModel, scheduler: DDIMScheduler, num_conditions: int,
                 by_group: bool, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.scheduler = scheduler
        self.num_conditions = num_conditions
        self.by_group = by_group

    def latent_shape(self) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    def condition(self, labels: torch.Tensor, groups: torch.Tensor, seeds: list[int]
                  ) -> Conditioning:
        ids = (groups if self.by_group else labels).to(self.device)
        if (ids < 0).any() or (ids >= self.num_conditions).any():
            raise ValueError(f"condition ids must lie in [0, {self.num_conditions})")
        return Conditioning(labels, groups, {"class_labels": ids})

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      cfg_scale: float) -> torch.Tensor:
        ids = cond.inputs["class_labels"]
        if cfg_scale == 1.0:
            return self.unet(z_t, t, class_labels=ids).sample
        null = torch.full_like(ids, self.num_conditions)
        both = self.unet(torch.cat([z_t, z_t]), t, class_labels=torch.cat([null, ids])).sample
        uncond, conditional = both.chunk(2)
        return uncond + cfg_scale * (conditional - uncond)

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Per-sample min-max to [0, 1]: keeps gradients where a clamp would cut them."""
        flat = z0.flatten(1)
        low = flat.min(1).values.view(-1, 1, 1, 1)
        high = flat.max(1).values.view(-1, 1, 1, 1)
        return (z0 - low) / (high - low + 1e-6)

    def decode_output(self, z0: torch.Tensor) -> torch.Tensor:
        """The saved image: [-1, 1] clamped and mapped to [0, 1]."""
        return ((z0 + 1) / 2).clamp(0, 1)

    def save_pretrained(self, folder: Path) -> None:
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(folder / "scheduler")
        (folder / SPEC_FILE).write_text(json.dumps(
            {"kind": "pixel", "num_conditions": self.num_conditions, "by_group": self.by_group},
            indent=2))

    @classmethod
    def from_pretrained(cls, folder: Path, device: str | torch.device = "cpu"
                        ) -> PixelGenerator:
        folder = Path(folder)
        spec = read_spec(folder, "pixel")
        unet = UNet2DModel.from_pretrained(folder / "unet")
        scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
        return cls(unet, scheduler, spec["num_conditions"], spec["by_group"], device)


def _load_shard(shard: Any, by_group: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows of a (small) training shard as tensors: images in [-1, 1], condition ids."""
    images, ids = [], []
    for batch in shard.iter_torch_batches(batch_size=1024):
        images.append(batch["image"].permute(0, 3, 1, 2).float() / 127.5 - 1)
        ids.append(batch["group" if by_group else "label"])
    return torch.cat(images), torch.cat(ids)


def generator_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function: denoising score matching with label dropout (DDPM eps loss),
    EMA weights, a checkpoint every ``checkpoint_every`` steps and resume from the latest."""
    hp = config["generator"]
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"] * 1000 + rank)
    rng = torch.Generator().manual_seed(config["seed"] * 1000 + 11 + rank)
    unet = build_unet(config["image_size"], config["channels"], config["num_conditions"],
                      hp["block_out_channels"], hp["layers_per_block"], hp["attention"])
    ema = EMAModel(unet.parameters(), decay=hp["ema_decay"])
    model = ray.train.torch.prepare_model(unet)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=0.0)
    noise_scheduler = training_scheduler()
    step, losses = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=False)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses = state["step"], state["losses"]
    ema.to(device)
    images, ids = _load_shard(ray.train.get_dataset_shard("train"), config["by_group"])
    null = config["num_conditions"]
    alphas = noise_scheduler.alphas_cumprod.to(device)
    started = time.perf_counter()
    if checkpoint is not None and step >= hp["train_steps"]:
        # The interrupted run had finished: hand its last checkpoint back as the result.
        ray.train.report({"step": step, "loss": losses[-1]},
                         checkpoint=checkpoint if rank == 0 else None)
    while step < hp["train_steps"]:
        idx = torch.randint(0, len(images), (hp["batch_size"],), generator=rng)
        x0 = images[idx].to(device)
        cond = ids[idx].clone()
        cond[torch.rand(len(cond), generator=rng) < hp["label_dropout"]] = null
        noise = torch.randn(x0.shape, generator=rng).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),),
                          generator=rng).to(device)
        abar = alphas[t].view(-1, 1, 1, 1)
        z_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        loss = F.mse_loss(model(z_t, t, class_labels=cond.to(device)).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.step(unet.parameters())
        losses.append(float(loss.detach()))
        step += 1
        if step % hp["checkpoint_every"] == 0 or step == hp["train_steps"]:
            metrics = {"step": step, "loss": float(np.mean(losses[-hp["checkpoint_every"]:])),
                       "steps_per_second": len(losses[-hp["checkpoint_every"]:]) /
                       max(time.perf_counter() - started, 1e-9)}
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as folder:
                saved = None
                if rank == 0:
                    torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(),
                                "optimizer": optimizer.state_dict(), "step": step,
                                "losses": losses}, Path(folder) / "state.pt")
                    saved = ray.train.Checkpoint.from_directory(folder)
                ray.train.report(metrics, checkpoint=saved)


def fit_pixel_generator(train: ray.data.Dataset, cfg: GeneratorConfig, scaling: ScalingConfig,
                        image_shape: tuple[int, int, int], num_conditions: int, seed: int,
                        out_dir: Path, name: str = "generator") -> Path:
    """Train the pixel generator on Ray Train and export its EMA weights to ``out_dir/name``."""
    by_group = cfg.condition_on == "group"
    loop_config = {"generator": cfg.model_dump(mode="json"), "seed": seed,
                   "image_size": image_shape[0], "channels": image_shape[2],
                   "num_conditions": num_conditions, "by_group": by_group}
    result = run_trainer(generator_loop_per_worker, loop_config,
                         {"train": train.select_columns(["image", "label", "group"])},
                         scaling, out_dir, name, split=["train"])
    if result.checkpoint is None:
        raise RuntimeError(f"generator training in {out_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=False)
    unet = build_unet(image_shape[0], image_shape[2], num_conditions, cfg.block_out_channels,
                      cfg.layers_per_block, cfg.attention)
    unet.load_state_dict(state["unet"])
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    ema.load_state_dict(state["ema"])
    ema.copy_to(unet.parameters())
    scheduler = DDIMScheduler.from_config(training_scheduler().config)
    folder = Path(out_dir) / name
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    PixelGenerator(unet, scheduler, num_conditions, by_group).save_pretrained(tmp)
    np.savetxt(tmp / "loss.csv", np.asarray(state["losses"]), fmt="%.6f", header="loss")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
