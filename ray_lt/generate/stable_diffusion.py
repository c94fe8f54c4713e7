"""Stable Diffusion text-to-image as a ``Generator``: ``sd`` (1.x / 2.x, base or 768
v-prediction; LTG guides SD 1.4) and ``sdxl`` (two text encoders, pooled text embeddings and the
size / crop time ids), on the shared latent half (``ray_lt.generate.latent``).

Both load offline from a folder in the diffusers layout of ``StableDiffusionPipeline`` /
``StableDiffusionXLPipeline``, or a model id already in the local Hugging Face cache.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ray_lt.errors import ConfigError
from ray_lt.generate.latent import LatentDiffusion


class StableDiffusionGenerator(LatentDiffusion):
    """SD 1.x / 2.x: the prompt's CLIP text hidden states condition the UNet; the negative
    prompt's are the unconditional branch of classifier-free guidance.

    Example (a local folder, nothing downloaded)::

        generator = StableDiffusionGenerator.from_pretrained(
            "/models/stable-diffusion-v1-5", class_names=["goldfish", "tench"],
            prompts=["a photo of a {class_name}"], negative_prompt="blurry")
    """

    kind = "sd"

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, tokenizer: CLIPTokenizer,
                 text_encoder: CLIPTextModel, scheduler: DDIMScheduler, **kwargs: Any):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        super().__init__(unet, vae, scheduler, encoders=[text_encoder], **kwargs)

    def _encode_text(self, prompt: str) -> dict[str, torch.Tensor]:
        """The text encoder's last hidden states (L, D), as diffusers' pipeline conditions."""
        ids = self._token_ids(self.tokenizer, prompt).to(self.device)
        return {"hidden": self.text_encoder(ids)[0][0].to(self.dtype)}


class StableDiffusionXLGenerator(LatentDiffusion):
    """SDXL: the penultimate hidden states of both text encoders, concatenated, condition the
    UNet, with the second encoder's pooled embedding and the time ids (original size, crop
    corner, target size) as its added conditions. An empty negative prompt is a zero embedding
    when the pipeline says so (``force_zeros_for_empty_prompt``), as in diffusers."""

    kind = "sdxl"

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, tokenizer: CLIPTokenizer,
                 text_encoder: CLIPTextModel, tokenizer_2: CLIPTokenizer,
                 text_encoder_2: CLIPTextModelWithProjection, scheduler: DDIMScheduler, *,
                 force_zeros_for_empty_prompt: bool = True, **kwargs: Any):
        self.tokenizers = (tokenizer, tokenizer_2)
        self.text_encoders = (text_encoder, text_encoder_2)
        self.force_zeros = bool(force_zeros_for_empty_prompt)
        super().__init__(unet, vae, scheduler, encoders=[text_encoder, text_encoder_2], **kwargs)
        wanted = unet.config.projection_class_embeddings_input_dim
        have = 6 * unet.config.addition_time_embed_dim + text_encoder_2.config.projection_dim
        if unet.config.addition_embed_type != "text_time" or wanted != have:
            raise ConfigError(f"generator.pretrained: the UNet takes added conditions of "
                              f"{wanted} values, but 6 time ids x "
                              f"{unet.config.addition_time_embed_dim} + the pooled text "
                              f"embedding's {text_encoder_2.config.projection_dim} make {have}: "
                              f"not an SDXL base UNet")

    @classmethod
    def _pipeline_options(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {"force_zeros_for_empty_prompt": config.get("force_zeros_for_empty_prompt", True)}

    def _encode_text(self, prompt: str) -> dict[str, torch.Tensor]:
        """(L, D1 + D2) penultimate hidden states of both encoders and (P,) the pooled
        projection of the second; zeros for an empty prompt with ``force_zeros``."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = self._token_ids(tokenizer, prompt).to(self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2][0])
            pooled = out[0][0]  # the last encoder's: CLIPTextModelWithProjection.text_embeds
        text = {"hidden": torch.cat(hidden, dim=-1).to(self.dtype), "pooled": pooled.to(self.dtype)}
        if not prompt and self.force_zeros:
            text = {key: torch.zeros_like(value) for key, value in text.items()}
        return text

    def _text_inputs(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        inputs = super()._text_inputs(prompts)
        pooled = torch.stack([self._text_embed(p)["pooled"] for p in prompts])
        ids = torch.tensor([self.height, self.width, 0, 0, self.height, self.width],
                           device=self.device, dtype=self.dtype)
        return {**inputs, "pooled": pooled,
                "uncond_pooled": self._text_embed(self.prompts.negative)["pooled"].expand_as(
                    pooled),
                "time_ids": ids.expand(len(prompts), -1)}

    def unet_kwargs(self, x: dict[str, Any], branch: str) -> dict[str, Any]:
        pooled = x["pooled" if branch == "cond" else "uncond_pooled"]
        return {**super().unet_kwargs(x, branch),
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": x["time_ids"]}}
