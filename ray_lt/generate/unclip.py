"""Stable Diffusion 2.1 unCLIP as a ``Generator``: text prompt + CLIP image embedding of a real
training image of the same class or group, with embedding dropout (docs/method.md §3).

Built from diffusers / transformers component objects, loaded offline from a local folder laid
out like ``stabilityai/stable-diffusion-2-1-unclip`` or from the local Hugging Face cache
(``ray_lt.generate.pretrained``); ``ray_lt.testing.tiny_unclip_components`` builds tiny random
ones for tests and benchmarks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableUnCLIPImg2ImgPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
    StableUnCLIPImageNormalizer,
)
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ray_lt.errors import ConfigError, DataError
from ray_lt.generate.base import sample_generators
from ray_lt.generate.latent import LatentDiffusion
from ray_lt.generate.pretrained import LAYOUTS, load_parts

if TYPE_CHECKING:
    from ray_lt.generate.references import References

COMPONENTS = LAYOUTS["unclip"].components
# Reference images are embedded in fixed chunks of their index, so an embedding never depends on
# which batch first asked for it (a sample depends on its seed only).
EMBED_CHUNK = 32


class UnCLIPGenerator(LatentDiffusion):
    """SD 2.1 unCLIP behind the ``Generator`` protocol (``ray_lt.generate.base``), on the shared
    latent half (``ray_lt.generate.latent``).

    The image conditions are ``references`` (CLIP embeddings stored by
    ``ray_lt.generate.references``, what synthesis uses) or, for small in-memory use,
    ``reference_images`` ``{"class": {label: [image, ...]}, "group": {group: [image, ...]}}``
    with uint8 (H, W, C) real training images, embedded on first use; a group without
    references falls back to its class.
    """

    kind = "unclip"

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, tokenizer: CLIPTokenizer,
                 text_encoder: CLIPTextModel, image_encoder: CLIPVisionModelWithProjection,
                 feature_extractor: CLIPImageProcessor,
                 image_normalizer: StableUnCLIPImageNormalizer,
                 image_noising_scheduler: DDPMScheduler, scheduler: DDIMScheduler, *,
                 reference_images: dict[str, dict[int, list[np.ndarray]]] | None = None,
                 references: References | None = None, embedding_dropout: float,
                 noise_level: int, **kwargs: Any):
        self.embedding_dropout = float(embedding_dropout)
        self.noise_level = int(noise_level)
        n_levels = image_noising_scheduler.config.num_train_timesteps
        if not 0 <= self.noise_level < n_levels:
            raise ConfigError(f"generator.noise_level: {self.noise_level} is outside "
                              f"[0, {n_levels})")
        if not 0.0 <= self.embedding_dropout <= 1.0:
            raise ConfigError(f"generator.embedding_dropout: {self.embedding_dropout} is not a "
                              "probability in [0, 1]")
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.image_encoder, self.feature_extractor = image_encoder, feature_extractor
        super().__init__(unet, vae, scheduler, encoders=[text_encoder, image_encoder], **kwargs)
        self.image_normalizer = image_normalizer.to(self.device, torch.float32)
        self.image_normalizer.requires_grad_(False)
        self.image_noising_scheduler = image_noising_scheduler
        # diffusers' own pipeline over the same modules (no copies), for its embedding noising.
        self._pipeline = StableUnCLIPImg2ImgPipeline(
            feature_extractor=feature_extractor, image_encoder=image_encoder,
            image_normalizer=self.image_normalizer,
            image_noising_scheduler=image_noising_scheduler, tokenizer=tokenizer,
            text_encoder=text_encoder, unet=unet, scheduler=scheduler, vae=vae)

        self._images: list[np.ndarray] = []
        self._image_cache: dict[int, torch.Tensor] = {}
        if (reference_images is None) == (references is None):
            raise ValueError("give the reference images or the stored references, not both")
        if references is not None:
            self._class_refs, self._group_refs = references.by_class, references.by_group
            self._image_cache.update(enumerate(references.embeds.to(self.device)))
        else:
            self._class_refs = self._index_references(reference_images.get("class", {}))
            self._group_refs = self._index_references(reference_images.get("group", {}))

    def _index_references(self, by_key: dict[int, list[np.ndarray]]) -> dict[int, list[int]]:
        """Positions of each key's images in ``self._images``; an array listed under both its
        class and its group is stored (and embedded) once."""
        seen = {id(image): i for i, image in enumerate(self._images)}
        out: dict[int, list[int]] = {}
        for key, images in by_key.items():
            out[int(key)] = []
            for image in images:
                if id(image) not in seen:
                    seen[id(image)] = len(self._images)
                    self._images.append(image)
                out[int(key)].append(seen[id(image)])
        return out

    def _extra_inputs(self, labels: list[int], groups: list[int], seeds: list[int]
                      ) -> dict[str, Any]:
        """Noised image embeddings of reference images. Per sample, its stream-1 generator
        draws, in this order: the reference image, the dropout coin, the embedding noise."""
        dim = self.image_normalizer.config.embedding_dim
        refs, dropped, noise = [], [], []
        for label, group, gen in zip(labels, groups, sample_generators(seeds, stream=1),
                                     strict=True):
            pool = self._group_refs.get(group) or self._class_refs.get(label)
            if not pool:
                raise DataError(f"unclip reference images: class {label} "
                                f"({self.class_names[label]!r}) has no real training image")
            refs.append(pool[int(torch.randint(len(pool), (1,), generator=gen))])
            dropped.append(bool(torch.rand((), generator=gen) < self.embedding_dropout))
            noise.append(torch.randn(dim, generator=gen))
        dropped_t = torch.tensor(dropped, device=self.device)
        embeds = self._image_embeds(refs) * (~dropped_t).unsqueeze(1)
        image_embeds = self.noise_image_embeds(embeds, torch.stack(noise).to(self.device))
        return {
            "image_embeds": image_embeds.to(self.dtype),
            # The diffusers pipeline's unconditional branch: the whole class-label vector zero.
            "uncond_image_embeds": torch.zeros_like(image_embeds, dtype=self.dtype),
            "reference": torch.tensor(refs, device=self.device),
            "dropped": dropped_t,
        }

    def _encode_text(self, prompt: str) -> dict[str, torch.Tensor]:
        """Text encoder hidden states (L, D) of one prompt."""
        ids = self._token_ids(self.tokenizer, prompt).to(self.device)
        return {"hidden": self.text_encoder(ids)[0][0].to(self.dtype)}

    def unet_kwargs(self, x: dict[str, Any], branch: str) -> dict[str, Any]:
        key = "image_embeds" if branch == "cond" else "uncond_image_embeds"
        return {**super().unet_kwargs(x, branch), "class_labels": x[key]}

    def noise_image_embeds(self, embeds: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """unCLIP's noise augmentation, diffusers' ``noise_image_embeddings``: normalise, noise
        to ``noise_level``, unnormalise, then append the noise level's sinusoidal embedding:
        (B, E) -> (B, 2E), float32."""
        return self._pipeline.noise_image_embeddings(embeds.float(), self.noise_level,
                                                     noise=noise.float())

    @torch.no_grad()
    def _image_embeds(self, refs: list[int]) -> torch.Tensor:
        """CLIP image embeddings (B, E) float32 of reference images, cached per image."""
        for chunk in sorted({i // EMBED_CHUNK for i in refs if i not in self._image_cache}):
            idx = range(chunk * EMBED_CHUNK, min((chunk + 1) * EMBED_CHUNK, len(self._images)))
            pixels = self.feature_extractor(images=[rgb(self._images[i]) for i in idx],
                                            return_tensors="pt").pixel_values
            out = self.image_encoder(pixels.to(self.device, self.dtype)).image_embeds.float()
            self._image_cache.update(zip(idx, out, strict=True))
        return torch.stack([self._image_cache[i] for i in refs])


def rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) for CLIP's image processor, from (H, W), (H, W, 1) or (H, W, 3)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def load_components(path: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Every unCLIP component from a folder laid out like the Hugging Face repo
    ``stabilityai/stable-diffusion-2-1-unclip`` (or that repo id in the local cache), offline,
    through diffusers' own pipeline loader."""
    parts = load_parts(path, "unclip", dtype)
    return {name: parts[name] for name in COMPONENTS}


def save_components(components: dict[str, Any], path: str | Path) -> None:
    """Write components in the Hugging Face layout (with ``model_index.json``), so that
    ``load_components(path)`` and diffusers' own pipeline load them offline."""
    StableUnCLIPImg2ImgPipeline(**components).save_pretrained(path)
