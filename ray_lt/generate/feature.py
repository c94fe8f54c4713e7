"""``feature`` generator (LDMLR): a class-conditional denoiser over the baseline classifier's
penultimate features. Guidance uses the classifier's head (no decoder); synthetic rows carry
feature vectors (pseudo-features) instead of images.

The denoiser works on standardised features; ``decode`` maps back to the classifier's scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import load_file, save_file
from torch import nn

from ray_lt.generate.base import SPEC_FILE, Conditioning, read_spec

WEIGHTS_FILE = "denoiser.safetensors"


class FeatureDenoiser(nn.Module):
    """Noise prediction for feature vectors: an MLP on [z, time embedding + class embedding]."""

    def __init__(self, dim: int, num_conditions: int, hidden: int = 256, depth: int = 3,
                 time_dim: int = 64):
        super().__init__()
        self.dim, self.num_conditions, self.hidden, self.depth = dim, num_conditions, hidden, depth
        self.time_dim = time_dim
        self.embed_class = nn.Embedding(num_conditions + 1, time_dim)  # last = null condition
        layers: list[nn.Module] = [nn.Linear(dim + time_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor
                ) -> torch.Tensor:
        t = t.expand(len(z)) if t.dim() == 0 else t
        emb = get_timestep_embedding(t, self.time_dim).to(z) + self.embed_class(class_labels)
        return self.net(torch.cat([z, emb], dim=1))

    def spec(self) -> dict:
        return {"dim": self.dim, "num_conditions": self.num_conditions, "hidden": self.hidden,
                "depth": self.depth, "time_dim": self.time_dim}


class FeatureGenerator:
    """The Generator interface over a FeatureDenoiser, in standardised feature space."""

    def __init__(self, denoiser: FeatureDenoiser, scheduler: DDIMScheduler, mean: torch.Tensor,
                 std: torch.Tensor, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.denoiser = denoiser.to(self.device).eval().requires_grad_(False)
        self.scheduler = scheduler
        self.mean, self.std = mean.to(self.device), std.to(self.device)
        self.num_conditions = denoiser.num_conditions

    def latent_shape(self) -> tuple[int, ...]:
        return (self.denoiser.dim,)

    def condition(self, labels: torch.Tensor, groups: torch.Tensor, seeds: list[int]
                  ) -> Conditioning:
        labels = labels.to(self.device)
        return Conditioning(labels, groups.to(self.device), {"class_labels": labels})

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      cfg_scale: float) -> torch.Tensor:
        ids = cond.inputs["class_labels"]
        t = torch.as_tensor(t, device=self.device)
        if cfg_scale == 1.0:
            return self.denoiser(z_t, t, ids)
        null = torch.full_like(ids, self.num_conditions)
        both = self.denoiser(torch.cat([z_t, z_t]), t, torch.cat([null, ids]))
        uncond, conditional = both.chunk(2)
        return uncond + cfg_scale * (conditional - uncond)

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Standardised -> the classifier's feature scale (what its head takes)."""
        return z0 * self.std + self.mean

    def decode_output(self, z0: torch.Tensor, upcast: bool = False) -> torch.Tensor:
        """The saved pseudo-features (float32 already: ``upcast`` changes nothing)."""
        return self.decode(z0)

    def save_pretrained(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({**self.denoiser.state_dict(), "feature_mean": self.mean.cpu(),
                   "feature_std": self.std.cpu()}, folder / WEIGHTS_FILE)
        self.scheduler.save_pretrained(folder / "scheduler")
        (folder / SPEC_FILE).write_text(json.dumps({"kind": "feature",
                                                    **self.denoiser.spec()}, indent=2))

    @classmethod
    def from_pretrained(cls, folder: Path, device: str | torch.device = "cpu"
                        ) -> FeatureGenerator:
        folder = Path(folder)
        spec = read_spec(folder, "feature")
        spec.pop("kind")
        state = load_file(folder / WEIGHTS_FILE)
        mean, std = state.pop("feature_mean"), state.pop("feature_std")
        denoiser = FeatureDenoiser(**spec)
        denoiser.load_state_dict(state)
        return cls(denoiser, DDIMScheduler.from_pretrained(folder / "scheduler"), mean, std,
                   device)


def train_feature_generator(features: np.ndarray, labels: np.ndarray, num_classes: int,
                            steps: int, batch_size: int, lr: float, label_dropout: float,
                            seed: int, folder: Path) -> Path:
    """Fit the denoiser on real training features (DDPM eps loss, label dropout for CFG) and
    save it to ``folder``. Small enough for one CPU: run it as a Ray task."""
    rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-3)
    x = (x - mean) / std
    denoiser = FeatureDenoiser(x.shape[1], num_classes)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=lr)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=rng)
        cond = y[idx].clone()
        cond[torch.rand(len(cond), generator=rng) < label_dropout] = num_classes
        noise = torch.randn(batch_size, x.shape[1], generator=rng)
        t = torch.randint(0, 1000, (batch_size,), generator=rng)
        z_t = noise_scheduler.add_noise(x[idx], noise, t)
        loss = F.mse_loss(denoiser(z_t, t, cond), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    # Standardised features are unbounded: no clipping of the predicted x0 to [-1, 1].
    scheduler = DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False)
    FeatureGenerator(denoiser, scheduler, mean, std).save_pretrained(folder)
    return Path(folder)
