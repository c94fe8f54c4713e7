"""The small interface every generator implements, so the guided DDIM loop is written once.

A generator owns a diffusers ``DDIMScheduler`` and works on a latent ``z``: pixels in [-1, 1]
(``pixel``), a VAE latent (``unclip``) or a feature vector (``feature``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from diffusers import DDIMScheduler


@dataclass
class Conditioning:
    """Everything a generator needs to denoise one batch: labels, groups and its own inputs
    (prompt embeddings, image embeddings, ...), already on the generator's device."""

    labels: torch.Tensor
    groups: torch.Tensor
    inputs: dict[str, Any]


class Generator(Protocol):
    """What the feedback-guided sampler needs from a diffusion model."""

    scheduler: DDIMScheduler
    device: torch.device

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent, e.g. (C, H, W) or (D,)."""

    def condition(self, labels: torch.Tensor, groups: torch.Tensor,
                  generator: torch.Generator) -> Conditioning:
        """Conditioning inputs for a batch of (label, group); random choices (reference
        images, embedding dropout) draw from ``generator`` so a seed fixes them."""

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      cfg_scale: float) -> torch.Tensor:
        """Noise prediction with classifier-free guidance:
        ``eps_uncond + cfg_scale * (eps_cond - eps_uncond)`` (METHOD.md section 1)."""

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Latent -> classifier input: images in [0, 1] (B, C, H, W), differentiable; feature
        generators return features. Identity-like for pixel models, the VAE for latent ones."""
