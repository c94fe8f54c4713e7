"""The guided sampler at real size: images/s, guided / unguided, peak memory and TFLOP/s.

    python bench/gpu_sampler.py [--model unclip | sd15 | sd21 | sdxl] [--full | --tiny]
        [--sizes 512] [--batches 8 16] [--every 5] [--decoders vae latent_resize]
        [--micro-batch N] [--compile] [--through-unet] [--one-by-one] [--steps 30]
        [--repeats 2] [--json PATH]

Needs torch, diffusers, transformers and safetensors only (no Ray, no pydantic), so it runs on a
bare GPU box. ``--full`` (the default on CUDA) builds the published shapes of ``--model`` from
configs with random weights: ``unclip`` (the default) Stable Diffusion 2.1 unCLIP (UNet 870M
parameters, the SD VAE, OpenCLIP ViT-H text and image encoders), ``sd15`` SD 1.5 (CLIP ViT-L
text encoder, 512 px), ``sd21`` SD 2.1 768 v-prediction (OpenCLIP ViT-H text, 768 px) and
``sdxl`` SDXL base (ViT-L and OpenCLIP bigG text encoders, 1024 px); the scorer is a
ResNeXt-50 at 224 px with the entropy criterion. ``--tiny`` (the default on CPU) runs the same
code on the tiny random parts of the model (``ray_lt.testing``)
and a small CNN at 32 px, so the script and its numbers stay tested on a CPU.

For every size and batch it times unguided sampling, then guided sampling (guidance every
``--every`` steps) with each guidance decoder, and prints per setting: images/s, the ratio of
the guided time per image to the unguided one, the peak memory (CUDA: the allocator's peak;
CPU: not measured), the FLOPs of one batch (counted once, eagerly, with torch's
``FlopCounterMode``) and the TFLOP/s they imply at the measured speed. Then, on the same parts:
the cosine similarity of each guidance decoder's criterion gradient to the full VAE's, and
(CUDA) the number of host-device synchronisations inside one guided batch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_lt.generate.criteria import CriterionScorer  # noqa: E402
from ray_lt.generate.latent import LatentDiffusion  # noqa: E402
from ray_lt.generate.sampler import Guidance, guided_sample  # noqa: E402
from ray_lt.generate.stable_diffusion import (  # noqa: E402
    StableDiffusionGenerator,
    StableDiffusionXLGenerator,
)
from ray_lt.generate.unclip import UnCLIPGenerator  # noqa: E402
from ray_lt.testing import (  # noqa: E402
    byte_tokenizer,
    ddim_scheduler,
    tiny_autoencoder,
    tiny_sd_components,
    tiny_sdxl_components,
    tiny_unclip_components,
)
from ray_lt.train.models import build_model  # noqa: E402

NUM_CLASSES = 1000
CLASSIFIER_SIZE = {"full": 224, "tiny": 32}
# The networks whose parameters the header counts, those of the model that it has.
NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder")

# The published UNet configs: SD 1.x, the changes of SD 2.x (768 v-prediction and unCLIP)
# and of SDXL base.
SD_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768)
SD2_UNET: dict[str, Any] = dict(
    sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
    use_linear_projection=True, upcast_attention=True)
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
# The text encoders: CLIP ViT-L/14 (SD 1.x, SDXL's first), OpenCLIP ViT-H (SD 2.x) and bigG
# (SDXL's second, with its pooled projection); the MLP is 4x the width in all three.
VIT_L = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             hidden_act="quick_gelu")
VIT_H = dict(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu")
VIT_BIGG = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                hidden_act="gelu", projection_dim=1280)


def _text_encoder(tokenizer: Any, shape: dict[str, Any], projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), intermediate_size=4 * shape["hidden_size"],
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _sd_networks(tokenizer: Any, unet: dict[str, Any], text: dict[str, Any], vae_size: int,
                 scaling_factor: float = 0.18215) -> dict[str, torch.nn.Module]:
    """A UNet (``SD_UNET`` updated by ``unet``), the SD VAE and one text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return {
        "unet": UNet2DConditionModel(**{**SD_UNET, **unet}),
        "vae": AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=vae_size,
            scaling_factor=scaling_factor),
        "text_encoder": _text_encoder(tokenizer, text),
    }


def _unclip_networks(tokenizer: Any) -> dict[str, torch.nn.Module]:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = {**SD2_UNET, "class_embed_type": "projection",
            "projection_class_embeddings_input_dim": 2048}
    return {**_sd_networks(tokenizer, unet, VIT_H, 768),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=16, patch_size=14, image_size=224, projection_dim=1024,
                hidden_act="gelu"))}


def _sdxl_networks(tokenizer: Any) -> dict[str, torch.nn.Module]:
    return {**_sd_networks(tokenizer, SDXL_UNET, VIT_L, 1024, scaling_factor=0.13025),
            "text_encoder_2": _text_encoder(tokenizer, VIT_BIGG, projection=True)}


def _unclip_extras(tokenizer: Any) -> dict[str, Any]:
    """unCLIP's parts besides its networks: the image processor, the embedding normaliser and
    the embedding noising schedule."""
    from diffusers import DDPMScheduler
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )
    from transformers import CLIPImageProcessor

    return {"feature_extractor": CLIPImageProcessor(),
            "image_normalizer": StableUnCLIPImageNormalizer(embedding_dim=1024),
            "image_noising_scheduler": DDPMScheduler(beta_schedule="squaredcos_cap_v2")}


def _unclip_references() -> dict[str, Any]:
    """unCLIP's image conditions: one random reference image for each of classes 0 - 3, the
    image embedding dropped half the time as FG's setting does, no embedding noise."""
    rng = np.random.default_rng(0)
    return {"reference_images": {"class": {
        c: [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)] for c in range(4)}},
        "embedding_dropout": 0.5, "noise_level": 0}


@dataclass(frozen=True)
class Model:
    """One architecture: its generator, its published networks (built from the tokenizer), its
    UNet's parameterisation, its other parts, its tiny parts and its native size (px)."""
    generator: type[LatentDiffusion]
    networks: Callable[[Any], dict[str, torch.nn.Module]]
    prediction_type: str
    tiny: Callable[[], dict[str, Any]]
    size: int
    extras: Callable[[Any], dict[str, Any]] = lambda tokenizer: {}
    generator_kwargs: Callable[[], dict[str, Any]] = dict


MODELS = {
    "unclip": Model(UnCLIPGenerator, _unclip_networks, "v_prediction", tiny_unclip_components,
                    512, _unclip_extras, _unclip_references),
    "sd15": Model(StableDiffusionGenerator,
                  partial(_sd_networks, unet={}, text=VIT_L, vae_size=512), "epsilon",
                  tiny_sd_components, 512),
    "sd21": Model(StableDiffusionGenerator,
                  partial(_sd_networks, unet=SD2_UNET, text=VIT_H, vae_size=768),
                  "v_prediction", partial(tiny_sd_components, prediction_type="v_prediction"),
                  768),
    "sdxl": Model(StableDiffusionXLGenerator, _sdxl_networks, "epsilon", tiny_sdxl_components,
                  1024, lambda tokenizer: {"tokenizer_2": tokenizer}),
}


def full_components(model: str = "unclip", seed: int = 0,
                    device: str | torch.device = "cpu") -> dict[str, Any]:
    """``model``'s component shapes (the published configs) with random weights, the networks
    initialised on ``device`` (billions of parameters initialise in seconds on a GPU, not
    minutes on a CPU); the tokenizers are the byte-level one (its vocabulary does not change
    the cost), the scheduler the published DDIM one."""
    spec = MODELS[model]
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    with torch.device(device):
        networks = spec.networks(tokenizer)
    return {**networks, **spec.extras(tokenizer), "tokenizer": tokenizer,
            "scheduler": ddim_scheduler(spec.prediction_type)}


def full_unclip_components(seed: int = 0, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Stable Diffusion 2.1 unCLIP's component shapes with random weights."""
    return full_components("unclip", seed, device)


def tiny_decoder_for(scale: str, dtype: torch.dtype) -> Any:
    """A random ``AutoencoderTiny`` with the latent-to-image factor of the VAE of ``scale``
    (TAESD's shapes, which are TAESDXL's too, at full scale)."""
    if scale == "tiny":
        decoder = tiny_autoencoder()
    else:
        from diffusers import AutoencoderTiny

        torch.manual_seed(1)
        decoder = AutoencoderTiny()  # TAESD's own shapes: 8x, 4 latent channels
    return decoder if dtype == torch.float32 else decoder.to(dtype=dtype)


@dataclass
class Parts:
    scale: str
    components: dict[str, Any]
    scorer: CriterionScorer
    device: torch.device
    dtype: torch.dtype
    model: str = "unclip"


def build_parts(scale: str, device: torch.device, dtype: torch.dtype, model: str = "unclip"
                ) -> Parts:
    """The generator components of ``model`` and the scorer (ResNeXt-50 at 224 px, or a small
    CNN)."""
    components = (full_components(model, device=device) if scale == "full"
                  else MODELS[model].tiny())
    arch = "resnext50_32x4d" if scale == "full" else "small_cnn"
    classifier = build_model(arch, num_classes=NUM_CLASSES, in_channels=3, width=8).eval()
    scorer = CriterionScorer(classifier, ["entropy"]).to(device)
    if device.type == "cuda":
        scorer.to(memory_format=torch.channels_last)
    return Parts(scale, components, scorer, device, dtype, model)


def make_generator(parts: Parts, size: int, decoder: str, compiled: bool,
                   checkpointing: bool = False) -> LatentDiffusion:
    spec = MODELS[parts.model]
    generator = spec.generator(
        **parts.components, **spec.generator_kwargs(),
        class_names=[f"class {c}" for c in range(NUM_CLASSES)],
        image_size=CLASSIFIER_SIZE[parts.scale], height=size, width=size,
        guidance_decoder=decoder, decoder_checkpointing=checkpointing,
        tiny_decoder=tiny_decoder_for(parts.scale, parts.dtype) if decoder == "tiny" else None,
        device=parts.device, dtype=parts.dtype)
    if compiled:
        generator.compile()
    return generator


@dataclass
class Setting:
    size: int
    batch: int
    guided: bool
    every: int = 5
    decoder: str = "vae"
    through_unet: bool = False
    micro_batch: int | None = None
    compiled: bool = False

    @property
    def name(self) -> str:
        compiled = ["compiled"] if self.compiled else []
        if not self.guided:
            return f"unguided ({compiled[0]})" if compiled else "unguided"
        extra = [self.decoder] + (["through UNet"] if self.through_unet else []) + \
            ([f"micro-batch {self.micro_batch}"] if self.micro_batch else []) + compiled
        return f"guided k={self.every} ({', '.join(extra)})"


@dataclass
class Result:
    setting: Setting
    images_per_s: float
    seconds_per_batch: float
    peak_memory_gb: float | None
    tflop_per_batch: float
    ratio_to_unguided: float | None = None
    out_of_memory: bool = False

    @property
    def tflops(self) -> float:
        return self.tflop_per_batch / self.seconds_per_batch


def sample_batch(generator: LatentDiffusion, parts: Parts, setting: Setting, steps: int,
                 seed: int) -> torch.Tensor:
    n = setting.batch
    guidance = Guidance(scale=0.03 if setting.guided else 0.0, every=setting.every,
                        through_unet=setting.through_unet, micro_batch=setting.micro_batch)
    out = guided_sample(generator, parts.scorer if setting.guided else None,
                        torch.arange(n) % 4, torch.full((n,), -1), torch.zeros(n, dtype=torch.long),
                        list(range(seed, seed + n)), steps, 5.0, guidance,
                        autocast_dtype=parts.dtype if parts.device.type == "cuda" else None)
    with torch.no_grad():
        return generator.decode_output(out.latents)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generator_for(parts: Parts, setting: Setting,
                   cache: dict[tuple, LatentDiffusion]) -> LatentDiffusion:
    """A compiled generator is kept per (size, decoder), so its compiled graphs are reused
    across batch sizes; an eager one is cheap to build and is not kept."""
    if not setting.compiled:
        return make_generator(parts, setting.size, setting.decoder, False)
    key = (setting.size, setting.decoder)
    if not setting.guided:  # unguided sampling never calls the guidance decode
        key = next((k for k in cache if k[0] == setting.size), key)
    if key not in cache:
        cache[key] = make_generator(parts, setting.size, setting.decoder, True)
    return cache[key]


def measure(parts: Parts, setting: Setting, steps: int, repeats: int,
            flops_cache: dict[tuple, float],
            generators: dict[tuple, LatentDiffusion] | None = None) -> Result:
    """Warm up once (compiling, where compiled), then time ``repeats`` batches. FLOPs are
    counted once per setting, eagerly, on one sample (every operation is per sample, so a
    batch's count is the batch times one sample's). Out of CUDA memory is a result, not an
    error: the row says so."""
    generators = {} if generators is None else generators
    generator = _generator_for(parts, setting, generators)
    if parts.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(parts.device)
    try:
        sample_batch(generator, parts, setting, steps, seed=0)
        _sync(parts.device)
        started = time.perf_counter()
        for r in range(repeats):
            sample_batch(generator, parts, setting, steps, seed=1000 * (r + 1))
        _sync(parts.device)
    except torch.cuda.OutOfMemoryError:
        peak = torch.cuda.max_memory_allocated(parts.device) / 1e9
        del generator
        torch.cuda.empty_cache()
        return Result(setting, math.nan, math.nan, peak, math.nan, out_of_memory=True)
    seconds = (time.perf_counter() - started) / repeats
    peak = (torch.cuda.max_memory_allocated(parts.device) / 1e9
            if parts.device.type == "cuda" else None)
    key = (setting.size, setting.guided, setting.every, setting.decoder, setting.through_unet)
    if key not in flops_cache:
        eager = make_generator(parts, setting.size, setting.decoder, False)
        one = Setting(setting.size, 1, setting.guided, setting.every, setting.decoder,
                      setting.through_unet)
        counter = FlopCounterMode(display=False)
        with counter:
            sample_batch(eager, parts, one, steps, seed=0)
        flops_cache[key] = counter.get_total_flops() / 1e12
    del generator
    if parts.device.type == "cuda":
        torch.cuda.empty_cache()
    return Result(setting, setting.batch / seconds, seconds, peak,
                  flops_cache[key] * setting.batch)


def gradient_cosines(parts: Parts, size: int, decoders: list[str], batch: int = 4
                     ) -> dict[str, float]:
    """Cosine similarity of d c / d x0 through each guidance decoder to the full VAE's (per
    sample, averaged), at a smooth random latent: Gaussian noise at a quarter of the latent's
    side, upsampled, as a predicted x0 is smooth where white noise is not. Nothing to compare
    (no decoder but the VAE): nothing computed."""
    if set(decoders) <= {"vae"}:
        return {}
    generator = make_generator(parts, size, "vae", False)
    channels, h, w = generator.latent_shape()
    coarse = torch.randn(batch, channels, max(1, h // 4), max(1, w // 4),
                         generator=torch.Generator().manual_seed(7))
    z = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").to(parts.device)
    labels = torch.arange(batch, device=parts.device) % 4
    ids = torch.zeros(batch, dtype=torch.long, device=parts.device)

    def grad_of(gen: LatentDiffusion) -> torch.Tensor:
        z_in = z.clone().requires_grad_(True)
        score = parts.scorer(gen.decode(z_in), labels, ids)
        return torch.autograd.grad(score.sum(), z_in)[0].flatten(1).float()

    reference = grad_of(generator)
    out = {}
    for decoder in decoders:
        if decoder == "vae":
            continue
        other = grad_of(make_generator(parts, size, decoder, False))
        out[decoder] = float(torch.nn.functional.cosine_similarity(other, reference).mean())
    return out


def count_syncs(parts: Parts, setting: Setting, steps: int) -> int | None:
    """Host-device synchronisations inside one guided batch (CUDA's sync debug mode)."""
    if parts.device.type != "cuda":
        return None
    generator = make_generator(parts, setting.size, setting.decoder, False)
    n = setting.batch
    guidance = Guidance(scale=0.03, every=setting.every, micro_batch=setting.micro_batch)
    cond_args = (torch.arange(n) % 4, torch.full((n,), -1), torch.zeros(n, dtype=torch.long),
                 list(range(n)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            guided_sample(generator, parts.scorer, *cond_args, steps, 5.0, guidance,
                          autocast_dtype=parts.dtype)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def settings_for(args: argparse.Namespace) -> list[Setting]:
    out = []
    for size in args.sizes:
        for batch in args.batches:
            out.append(Setting(size, batch, False, compiled=args.compile))
            for every in args.every:
                for decoder in args.decoders:
                    out.append(Setting(size, batch, True, every, decoder, args.through_unet,
                                       args.micro_batch, args.compile))
    return out


def table(results: list[Result]) -> list[str]:
    lines = [f"{'size':>5}{'batch':>6}  {'setting':<40}{'img/s':>8}{'/unguided':>10}"
             f"{'peak GB':>9}{'TFLOP/batch':>12}{'TFLOP/s':>9}"]
    for r in results:
        lines.append(row_line(r))
    return lines


def row_line(r: Result) -> str:
    s = r.setting
    peak = f"{r.peak_memory_gb:.1f}" if r.peak_memory_gb is not None else "n/a"
    if r.out_of_memory:
        return f"{s.size:>5}{s.batch:>6}  {s.name:<40}{'out of memory':>18}{peak:>9}"
    ratio = f"{r.ratio_to_unguided:.2f}" if r.ratio_to_unguided is not None else "-"
    return (f"{s.size:>5}{s.batch:>6}  {s.name:<40}{r.images_per_s:>8.2f}{ratio:>10}"
            f"{peak:>9}{r.tflop_per_batch:>12.3f}{r.tflops:>9.2f}")


def with_ratios(results: list[Result]) -> list[Result]:
    """Guided seconds per image over unguided seconds per image at the same size and batch."""
    unguided = {(r.setting.size, r.setting.batch, r.setting.compiled): r.images_per_s
                for r in results if not r.setting.guided and not r.out_of_memory}
    for r in results:
        base = unguided.get((r.setting.size, r.setting.batch, r.setting.compiled))
        if base and not r.out_of_memory:
            r.ratio_to_unguided = base / r.images_per_s
    return results


def suite_phases(scale: str, compiled: bool, small: int | None = None
                 ) -> list[tuple[str, list[Setting]]]:
    """The settings behind ``docs/performance.md``, most wanted first, so that a run cut short
    by its time budget still answers the main questions. Full parts: ``small`` px (the model's
    native size; unCLIP: 512, the official release's) at batch 16 and 32, 1.5 x ``small`` at
    batch 16; tiny parts: 64 and 96 px at batch 2 and 4."""
    small = small or (512 if scale == "full" else 64)
    large = small * 3 // 2
    b1, b2 = (16, 32) if scale == "full" else (2, 4)
    mb = b1 // 2

    def guided(size, batch, decoder, micro=None, compile_=False):
        return Setting(size, batch, True, 5, decoder, micro_batch=micro, compiled=compile_)

    phases = [
        ("eager", [Setting(small, b1, False), guided(small, b1, "vae", mb),
                   guided(small, b1, "latent_resize"), guided(small, b1, "tiny")]),
    ]
    if compiled:
        phases.append(("compiled", [Setting(small, b1, False, compiled=True),
                                    guided(small, b1, "latent_resize", None, True),
                                    guided(small, b1, "tiny", None, True)]))
    phases += [
        ("one by one", [Setting(small, 1, False)]),
        ("eager, large batch", [Setting(small, b2, False), guided(small, b2, "vae", mb),
                                guided(small, b2, "latent_resize")]),
        ("large size", [Setting(large, b1, False), guided(large, b1, "vae", mb // 2 or None)]),
    ]
    if compiled:
        phases.append(("compiled, large batch",
                       [Setting(small, b2, False, compiled=True),
                        guided(small, b2, "latent_resize", None, True),
                        guided(small, b2, "tiny", None, True)]))
    phases.append(("memory", [guided(small, b2, "vae"), guided(large, b1, "latent_resize")]))
    return phases


def run_suite(parts: Parts, args: argparse.Namespace, report: dict[str, Any],
              size: int | None = None) -> list[Result]:
    """Every setting of ``suite_phases`` in order (at ``size`` px and 1.5 x, default the
    model's native size), one line each as it finishes, the JSON rewritten after each, so a
    run stopped from outside keeps what it measured. A setting is not started once
    ``--budget-s`` has passed; it is listed under ``skipped``."""
    if args.compile_static:
        # one static graph per batch size, as an actor with a fixed batch size compiles
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    started = time.perf_counter()
    flops: dict[tuple, float] = {}
    generators: dict[tuple, LatentDiffusion] = {}
    results: list[Result] = []
    report["skipped"], report["results"] = [], []
    native = size or (MODELS[parts.model].size if parts.scale == "full" else None)
    for phase, settings in suite_phases(parts.scale, not args.no_compile, native):
        for setting in settings:
            elapsed = time.perf_counter() - started
            if args.budget_s is not None and elapsed > args.budget_s:
                report["skipped"].append(f"{phase}: {setting.size} x {setting.batch}, "
                                         f"{setting.name}")
                continue
            result = measure(parts, setting, args.steps, args.repeats, flops, generators)
            results.append(result)
            with_ratios(results)
            print(f"{row_line(result)}   [{phase}, {time.perf_counter() - started:.0f} s]",
                  flush=True)
            report["results"] = [result_record(r, parts.model) for r in results]
            if args.json:
                args.json.write_text(json.dumps(report, indent=1))
    return results


def result_record(r: Result, model: str) -> dict[str, Any]:
    return {"model": model, **asdict(r.setting), "name": r.setting.name,
            "images_per_s": r.images_per_s, "ratio_to_unguided": r.ratio_to_unguided,
            "peak_memory_gb": r.peak_memory_gb, "tflop_per_batch": r.tflop_per_batch,
            "tflops": r.tflops, "out_of_memory": r.out_of_memory}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--full", action="store_true",
                       help="the model's published shapes (CUDA default)")
    scale.add_argument("--tiny", action="store_true", help="tiny parts (CPU default)")
    parser.add_argument("--model", choices=list(MODELS), default="unclip",
                        help="SD 2.1 unCLIP, SD 1.5, SD 2.1 (768 v) or SDXL base")
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--every", type=int, nargs="+", default=[5])
    parser.add_argument("--decoders", nargs="+", default=["vae", "latent_resize"],
                        choices=["vae", "tiny", "latent_resize"])
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--through-unet", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--one-by-one", action="store_true",
                        help="also time unguided batch 1 against the largest batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--suite", action="store_true",
                        help="the settings of docs/performance.md, most wanted first "
                             "(ignores --batches, --decoders, --micro-batch; --sizes S: the "
                             "suite at S and 1.5 x S px instead of the model's native size)")
    parser.add_argument("--no-compile", action="store_true",
                        help="--suite without its compiled settings")
    parser.add_argument("--compile-static", action="store_true",
                        help="--suite: compile one static graph per batch size")
    parser.add_argument("--budget-s", type=float,
                        help="--suite: start no setting after this many seconds")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale_name = "full" if args.full or (device.type == "cuda" and not args.tiny) else "tiny"
    # tiny: 64 px through a VAE of factor 2 -> a 32 x 32 latent; the classifier sees 32 px
    suite_size = args.sizes[0] if args.suite and args.sizes else None
    args.sizes = args.sizes or ([MODELS[args.model].size] if scale_name == "full" else [64])
    args.batches = args.batches or ([8, 16] if scale_name == "full" else [4])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    parts = build_parts(scale_name, device, dtype, args.model)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    millions = {k: sum(p.numel() for p in parts.components[k].parameters()) / 1e6
                for k in NETWORKS if k in parts.components}
    print(f"{name}, {args.model} {scale_name} parts ("
          + ", ".join(f"{k} {v:,.1f}M" for k, v in millions.items())
          + f"), {str(dtype).removeprefix('torch.')}, {args.steps} DDIM steps, CFG 5 "
          f"(built in {time.perf_counter() - started:.0f} s)", flush=True)

    report: dict[str, Any] = {"device": name, "model": args.model, "parts": scale_name,
                              "steps": args.steps,
                              "parameters_millions": millions}
    if args.suite:
        return finish_suite(parts, args, report, run_suite(parts, args, report, suite_size))
    flops: dict[tuple, float] = {}
    results = with_ratios([measure(parts, s, args.steps, args.repeats, flops)
                           for s in settings_for(args)])
    for line in table(results):
        print(line)
    report["results"] = [result_record(r, parts.model) for r in results]
    if args.one_by_one:
        batch = max(args.batches)
        single = measure(parts, Setting(args.sizes[0], 1, False, compiled=args.compile),
                         args.steps, args.repeats, flops)
        many = next(r for r in results if not r.setting.guided and r.setting.batch == batch)
        report["batched_vs_one"] = many.images_per_s / single.images_per_s
        print(f"unguided batch {batch} vs one by one: {report['batched_vs_one']:.2f}x "
              f"({many.images_per_s:.2f} vs {single.images_per_s:.2f} img/s)")
    cosines = gradient_cosines(parts, args.sizes[0], args.decoders)
    report["gradient_cosine_to_vae"] = cosines
    for decoder, value in cosines.items():
        print(f"criterion gradient, {decoder} vs full VAE decode: cosine {value:.3f}")
    guided = next((s for s in settings_for(args) if s.guided), None)
    syncs = count_syncs(parts, guided, args.steps) if guided else None
    if syncs is not None:
        report["host_syncs_per_guided_batch"] = syncs
        print(f"host-device synchronisations in one guided batch: {syncs}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    assert all(math.isfinite(r.images_per_s) or r.out_of_memory for r in results)
    return report


def finish_suite(parts: Parts, args: argparse.Namespace, report: dict[str, Any],
                 results: list[Result]) -> dict[str, Any]:
    """The suite's summary lines: batched against one by one, the synchronisations of one
    guided batch, and what the budget left out."""
    single = next((r for r in results if r.setting.batch == 1), None)
    if single is not None:
        report["batched_vs_one"] = {
            str(r.setting.batch): r.images_per_s / single.images_per_s for r in results
            if not r.setting.guided and not r.setting.compiled and r.setting.batch > 1
            and r.setting.size == single.setting.size and not r.out_of_memory}
        for batch, ratio in report["batched_vs_one"].items():
            print(f"unguided batch {batch} vs one by one: {ratio:.2f}x")
    guided = next((r.setting for r in results if r.setting.guided
                   and not r.setting.compiled and r.setting.decoder == "latent_resize"), None)
    syncs = count_syncs(parts, guided, args.steps) if guided else None
    if syncs is not None:
        report["host_syncs_per_guided_batch"] = syncs
        print(f"host-device synchronisations in one guided batch: {syncs}")
    for skipped in report["skipped"]:
        print(f"skipped (time budget): {skipped}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
