"""What every pretrained Stable Diffusion shares behind the ``Generator`` protocol: prompts drawn
per sample, classifier-free guidance over one UNet call, epsilon from a v-prediction UNet, the
guidance decoders (full VAE, tiny decoder, latent resize), the final VAE decode and, for
img2img, the VAE encode of a sample's source image.

A kind (``unclip``, ``sd``, ``sdxl``) adds its text (and image) conditioning: ``_text_inputs``
encodes prompts and ``unet_kwargs`` hands them to its UNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, UNet2DConditionModel
from torch import nn

from ray_lt.errors import ConfigError
from ray_lt.generate.base import Conditioning
from ray_lt.generate.pretrained import LAYOUTS, load_parts
from ray_lt.generate.prompts import Prompts
from ray_lt.generate.sources import SourceLatents, Sources

GUIDANCE_DECODERS = ("vae", "tiny", "latent_resize")
DEFAULT_PROMPTS = ("a photo of a {class_name}",)


def _cat(uncond: Any, cond: Any) -> Any:
    """[uncond, cond] along the batch, through nested dicts of tensors."""
    if isinstance(cond, dict):
        return {key: _cat(uncond[key], cond[key]) for key in cond}
    return torch.cat([uncond, cond])


class LatentDiffusion:
    """The shared half of a pretrained latent generator (see the module docstring).

    ``predict_noise`` always returns epsilon (a v-prediction UNet is converted), and
    ``scheduler`` is the DDIM scheduler configured for epsilon accordingly.
    """

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler: DDIMScheduler,
                 *, encoders: list[nn.Module], class_names: list[str],
                 context_names: list[str] | None = None,
                 prompts: list[str] | tuple[str, ...] = DEFAULT_PROMPTS,
                 prompts_by_class: dict[int, list[str]] | None = None,
                 negative_prompt: str = "", image_size: int = 256, height: int | None = None,
                 width: int | None = None, normalize: str = "minmax",
                 guidance_decoder: str = "vae", tiny_decoder: AutoencoderTiny | None = None,
                 decoder_checkpointing: bool = False, sources: Sources | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.class_names = list(class_names)
        self.context_names = list(context_names or [])
        self.prompts = Prompts(list(prompts), self.class_names, self.context_names,
                               prompts_by_class, negative_prompt)
        self.image_size = int(image_size)
        self.normalize = normalize
        self.guidance_decoder = guidance_decoder
        self._validate(scheduler)
        if guidance_decoder == "tiny" and tiny_decoder is None:
            raise ConfigError("synthesis.tiny_decoder: guidance_decoder 'tiny' needs an "
                              "AutoencoderTiny")
        self.unet, self.vae, self.tiny_decoder = unet, vae, tiny_decoder
        for model in [unet, vae, *encoders] + ([tiny_decoder] if tiny_decoder is not None else []):
            model.to(self.device).eval().requires_grad_(False)
            if model.dtype != dtype:
                model.to(dtype=dtype)
        if self.device.type == "cuda":  # NHWC convolutions: the tensor cores' own layout
            for model in (unet, vae, tiny_decoder):
                if model is not None:
                    model.to(memory_format=torch.channels_last)
        if decoder_checkpointing:
            (tiny_decoder if guidance_decoder == "tiny" else vae).enable_gradient_checkpointing()
        self._guidance_decode = self._guidance_decode_eager
        # The UNet's parameterisation; the sampler sees epsilon only.
        self.prediction_type = scheduler.config.prediction_type
        self.scheduler = DDIMScheduler.from_config(scheduler.config, prediction_type="epsilon")
        self._alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)

        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.height = height or unet.config.sample_size * self.vae_scale
        self.width = width or unet.config.sample_size * self.vae_scale
        if self.height % self.vae_scale or self.width % self.vae_scale:
            raise ConfigError(f"generator.height/width: {self.height}x{self.width} is not a "
                              f"multiple of the VAE's downscaling factor {self.vae_scale}")
        self._text_cache: dict[str, dict[str, torch.Tensor]] = {}
        self.sources = (SourceLatents(sources, self.encode, self.height, self.width, 3)
                        if sources is not None else None)

    kind = ""  # the generator kind, whose folder layout ``from_pretrained`` reads

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, **kwargs: Any) -> LatentDiffusion:
        """Every component of the kind's folder (``ray_lt.generate.pretrained``), offline;
        ``kwargs`` go to ``__init__`` (class_names, prompts, ...)."""
        parts = load_parts(path, cls.kind, dtype)
        components = {name: parts[name] for name in LAYOUTS[cls.kind].components}
        return cls(**components, **cls._pipeline_options(parts["pipeline_config"]),
                   device=device, dtype=dtype, **kwargs)

    @classmethod
    def _pipeline_options(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments read from the pipeline's own config (model_index.json)."""
        return {}

    def _validate(self, scheduler: DDIMScheduler) -> None:
        if self.guidance_decoder not in GUIDANCE_DECODERS:
            raise ConfigError(f"synthesis.guidance_decoder: {self.guidance_decoder!r} is not one "
                              f"of {list(GUIDANCE_DECODERS)}")
        if self.normalize not in ("minmax", "clamp"):
            raise ConfigError(f"generator.normalize: {self.normalize!r} is not 'minmax' or 'clamp'")
        if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"generator.pretrained: scheduler prediction_type "
                              f"{scheduler.config.prediction_type!r} is not supported "
                              "(epsilon or v_prediction)")

    def latent_shape(self) -> tuple[int, ...]:
        """(VAE latent channels, height / vae scale, width / vae scale)."""
        return (self.vae.config.latent_channels, self.height // self.vae_scale,
                self.width // self.vae_scale)

    # -- conditioning ---------------------------------------------------------------------

    def condition(self, labels: torch.Tensor, groups: torch.Tensor, seeds: list[int]
                  ) -> Conditioning:
        """Prompts (drawn by each seed), their text embeddings and the negative prompt's, the
        kind's own inputs (``_extra_inputs``) and, for img2img, the source latents; the
        prompt (and source row) of each sample go to its stored row."""
        labels_l, groups_l = [int(v) for v in labels], [int(v) for v in groups]
        prompts = self.prompts.draw(labels_l, groups_l, seeds)
        inputs = self._text_inputs(prompts)
        inputs["prompts"] = prompts
        inputs.update(self._extra_inputs(labels_l, groups_l, seeds))
        record: dict[str, list] = {"prompt": prompts}
        if self.sources is not None:
            latents, rows = self.sources(labels_l, groups_l, seeds)
            inputs["init_latents"] = latents
            record["source_row"] = rows
        return Conditioning(labels=torch.as_tensor(labels_l, device=self.device),
                            groups=torch.as_tensor(groups_l, device=self.device), inputs=inputs,
                            record=record)

    def _extra_inputs(self, labels: list[int], groups: list[int], seeds: list[int]
                      ) -> dict[str, Any]:
        return {}

    def _text_inputs(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``text_embeds`` of the prompts and ``uncond_text_embeds`` of the negative prompt,
        (B, L, D) from the text encoder's last hidden states."""
        text = torch.stack([self._text_embed(p)["hidden"] for p in prompts])
        uncond = self._text_embed(self.prompts.negative)["hidden"].expand_as(text)
        return {"text_embeds": text, "uncond_text_embeds": uncond}

    @torch.no_grad()
    def _text_embed(self, prompt: str) -> dict[str, torch.Tensor]:
        """One prompt's text-encoder outputs, cached per prompt string."""
        if prompt not in self._text_cache:
            self._text_cache[prompt] = self._encode_text(prompt)
        return self._text_cache[prompt]

    def _encode_text(self, prompt: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def _token_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
        return tokenizer(prompt, padding="max_length", truncation=True, return_tensors="pt",
                         max_length=tokenizer.model_max_length).input_ids

    def unet_kwargs(self, x: dict[str, Any], branch: str) -> dict[str, Any]:
        """The UNet's conditioning arguments of the ``"cond"`` or ``"uncond"`` branch."""
        key = "text_embeds" if branch == "cond" else "uncond_text_embeds"
        return {"encoder_hidden_states": x[key]}

    # -- noise prediction -----------------------------------------------------------------

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor | int, cond: Conditioning,
                      cfg_scale: float) -> torch.Tensor:
        """Epsilon with classifier-free guidance, ``eps_u + s (eps_c - eps_u)``
        (docs/method.md §1), from one UNet call on [uncond, cond] (the conditional half only
        when s == 1); float32."""
        x = cond.inputs
        z = z_t.to(self.device, self.dtype)
        t = torch.as_tensor(t, device=self.device)
        if cfg_scale == 1:
            out = self.unet(z, t, **self.unet_kwargs(x, "cond")).sample.float()
        else:
            both = _cat(self.unet_kwargs(x, "uncond"), self.unet_kwargs(x, "cond"))
            out = self.unet(torch.cat([z, z]), torch.cat([t, t]) if t.ndim else t,
                            **both).sample.float()
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + cfg_scale * (out_cond - out_uncond)
        if self.prediction_type == "v_prediction":
            # v = sqrt(abar) eps - sqrt(1 - abar) z0  =>  eps = sqrt(abar) v + sqrt(1 - abar) z_t;
            # linear in v, so guiding v or eps is the same.
            # index_select, not t.item(): no wait on the device inside the step loop
            abar = self._alphas_cumprod.index_select(0, t.long().reshape(-1))
            abar = abar.reshape(-1, *[1] * (out.ndim - 1))
            out = abar.sqrt() * out + (1 - abar).sqrt() * z_t.to(self.device, torch.float32)
        return out

    def compile(self, mode: str | None = None, backend: str = "inductor") -> None:
        """``torch.compile`` the UNet and the guidance decode (with its backward)."""
        self.unet = torch.compile(self.unet, mode=mode, backend=backend)
        self._guidance_decode = torch.compile(self._guidance_decode_eager, mode=mode,
                                              backend=backend)

    # -- encoding and decoding ------------------------------------------------------------

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) at (height, width) -> its latent (C, h, w) in the UNet's scale: the
        mean of the VAE's posterior (deterministic), float32."""
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
        x = (x / 127.5 - 1).to(self.device, self.dtype)
        latent = self.vae.encode(x).latent_dist.mode().float()
        return latent[0] * self.vae.config.scaling_factor

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """The classifier's view of a latent on the guidance path, differentiable w.r.t. ``z0``:
        (B, 3, image_size, image_size) in [0, 1], per-sample min-max normalised (official
        release) or clamped. Decoded by ``guidance_decoder``: the full VAE then a bilinear
        resize; the tiny decoder; or the full VAE on the latent resized to
        ``image_size / vae_scale``, so that it decodes at about the classifier's size."""
        return self._guidance_decode(z0)

    def _guidance_decode_eager(self, z0: torch.Tensor) -> torch.Tensor:
        if self.guidance_decoder == "tiny":
            tiny = self.tiny_decoder
            z = (z0.float() / tiny.config.scaling_factor).to(self.dtype)
            return self._to_classifier(tiny.decode(z).sample.float(), self.normalize, False)
        if self.guidance_decoder == "latent_resize":
            side = -(-self.image_size // self.vae_scale)
            if z0.shape[-2:] != (side, side):
                z0 = F.interpolate(z0.float(), size=(side, side), mode="bilinear",
                                   align_corners=False, antialias=True)
        return self._decode(z0, self.normalize, antialias=False)

    @torch.no_grad()
    def decode_output(self, z0: torch.Tensor, upcast: bool = False) -> torch.Tensor:
        """Final images to save: the full VAE, clamped [0, 1] at image_size (antialiased).
        ``upcast`` decodes in float32 whatever the weights' dtype (after an fp16 overflow)."""
        if not upcast or self.dtype == torch.float32:
            return self._decode(z0, "clamp", antialias=True)
        self.vae.to(torch.float32)
        try:
            return self._decode(z0, "clamp", antialias=True, dtype=torch.float32)
        finally:
            self.vae.to(self.dtype)

    def _decode(self, z0: torch.Tensor, normalize: str, antialias: bool,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        z = z0.to(self.device, torch.float32) / self.vae.config.scaling_factor
        x = self.vae.decode(z.to(dtype or self.dtype)).sample.float()
        return self._to_classifier(x, normalize, antialias)

    def _to_classifier(self, x: torch.Tensor, normalize: str, antialias: bool) -> torch.Tensor:
        """Decoder output in [-1, 1] -> [0, 1] at image_size."""
        if normalize == "minmax":
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            x = (x - lo) / (hi - lo + 1e-8)
        else:
            x = (x / 2 + 0.5).clamp(0, 1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=antialias)
        return x
