"""Tiny random Stable Diffusion and SDXL components, built from configs with no download, for
tests and CPU benchmarks: the real diffusers / transformers classes at a few thousand
parameters each, saved in the Hugging Face layout so that the real loading code reads them.

    python bench/tiny_parts.py OUT [--kind sd|sdxl] [--prediction-type v_prediction]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_lt.generate.unclip import _byte_tokenizer  # noqa: E402

WIDTH = 32  # text hidden size of each tiny encoder


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=32, scaling_factor=0.18215)


def _unet(down: tuple[str, str], **extra: Any) -> Any:
    """A 2-block conditional UNet at 16 x 16 latents; ``down`` sets where attention is."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=down,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        block_out_channels=(32, 64), attention_head_dim=(2, 4), **extra)


def _text_config(tokenizer: Any, **extra: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)


def ddim_scheduler(prediction_type: str) -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def tiny_sd_components(seed: int = 0, prediction_type: str = "epsilon") -> dict[str, Any]:
    """A ``StableDiffusionPipeline``'s parts: a 2-block UNet at 16 x 16 latents (32 px images),
    one CLIP text encoder of width 32; v-prediction as SD 2.x 768 when asked."""
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _unet(("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=WIDTH)
        tokenizer = _byte_tokenizer()
        return {"unet": unet, "vae": _vae(), "tokenizer": tokenizer,
                "text_encoder": CLIPTextModel(_text_config(tokenizer)),
                "scheduler": ddim_scheduler(prediction_type)}


def tiny_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """A ``StableDiffusionXLPipeline``'s parts: two text encoders of width 32 (the second with a
    32-d pooled projection), a UNet taking their 64-d concatenation and the text-time added
    condition (6 time ids x 8 + 32 = 80)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _unet(("DownBlock2D", "CrossAttnDownBlock2D"), use_linear_projection=True,
                     cross_attention_dim=2 * WIDTH, addition_embed_type="text_time",
                     addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + WIDTH)
        tokenizer, tokenizer_2 = _byte_tokenizer(), _byte_tokenizer()
        return {"unet": unet, "vae": _vae(), "tokenizer": tokenizer,
                "text_encoder": CLIPTextModel(_text_config(tokenizer)),
                "tokenizer_2": tokenizer_2,
                "text_encoder_2": CLIPTextModelWithProjection(
                    _text_config(tokenizer_2, projection_dim=WIDTH)),
                "scheduler": ddim_scheduler("epsilon")}


def save_tiny(out: Path, kind: str = "sd", seed: int = 0, prediction_type: str = "epsilon"
              ) -> Path:
    """Tiny random parts of ``kind`` saved by diffusers' own pipeline in its folder layout."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind == "sd":
        pipeline = StableDiffusionPipeline(**tiny_sd_components(seed, prediction_type),
                                           safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    else:
        pipeline = StableDiffusionXLPipeline(**tiny_sdxl_components(seed), add_watermarker=False)
    pipeline.save_pretrained(out)
    return Path(out)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--kind", choices=("sd", "sdxl"), default="sd")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                        default="epsilon")
    args = parser.parse_args(argv)
    path = save_tiny(args.out, args.kind, prediction_type=args.prediction_type)
    print(f"tiny {args.kind} pipeline -> {path}")
    return path


if __name__ == "__main__":
    main()
