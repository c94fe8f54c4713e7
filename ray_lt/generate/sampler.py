"""The feedback-guided DDIM loop (METHOD.md sections 1-2), written once for every generator.

Per step: predict noise with classifier-free guidance; every ``every`` steps take the gradient
of the criterion on the decoded predicted x0 with respect to ``z_t`` and apply it, either in the
official release's normalised form (rescaled to the latent's norm, times the scale, added to
``z_t``) or as a shift of the noise prediction; then the DDIM step.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ray_lt.generate.base import Generator, sample_generators


@dataclass(frozen=True)
class Guidance:
    """Feedback-guidance settings; ``scale = 0`` samples without feedback."""

    scale: float = 0.03
    every: int = 5
    mode: Literal["normalized", "eps"] = "normalized"
    reuse: bool = False
    through_unet: bool = False


@dataclass
class Samples:
    """A batch of finished samples and what guidance did to each."""

    latents: torch.Tensor
    criterion_before: torch.Tensor
    criterion_after: torch.Tensor
    guidance_norm: torch.Tensor
    nonfinite_steps: torch.Tensor


def _per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def guided_sample(generator: Generator, scorer: nn.Module | None, labels: torch.Tensor,
                  groups: torch.Tensor, criterion_ids: torch.Tensor, seeds: list[int],
                  num_steps: int, cfg_scale: float, guidance: Guidance, eta: float = 0.0,
                  autocast_dtype: torch.dtype | None = None) -> Samples:
    """Sample one batch; sample i depends only on its seed, label, group and criterion.

    ``scorer(images, labels, criterion_ids) -> (B,)`` is the criterion c to increase. Non-finite
    gradients are zeroed per sample and counted in ``nonfinite_steps``, never applied.
    """
    device = generator.device
    labels, groups = labels.to(device), groups.to(device)
    criterion_ids = criterion_ids.to(device)
    scheduler = copy.deepcopy(generator.scheduler)
    scheduler.set_timesteps(num_steps)
    noise_gens = sample_generators(seeds, stream=0)
    shape = generator.latent_shape()
    z = torch.stack([torch.randn(shape, generator=g) for g in noise_gens]).to(device)
    z = z * scheduler.init_noise_sigma
    cond = generator.condition(labels, groups, seeds)
    alphas = scheduler.alphas_cumprod.to(device)
    batch = len(seeds)
    guided = scorer is not None and guidance.scale > 0
    before = torch.full((batch,), float("nan"), device=device)
    norm_sum = torch.zeros(batch, device=device)
    nonfinite = torch.zeros(batch, dtype=torch.long, device=device)
    last_grad: torch.Tensor | None = None

    applied = 0
    for i, t in enumerate(scheduler.timesteps):
        abar = alphas[t]
        grad = None
        if guided and i % guidance.every == 0:
            with torch.enable_grad():
                z_in = z.detach().requires_grad_(True)
                # Through the UNet is the official form; without it the gradient flows through
                # x0_hat = (z_t - sqrt(1 - abar) eps) / sqrt(abar) only (cheaper, same direction
                # up to the UNet's Jacobian).
                with (contextlib.nullcontext() if guidance.through_unet else torch.no_grad()), \
                        _autocast(device, autocast_dtype):
                    eps = generator.predict_noise(z_in if guidance.through_unet else z, t, cond,
                                                  cfg_scale).float()
                x0 = (z_in - (1 - abar).sqrt() * eps) / abar.sqrt()
                score = scorer(generator.decode(x0), labels, criterion_ids)
                grad = torch.autograd.grad(score.sum(), z_in)[0].detach()
            eps = eps.detach()
            if torch.isnan(before).all():
                before = score.detach().float()
            bad = ~torch.isfinite(grad).flatten(1).all(dim=1)
            nonfinite += bad.long()
            grad[bad] = 0.0
            last_grad = grad
        else:
            with torch.no_grad(), _autocast(device, autocast_dtype):
                eps = generator.predict_noise(z, t, cond, cfg_scale).float()
            if guided and guidance.reuse:
                grad = last_grad
        if grad is not None:
            if guidance.mode == "normalized":
                # Official release: g * ||z_t|| / (||g|| + 1e-8) * scale, added to z_t.
                step = guidance.scale * grad * _per_sample_norm(z) / (_per_sample_norm(grad) + 1e-8)
                z = z + step
            else:
                # eps_fg = eps - w sqrt(1 - abar_t) grad c  (gradient ascent on c)
                step = guidance.scale * (1 - abar).sqrt() * grad
                eps = eps - step
            norm_sum += _per_sample_norm(step).flatten()
            applied += 1
        with torch.no_grad():
            step_gens = sample_generators(seeds, stream=1000 + i) if eta > 0 else None
            z = scheduler.step(eps, t, z, eta=eta, generator=step_gens).prev_sample
    with torch.no_grad():
        after = (scorer(generator.decode(z), labels, criterion_ids).float()
                 if scorer is not None else torch.full((batch,), float("nan"), device=device))
    return Samples(z.detach(), before.cpu(), after.cpu(), (norm_sum / max(applied, 1)).cpu(),
                   nonfinite.cpu())
