"""The feedback-guided DDIM loop (docs/method.md §1-2), written once for every generator.

Per step: predict noise with classifier-free guidance; every ``every`` steps take the gradient
of the criterion on the decoded predicted x0 with respect to ``z_t`` and apply it, either in the
official release's normalised form (rescaled to the latent's norm, times the scale, added to
``z_t``) or as a shift of the noise prediction; then the DDIM step.

The criterion is a sum of per-sample terms, so its gradient may be taken in micro-batches
(``Guidance.micro_batch``) with the same result: the memory of a guided step is then set by the
micro-batch, not by the batch. The loop keeps everything on the device: no value is read back
to the host between the first and the last step.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ray_lt.generate.base import Conditioning, Generator, sample_generators, slice_condition


@dataclass(frozen=True)
class Guidance:
    """Feedback-guidance settings; ``scale = 0`` samples without feedback."""

    scale: float
    every: int = 1
    mode: Literal["normalized", "eps"] = "normalized"
    reuse: bool = False
    through_unet: bool = False
    micro_batch: int | None = None  # samples per criterion-gradient pass; None: whole batch

    @classmethod
    def of(cls, synthesis: Any, scale: float | None = None) -> Guidance:
        """The guidance a ``synthesis`` config section sets (at ``scale`` when given)."""
        s = synthesis
        return cls(s.guidance_scale if scale is None else scale, s.guidance_every,
                   s.guidance_mode, s.reuse_gradient, s.through_unet, s.guidance_micro_batch)


@dataclass
class Samples:
    """A batch of finished samples and what guidance did to each."""

    latents: torch.Tensor
    criterion_before: torch.Tensor
    criterion_after: torch.Tensor
    guidance_norm: torch.Tensor
    nonfinite_steps: torch.Tensor
    record: dict[str, list] = field(default_factory=dict)  # per-sample values for its row


def _per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def _slices(n: int, size: int | None) -> list[slice]:
    size = n if size is None else max(1, int(size))
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _criterion_gradient(generator: Generator, scorer: nn.Module, z: torch.Tensor,
                        t: torch.Tensor, abar: float, cond: Conditioning,
                        labels: torch.Tensor, groups: torch.Tensor,
                        criterion_ids: torch.Tensor, cfg_scale: float,
                        guidance: Guidance, autocast_dtype: torch.dtype | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The noise prediction at ``z``, d c / d z_t and c itself, one micro-batch at a time."""
    device = z.device
    eps_full = None
    if not guidance.through_unet:
        # Without the UNet in the graph the gradient flows through
        # x0_hat = (z_t - sqrt(1 - abar) eps) / sqrt(abar) only (cheaper; the official form
        # goes through the UNet, same direction up to its Jacobian).
        with torch.no_grad(), _autocast(device, autocast_dtype):
            eps_full = generator.predict_noise(z, t, cond, cfg_scale).float()
    eps_parts, grads, scores = [], [], []
    for part in _slices(len(z), guidance.micro_batch):
        with torch.enable_grad():
            z_in = z[part].detach().requires_grad_(True)
            if eps_full is None:
                with _autocast(device, autocast_dtype):
                    eps = generator.predict_noise(z_in, t, slice_condition(cond, part),
                                                  cfg_scale).float()
                eps_parts.append(eps.detach())
            else:
                eps = eps_full[part]
            x0 = (z_in - (1 - abar) ** 0.5 * eps) / abar ** 0.5
            with _autocast(device, autocast_dtype):
                score = scorer(generator.decode(x0), labels[part], criterion_ids[part],
                               groups[part]).float()
            grads.append(torch.autograd.grad(score.sum(), z_in)[0].detach())
        scores.append(score.detach().float())
    eps = eps_full if eps_full is not None else torch.cat(eps_parts)
    return eps, torch.cat(grads), torch.cat(scores)


def sampling_strength(synthesis: Any) -> float:
    """The img2img strength a ``synthesis`` config section samples at (1: from noise)."""
    return float(synthesis.strength) if synthesis.init == "real" else 1.0


def first_step(num_steps: int, strength: float) -> int:
    """The index of the first of ``num_steps`` DDIM steps that img2img at ``strength`` runs
    (diffusers' img2img rule): the last ``int(num_steps * strength)`` steps are denoised."""
    run = min(int(num_steps * strength), num_steps)
    if run < 1:
        raise ValueError(f"strength {strength} x {num_steps} steps leaves no step to run")
    return num_steps - run


def guided_sample(generator: Generator, scorer: nn.Module | None, labels: torch.Tensor,
                  groups: torch.Tensor, criterion_ids: torch.Tensor, seeds: list[int],
                  num_steps: int, cfg_scale: float, guidance: Guidance, eta: float = 0.0,
                  autocast_dtype: torch.dtype | None = None, strength: float = 1.0) -> Samples:
    """Sample one batch; sample i depends only on its seed, label, group and criterion.

    ``scorer(images, labels, criterion_ids, groups) -> (B,)`` is the criterion c to
    increase. Non-finite gradients are zeroed per sample and counted in ``nonfinite_steps``,
    never applied.

    ``strength < 1`` is img2img: the conditioning's ``init_latents`` are noised with the
    sample's own noise to the timestep of ``first_step`` and denoised from there, guided the
    same way. ``strength == 1`` starts from pure noise, so it is exactly the sample drawn
    without a source (diffusers' img2img keeps sqrt(abar_T) of the source even at 1).
    """
    device = generator.device
    # The conditioning reads labels on the host: it gets them before they move.
    cond = generator.condition(labels.cpu(), groups.cpu(), seeds)
    labels, groups = labels.to(device), groups.to(device)
    criterion_ids = criterion_ids.to(device)
    scheduler = copy.deepcopy(generator.scheduler)
    scheduler.set_timesteps(num_steps)
    noise_gens = sample_generators(seeds, stream=0)
    shape = generator.latent_shape()
    z = randn_tensor((len(seeds), *shape), generator=noise_gens, device=device)
    start = first_step(num_steps, strength)
    if start == 0:
        z = z * scheduler.init_noise_sigma
    else:
        if "init_latents" not in cond.inputs:
            raise ValueError(f"strength {strength} < 1 needs the generator's init_latents "
                             f"(built with img2img sources)")
        init = cond.inputs["init_latents"].to(device, torch.float32)
        z = scheduler.add_noise(init, z, scheduler.timesteps[start:start + 1])
    # Nothing in the step loop waits on the device: the timesteps go to it once, here; the
    # scheduler and abar_t take the host's copy (Python numbers).
    timesteps = scheduler.timesteps.tolist()
    device_timesteps = scheduler.timesteps.to(device)
    alphas = scheduler.alphas_cumprod.tolist()
    batch = len(seeds)
    guided = scorer is not None and guidance.scale > 0
    before = torch.full((batch,), float("nan"), device=device)
    norm_sum = torch.zeros(batch, device=device)
    nonfinite = torch.zeros(batch, dtype=torch.long, device=device)
    last_grad: torch.Tensor | None = None

    applied = 0
    first = True
    for i in range(start, len(timesteps)):
        t = timesteps[i]
        abar, t_device = alphas[t], device_timesteps[i]
        grad = None
        if guided and (i - start) % guidance.every == 0:
            eps, grad, score = _criterion_gradient(generator, scorer, z, t_device, abar, cond,
                                                   labels,
                                                   groups, criterion_ids, cfg_scale, guidance,
                                                   autocast_dtype)
            if first:
                before, first = score, False
            bad = ~torch.isfinite(grad).flatten(1).all(dim=1)
            nonfinite += bad.long()
            grad = torch.where(bad.view(-1, *[1] * (grad.dim() - 1)), 0.0, grad)
            last_grad = grad
        else:
            with torch.no_grad(), _autocast(device, autocast_dtype):
                eps = generator.predict_noise(z, t_device, cond, cfg_scale).float()
            if guided and guidance.reuse:
                grad = last_grad
        if grad is not None:
            if guidance.mode == "normalized":
                # Official release: g * ||z_t|| / (||g|| + 1e-8) * scale, added to z_t.
                step = guidance.scale * grad * _per_sample_norm(z) / (_per_sample_norm(grad) + 1e-8)
                z = z + step
            else:
                # eps_fg = eps - w sqrt(1 - abar_t) grad c  (gradient ascent on c)
                step = guidance.scale * (1 - abar) ** 0.5 * grad
                eps = eps - step
            norm_sum += _per_sample_norm(step).flatten()
            applied += 1
        with torch.no_grad():
            step_gens = sample_generators(seeds, stream=1000 + i) if eta > 0 else None
            z = scheduler.step(eps, t, z, eta=eta, generator=step_gens).prev_sample
    with torch.no_grad():
        after = (scorer(generator.decode(z), labels, criterion_ids, groups).float()
                 if scorer is not None else torch.full((batch,), float("nan"), device=device))
    return Samples(z.detach(), before.cpu(), after.cpu(), (norm_sum / max(applied, 1)).cpu(),
                   nonfinite.cpu(), dict(cond.record))
