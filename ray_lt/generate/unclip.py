"""Stable Diffusion 2.1 unCLIP as a ``Generator``: text prompt + CLIP image embedding of a real
training image of the same class or group, with embedding dropout (docs/method.md §3).

Built from diffusers / transformers component objects, loaded offline from a local folder laid
out like ``stabilityai/stable-diffusion-2-1-unclip`` or from the local Hugging Face cache;
``tiny_unclip_components`` builds tiny random ones for tests and benchmarks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    DDPMScheduler,
    StableUnCLIPImg2ImgPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
    StableUnCLIPImageNormalizer,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from ray_lt.errors import ConfigError, DataError
from ray_lt.generate.base import SPEC_FILE, Conditioning, sample_generators

if TYPE_CHECKING:
    from ray_lt.generate.references import References

# Subfolder of the Hugging Face layout -> class that loads it.
COMPONENTS: dict[str, Any] = {
    "unet": UNet2DConditionModel,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "tokenizer": CLIPTokenizer,
    "image_encoder": CLIPVisionModelWithProjection,
    "feature_extractor": CLIPImageProcessor,
    "image_normalizer": StableUnCLIPImageNormalizer,
    "image_noising_scheduler": DDPMScheduler,
    "scheduler": DDIMScheduler,
}
GUIDANCE_DECODERS = ("vae", "tiny", "latent_resize")
# Reference images are embedded in fixed chunks of their index, so an embedding never depends on
# which batch first asked for it (a sample depends on its seed only).
EMBED_CHUNK = 32
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class UnCLIPGenerator:
    """SD 2.1 unCLIP behind the ``Generator`` protocol (``ray_lt.generate.base``).

    The image conditions are ``references`` (CLIP embeddings stored by
    ``ray_lt.generate.references``, what synthesis uses) or, for small in-memory use,
    ``reference_images`` ``{"class": {label: [image, ...]}, "group": {group: [image, ...]}}``
    with uint8 (H, W, C) real training images, embedded on first use; a group without
    references falls back to its class.
    ``predict_noise`` always returns epsilon (a v-prediction UNet is converted), and
    ``scheduler`` is the DDIM scheduler configured for epsilon accordingly.
    """

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, tokenizer: CLIPTokenizer,
                 text_encoder: CLIPTextModel, image_encoder: CLIPVisionModelWithProjection,
                 feature_extractor: CLIPImageProcessor,
                 image_normalizer: StableUnCLIPImageNormalizer,
                 image_noising_scheduler: DDPMScheduler, scheduler: DDIMScheduler, *,
                 class_names: list[str],
                 reference_images: dict[str, dict[int, list[np.ndarray]]] | None = None,
                 references: References | None = None,
                 context_names: list[str] | None = None,
                 prompt_template: str = "a photo of a {class_name}",
                 embedding_dropout: float = 0.5, noise_level: int = 0, image_size: int = 256,
                 height: int | None = None, width: int | None = None, normalize: str = "minmax",
                 guidance_decoder: str = "vae", tiny_decoder: AutoencoderTiny | None = None,
                 decoder_checkpointing: bool = False,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.class_names = list(class_names)
        self.context_names = list(context_names or [])
        self.prompt_template = prompt_template
        self.embedding_dropout = float(embedding_dropout)
        self.noise_level = int(noise_level)
        self.image_size = int(image_size)
        self.normalize = normalize
        self.guidance_decoder = guidance_decoder
        self._validate(image_noising_scheduler, scheduler)
        if guidance_decoder == "tiny" and tiny_decoder is None:
            raise ConfigError("synthesis.tiny_decoder: guidance_decoder 'tiny' needs an "
                              "AutoencoderTiny")

        self.unet, self.vae = unet, vae
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self.tiny_decoder = tiny_decoder
        models = [unet, vae, text_encoder, image_encoder]
        for model in models + ([tiny_decoder] if tiny_decoder is not None else []):
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
        self.image_normalizer = image_normalizer.to(self.device, torch.float32)
        self.image_normalizer.requires_grad_(False)
        self.tokenizer, self.feature_extractor = tokenizer, feature_extractor
        self.image_noising_scheduler = image_noising_scheduler
        # diffusers' own pipeline over the same modules (no copies), for its embedding noising.
        self._pipeline = StableUnCLIPImg2ImgPipeline(
            feature_extractor=feature_extractor, image_encoder=image_encoder,
            image_normalizer=self.image_normalizer,
            image_noising_scheduler=image_noising_scheduler, tokenizer=tokenizer,
            text_encoder=text_encoder, unet=unet, scheduler=scheduler, vae=vae)
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

        self._images: list[np.ndarray] = []
        self._text_cache: dict[str, torch.Tensor] = {}
        self._image_cache: dict[int, torch.Tensor] = {}
        if (reference_images is None) == (references is None):
            raise ValueError("give the reference images or the stored references, not both")
        if references is not None:
            self._class_refs, self._group_refs = references.by_class, references.by_group
            self._image_cache.update(enumerate(references.embeds.to(self.device)))
        else:
            self._class_refs = self._index_references(reference_images.get("class", {}))
            self._group_refs = self._index_references(reference_images.get("group", {}))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, **kwargs: Any) -> UnCLIPGenerator:
        """Load every component offline (see ``load_components``); ``kwargs`` go to
        ``__init__`` (class_names, reference_images, ...)."""
        return cls(**load_components(path, dtype=dtype), device=device, dtype=dtype, **kwargs)

    def _validate(self, image_noising_scheduler: DDPMScheduler, scheduler: DDIMScheduler) -> None:
        n_levels = image_noising_scheduler.config.num_train_timesteps
        if not 0 <= self.noise_level < n_levels:
            raise ConfigError(f"generator.noise_level: {self.noise_level} is outside "
                              f"[0, {n_levels})")
        if not 0.0 <= self.embedding_dropout <= 1.0:
            raise ConfigError(f"generator.embedding_dropout: {self.embedding_dropout} is not a "
                              "probability in [0, 1]")
        if self.guidance_decoder not in GUIDANCE_DECODERS:
            raise ConfigError(f"synthesis.guidance_decoder: {self.guidance_decoder!r} is not one "
                              f"of {list(GUIDANCE_DECODERS)}")
        if self.normalize not in ("minmax", "clamp"):
            raise ConfigError(f"generator.normalize: {self.normalize!r} is not 'minmax' or 'clamp'")
        if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"generator.pretrained: scheduler prediction_type "
                              f"{scheduler.config.prediction_type!r} is not supported "
                              "(epsilon or v_prediction)")
        try:
            self.prompt_template.format(class_name="x", context="y")
        except (KeyError, IndexError) as err:
            raise ConfigError(f"generator.prompt_template: {self.prompt_template!r} uses an "
                              f"unknown field {err}; use {{class_name}} and {{context}}") from None
        if "{context}" in self.prompt_template and not self.context_names:
            raise ConfigError(f"generator.prompt_template: {self.prompt_template!r} needs "
                              "{context} but the data set has no context names")

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

    def latent_shape(self) -> tuple[int, ...]:
        """(VAE latent channels, height / vae scale, width / vae scale)."""
        return (self.vae.config.latent_channels, self.height // self.vae_scale,
                self.width // self.vae_scale)

    def prompt(self, label: int, group: int) -> str:
        """The text prompt of (label, group), e.g. "a photo of a cat in snow"."""
        context = ""
        if self.context_names and group >= 0:
            if group // len(self.context_names) != label:
                raise ValueError(f"group {group} is not a group of class {label} "
                                 f"(group = label * {len(self.context_names)} + context)")
            context = self.context_names[group % len(self.context_names)]
        return self.prompt_template.format(class_name=self.class_names[label], context=context)

    def condition(self, labels: torch.Tensor, groups: torch.Tensor, seeds: list[int]
                  ) -> Conditioning:
        """Prompts and noised image embeddings for a batch. Per sample, its stream-1 generator
        draws, in this order: the reference image, the dropout coin, the embedding noise."""
        labels_l, groups_l = [int(v) for v in labels], [int(v) for v in groups]
        dim = self.image_normalizer.config.embedding_dim
        refs, dropped, noise, prompts = [], [], [], []
        for label, group, gen in zip(labels_l, groups_l, sample_generators(seeds, stream=1),
                                     strict=True):
            prompts.append(self.prompt(label, group))
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
        text = torch.stack([self._text_embed(p) for p in prompts])
        uncond_text = self._text_embed("").expand_as(text)
        inputs = {
            "prompts": prompts,
            "text_embeds": text,
            "uncond_text_embeds": uncond_text,
            "image_embeds": image_embeds.to(self.dtype),
            # The diffusers pipeline's unconditional branch: the whole class-label vector zero.
            "uncond_image_embeds": torch.zeros_like(image_embeds, dtype=self.dtype),
            "reference": torch.tensor(refs, device=self.device),
            "dropped": dropped_t,
        }
        return Conditioning(labels=torch.as_tensor(labels_l, device=self.device),
                            groups=torch.as_tensor(groups_l, device=self.device), inputs=inputs)

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

    @torch.no_grad()
    def _text_embed(self, prompt: str) -> torch.Tensor:
        """Text encoder hidden states (L, D) of one prompt, cached per prompt string."""
        if prompt not in self._text_cache:
            ids = self.tokenizer(prompt, padding="max_length", truncation=True, return_tensors="pt",
                                 max_length=self.tokenizer.model_max_length).input_ids
            self._text_cache[prompt] = self.text_encoder(ids.to(self.device))[0][0].to(self.dtype)
        return self._text_cache[prompt]

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor | int, cond: Conditioning,
                      cfg_scale: float) -> torch.Tensor:
        """Epsilon with classifier-free guidance, ``eps_u + s (eps_c - eps_u)``
        (docs/method.md §1), from one UNet call on [uncond, cond] (the conditional half only
        when s == 1); float32."""
        x = cond.inputs
        z = z_t.to(self.device, self.dtype)
        t = torch.as_tensor(t, device=self.device)
        if cfg_scale == 1:
            out = self.unet(z, t, encoder_hidden_states=x["text_embeds"],
                            class_labels=x["image_embeds"]).sample.float()
        else:
            out = self.unet(torch.cat([z, z]), torch.cat([t, t]) if t.ndim else t,
                            encoder_hidden_states=torch.cat([x["uncond_text_embeds"],
                                                             x["text_embeds"]]),
                            class_labels=torch.cat([x["uncond_image_embeds"],
                                                    x["image_embeds"]])).sample.float()
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


def rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) for CLIP's image processor, from (H, W), (H, W, 1) or (H, W, 3)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def _resolve(path: str | Path) -> Path:
    """A local folder, or a hub id's snapshot in the local Hugging Face cache (never fetched)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if not local.exists() and _REPO_ID.match(str(path)):
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(str(path), local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError):
            raise ConfigError(f"generator.pretrained: {path!r} is neither a folder nor in the "
                              f"local Hugging Face cache ({HF_HUB_CACHE}); weights are never "
                              "downloaded, fetch them beforehand (huggingface-cli download) or "
                              "give a local folder") from None
    raise ConfigError(f"generator.pretrained: folder {local} does not exist; weights are never "
                      "downloaded, give a local folder laid out like "
                      "stabilityai/stable-diffusion-2-1-unclip")


def check_pretrained(path: str | Path) -> Path:
    """The resolved folder, after checking every component folder is there (cheap: loads
    nothing), so a bad path fails before any actor starts; a folder of another generator is
    named for what it holds."""
    root = _resolve(path)
    if (root / SPEC_FILE).is_file():
        kind = json.loads((root / SPEC_FILE).read_text()).get("kind")
        raise ConfigError(f"generator.pretrained: {root} holds a {kind!r} generator trained by "
                          f"ray-lt ({SPEC_FILE}), not Stable Diffusion 2.1 unCLIP; to sample "
                          f"from it set generator.kind: {kind} and --out to the run folder it "
                          f"was trained in")
    missing = [name for name in COMPONENTS if not (root / name).is_dir()]
    if missing:
        index = root / "model_index.json"
        pipeline = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
        holds = f" (its model_index.json names a {pipeline})" if pipeline else ""
        raise ConfigError(f"generator.pretrained: {root}{holds} lacks the component folder(s) "
                          f"{missing} of a StableUnCLIPImg2ImgPipeline; expected "
                          f"{list(COMPONENTS)} (weights are never downloaded)")
    return root


def load_components(path: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Every unCLIP component from a folder laid out like the Hugging Face repo
    ``stabilityai/stable-diffusion-2-1-unclip`` (or that repo id in the local cache), offline,
    through diffusers' own pipeline loader."""
    root = check_pretrained(path)
    try:
        pipeline = StableUnCLIPImg2ImgPipeline.from_pretrained(
            root, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:
        for name in COMPONENTS:  # name the component that fails on its own, if one does
            load_component(root, name, dtype)
        raise ConfigError(f"generator.pretrained: {root} could not be loaded offline as a "
                          f"StableUnCLIPImg2ImgPipeline ({err}); weights are never downloaded"
                          ) from None
    return {name: pipeline.components[name] for name in COMPONENTS}


def load_component(path: str | Path, name: str, dtype: torch.dtype = torch.float32) -> Any:
    """One component (a key of ``COMPONENTS``) of the unCLIP folder, offline."""
    root = check_pretrained(path)
    kwargs: dict[str, Any] = {"subfolder": name, "local_files_only": True}
    if name in ("unet", "vae", "text_encoder", "image_encoder"):
        kwargs["dtype"] = dtype
    try:
        return COMPONENTS[name].from_pretrained(root, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(f"generator.pretrained: component {name!r} in {root / name} could "
                          f"not be loaded offline ({err}); weights are never downloaded"
                          ) from None


def load_tiny_decoder(path: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderTiny:
    """An ``AutoencoderTiny`` (TAESD-style weights for the SD 2.x latent) from a local folder,
    offline, for ``synthesis.guidance_decoder: tiny``."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"synthesis.tiny_decoder: {folder} holds no config.json of an "
                          "AutoencoderTiny (weights are never downloaded; fetch e.g. "
                          "madebyollin/taesd into a local folder)")
    try:
        decoder = AutoencoderTiny.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ConfigError(f"synthesis.tiny_decoder: {folder} could not be loaded as an "
                          f"AutoencoderTiny ({err})") from None
    return decoder


def tiny_autoencoder(latent_channels: int = 4, seed: int = 0) -> AutoencoderTiny:
    """A tiny random ``AutoencoderTiny`` matching ``tiny_unclip_components``' VAE (latent =
    image / 2), for tests and benchmarks of the tiny guidance decoder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderTiny(encoder_block_out_channels=(16, 16),
                               decoder_block_out_channels=(16, 16), num_encoder_blocks=(1, 1),
                               num_decoder_blocks=(1, 1), latent_channels=latent_channels)


def save_components(components: dict[str, Any], path: str | Path) -> None:
    """Write components in the Hugging Face layout (with ``model_index.json``), so that
    ``load_components(path)`` and diffusers' own pipeline load them offline."""
    StableUnCLIPImg2ImgPipeline(**components).save_pretrained(path)


def tiny_unclip_components(seed: int = 0) -> dict[str, Any]:
    """Tiny random unCLIP components for tests and benchmarks, no download: image embedding
    and text width 32, a 2-block UNet and VAE (latent = image / 2), v-prediction as SD 2.1."""
    embed_dim = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
            attention_head_dim=(2, 4), cross_attention_dim=embed_dim, use_linear_projection=True,
            upcast_attention=True, class_embed_type="projection",
            projection_class_embeddings_input_dim=2 * embed_dim)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=32, sample_size=32, scaling_factor=0.18215)
        tokenizer = _byte_tokenizer()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=embed_dim, intermediate_size=37,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
            projection_dim=embed_dim, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=embed_dim, projection_dim=embed_dim, intermediate_size=37,
            num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=4))
        image_normalizer = StableUnCLIPImageNormalizer(embedding_dim=embed_dim)
        with torch.no_grad():
            image_normalizer.mean.normal_(0, 0.1)
            image_normalizer.std.uniform_(0.5, 1.5)
    return {
        "unet": unet, "vae": vae, "tokenizer": tokenizer, "text_encoder": text_encoder,
        "image_encoder": image_encoder,
        "feature_extractor": CLIPImageProcessor(size={"shortest_edge": 32},
                                                crop_size={"height": 32, "width": 32}),
        "image_normalizer": image_normalizer,
        "image_noising_scheduler": DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        "scheduler": DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, prediction_type="v_prediction",
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    }


def _byte_tokenizer() -> CLIPTokenizer:
    """CLIP tokenizer over an in-memory byte-level vocabulary (every byte, alone and
    word-final), so that no text maps to unknown."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(tokens)}, merges=[],
                         model_max_length=77)
