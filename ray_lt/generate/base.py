"""The small interface every generator implements, so the guided DDIM loop is written once.

A generator owns a diffusers ``DDIMScheduler`` and works on a latent ``z``: pixels in [-1, 1]
(``pixel``), a VAE latent (``unclip``, ``sd``, ``sdxl``) or a feature vector (``feature``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ray_lt.errors import StageError

if TYPE_CHECKING:  # diffusers is imported by the generators that build one
    from diffusers import DDIMScheduler

SPEC_FILE = "generator.json"
# synthesis.precision -> the autocast / weights dtype on a GPU (None: float32)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Conditioning:
    """Everything a generator needs to denoise one batch: labels, groups and its own inputs
    (prompt embeddings, image embeddings, ``init_latents`` for img2img, ...), already on the
    generator's device; ``record`` holds per-sample values that go to each sample's stored row
    (its prompt, its img2img source row)."""

    labels: torch.Tensor
    groups: torch.Tensor
    inputs: dict[str, Any]
    record: dict[str, list] = field(default_factory=dict)


def slice_condition(cond: Conditioning, part: slice) -> Conditioning:
    """The conditioning of samples ``part`` of a batch: every tensor or list input with one
    entry per sample is cut, anything shared by the batch is kept."""
    n = len(cond.labels)

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
            return value[part]
        if isinstance(value, list) and len(value) == n:
            return value[part]
        return value

    return Conditioning(cond.labels[part], cond.groups[part],
                        {key: cut(value) for key, value in cond.inputs.items()},
                        {key: value[part] for key, value in cond.record.items()})


def sample_generators(seeds: list[int], stream: int = 0) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per sample, so a sample depends on its seed only, never on
    the batch it was drawn in. ``stream`` separates independent uses of one seed."""
    return [torch.Generator().manual_seed((int(s) * 1_000_003 + stream) % (2**63)) for s in seeds]


def read_spec(folder: Path, kind: str) -> dict[str, Any]:
    """The ``generator.json`` of a trained generator of ``kind``; a clear error when absent."""
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        raise StageError(f"no trained {kind} generator in {folder}: run "
                         f"`ray-lt train-generator` with the same --out first")
    spec = json.loads(path.read_text())
    if spec.get("kind") != kind:
        raise StageError(f"{path} holds a {spec.get('kind')!r} generator, not {kind!r}: use "
                         f"another --out or the matching generator.kind")
    return spec


class Generator(Protocol):
    """What the feedback-guided sampler needs from a diffusion model."""

    scheduler: DDIMScheduler
    device: torch.device

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent, e.g. (C, H, W) or (D,)."""

    def condition(self, labels: torch.Tensor, groups: torch.Tensor, seeds: list[int]
                  ) -> Conditioning:
        """Conditioning inputs for a batch of (label, group); random choices draw from the
        samples' own streams of ``sample_generators`` (1: reference images and embedding
        dropout, 2: prompt templates, 3: img2img sources). For img2img the inputs hold
        ``init_latents`` (B, *latent_shape), the clean latents of the source images."""

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      cfg_scale: float) -> torch.Tensor:
        """Noise prediction with classifier-free guidance:
        ``eps_uncond + cfg_scale * (eps_cond - eps_uncond)`` (docs/method.md §1)."""

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """Latent -> classifier input, differentiable: images in [0, 1] (B, C, H, W) at the
        data set's image size (the VAE for latent models, a rescale for pixel models);
        feature generators return feature vectors."""

    def decode_output(self, z0: torch.Tensor, upcast: bool = False) -> torch.Tensor:
        """Latent -> what synthesis stores: images in [0, 1] (B, C, H, W) at the generator's
        output size, or feature vectors. ``upcast`` decodes in float32 whatever the weights'
        dtype (a sample redrawn after an fp16 overflow)."""
