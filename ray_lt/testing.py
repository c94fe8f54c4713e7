"""Tiny random generator parts for tests, benchmarks and trying a kind without weights: the
real diffusers / transformers classes (unCLIP, Stable Diffusion 1.x / 2.x, SDXL, an
``AutoencoderTiny``) at a few thousand parameters each, built from configs with no download,
and saved in the Hugging Face layout so that the real loading code reads them
(``python bench/tiny_parts.py OUT --kind sd|sdxl|unclip``). Nothing in the pipeline imports
this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    DDPMScheduler,
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


def byte_tokenizer() -> CLIPTokenizer:
    """CLIP tokenizer over an in-memory byte-level vocabulary (every byte, alone and
    word-final), so that no text maps to unknown."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(tokens)}, merges=[],
                         model_max_length=77)


def tiny_autoencoder(latent_channels: int = 4, seed: int = 0) -> AutoencoderTiny:
    """A tiny random ``AutoencoderTiny`` matching ``tiny_unclip_components``' VAE (latent =
    image / 2), for tests and benchmarks of the tiny guidance decoder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderTiny(encoder_block_out_channels=(16, 16),
                               decoder_block_out_channels=(16, 16), num_encoder_blocks=(1, 1),
                               num_decoder_blocks=(1, 1), latent_channels=latent_channels)


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
        tokenizer = byte_tokenizer()
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
        tokenizer = byte_tokenizer()
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
        tokenizer, tokenizer_2 = byte_tokenizer(), byte_tokenizer()
        return {"unet": unet, "vae": _vae(), "tokenizer": tokenizer,
                "text_encoder": CLIPTextModel(_text_config(tokenizer)),
                "tokenizer_2": tokenizer_2,
                "text_encoder_2": CLIPTextModelWithProjection(
                    _text_config(tokenizer_2, projection_dim=WIDTH)),
                "scheduler": ddim_scheduler("epsilon")}


def save_tiny(out: Path, kind: str = "sd", seed: int = 0, prediction_type: str = "epsilon"
              ) -> Path:
    """Tiny random parts of ``kind`` (``sd``, ``sdxl``, ``unclip``) saved by diffusers' own
    pipeline in its folder layout, where ``generator.pretrained`` can name them."""
    from diffusers import (
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        StableUnCLIPImg2ImgPipeline,
    )

    if kind == "unclip":
        pipeline = StableUnCLIPImg2ImgPipeline(**tiny_unclip_components(seed))
    elif kind == "sd":
        pipeline = StableDiffusionPipeline(**tiny_sd_components(seed, prediction_type),
                                           safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    else:
        pipeline = StableDiffusionXLPipeline(**tiny_sdxl_components(seed), add_watermarker=False)
    pipeline.save_pretrained(out)
    return Path(out)


# -- tiny language models for mining -----------------------------------------------------------

WORDS = ("a an the of that with and in on at photo image describe this one sentence shows dark "
         "light red green blue white black grey small large round thin thick bright blurry "
         "stroke digit shape background left right top bottom curved straight line lines loop "
         "open closed sharp faint pale wide narrow tilted upright corner center edge ground "
         "sky sand grass texture pattern smooth rough . , :").split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}user : "
    "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endif %}{% else %}assistant : {% if m['content'] is string %}{{ m['content'] }} "
    "{% else %}{% for c in m['content'] %}{{ c['text'] }} {% endfor %}{% endif %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")


def word_tokenizer() -> Any:
    """A word-level fast tokenizer over ``WORDS`` (and ``user``, ``assistant``, ``<image>``)
    with a chat template, built in memory: a tiny random model's text is then words."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*special, "user", "assistant", *WORDS]))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   extra_special_tokens={"image_token": "<image>"})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _llama_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def save_tiny_vlm(out: Path, seed: int = 0) -> Path:
    """A tiny random LLaVA (CLIP vision tower, Llama text model, word-level tokenizer) saved
    with its processor, where ``mining.vlm`` can name it."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = word_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                              num_attention_heads=2, image_size=16, patch_size=8,
                              projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=_llama_config(tokenizer),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                           crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return Path(out)


def save_tiny_llm(out: Path, seed: int = 0) -> Path:
    """A tiny random Llama causal language model with the word-level tokenizer and its chat
    template, where ``mining.llm`` can name it."""
    from transformers import LlamaForCausalLM

    tokenizer = word_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(_llama_config(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)
