"""Pretrained Stable Diffusion folders in the diffusers layout, read offline: where a
``generator.pretrained`` path or cached model id lives, what pipeline it holds, whether every
component folder of the kind is there, and loading them through diffusers' own pipelines.

Nothing here downloads: a model id resolves only to a snapshot already in the local Hugging
Face cache.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    StableUnCLIPImg2ImgPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
    StableUnCLIPImageNormalizer,
)
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ray_lt.errors import ConfigError
from ray_lt.generate.base import SPEC_FILE

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_WEIGHTED = (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection,
             CLIPVisionModelWithProjection)


@dataclass(frozen=True)
class Layout:
    """What a generator kind reads: the diffusers pipeline class (and the others whose folders
    hold the same components), an example model, and its component folders -> classes."""

    pipeline: type
    example: str
    components: dict[str, type]
    also: tuple[str, ...] = ()


_TEXT = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
         "tokenizer": CLIPTokenizer, "scheduler": DDIMScheduler}
LAYOUTS: dict[str, Layout] = {
    "unclip": Layout(StableUnCLIPImg2ImgPipeline, "stabilityai/stable-diffusion-2-1-unclip", {
        **_TEXT, "image_encoder": CLIPVisionModelWithProjection,
        "feature_extractor": CLIPImageProcessor, "image_normalizer": StableUnCLIPImageNormalizer,
        "image_noising_scheduler": DDPMScheduler}),
    "sd": Layout(StableDiffusionPipeline, "stable-diffusion-v1-5/stable-diffusion-v1-5", _TEXT,
                 also=("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")),
    "sdxl": Layout(StableDiffusionXLPipeline, "stabilityai/stable-diffusion-xl-base-1.0", {
        **_TEXT, "text_encoder_2": CLIPTextModelWithProjection, "tokenizer_2": CLIPTokenizer},
        also=("StableDiffusionXLImg2ImgPipeline",)),
}


def kind_reading(pipeline: str) -> str | None:
    """The generator kind that reads a folder whose model_index.json names ``pipeline``."""
    for kind, layout in LAYOUTS.items():
        if pipeline == layout.pipeline.__name__ or pipeline in layout.also:
            return kind
    return None


def resolve(path: str | Path, kind: str) -> Path:
    """A local folder, or a model id's snapshot in the local Hugging Face cache (never
    fetched)."""
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
                      f"downloaded, give a local folder laid out like {LAYOUTS[kind].example}")


def check_folder(path: str | Path, kind: str) -> Path:
    """The resolved folder, after checking (cheaply: nothing is loaded) that it holds the
    pipeline generator.kind ``kind`` reads, with every component folder; a folder of another
    pipeline or of a generator trained by ray-lt is named for what it holds."""
    layout = LAYOUTS[kind]
    name = layout.pipeline.__name__
    root = resolve(path, kind)
    if (root / SPEC_FILE).is_file():
        held = json.loads((root / SPEC_FILE).read_text()).get("kind")
        raise ConfigError(f"generator.pretrained: {root} holds a {held!r} generator trained by "
                          f"ray-lt ({SPEC_FILE}), not a {name}; to sample from it set "
                          f"generator.kind: {held} and --out to the run folder it was trained in")
    index = root / "model_index.json"
    pipeline = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if pipeline is not None and kind_reading(pipeline) != kind:
        reader = kind_reading(pipeline)
        fix = (f"set generator.kind: {reader}" if reader else
               "no generator kind reads it (" + ", ".join(
                   f"{k}: {v.pipeline.__name__}" for k, v in LAYOUTS.items()) + ")")
        raise ConfigError(f"generator.pretrained: {root} holds a {pipeline} (model_index.json), "
                          f"not the {name} that generator.kind {kind} reads; {fix}")
    missing = [part for part in layout.components if not (root / part).is_dir()]
    if missing:
        holds = f" (its model_index.json names a {pipeline})" if pipeline else ""
        raise ConfigError(f"generator.pretrained: {root}{holds} lacks the component folder(s) "
                          f"{missing} of a {name}; expected {list(layout.components)} (weights "
                          f"are never downloaded)")
    for part in layout.components:
        problem = _component_problem(root / part)
        if problem:
            raise ConfigError(f"generator.pretrained: component folder {root / part} {problem} "
                              f"of a {name}; copy the whole folder again (weights are never "
                              f"downloaded)")
    return root


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _component_problem(folder: Path) -> str:
    """What a component folder lacks, "" when it holds a config (``*.json``) and, for a
    model (``config.json``), a weights file: checked without loading anything."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    if not any(n.endswith(".json") for n in names):
        return ("is empty" if not names else "holds no config file (*.json)") + \
            ", but it is a component"
    if "config.json" in names and not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        return ("holds config.json but no weights (*.safetensors or *.bin), which it needs as "
                "a component")
    return ""


def load_parts(path: str | Path, kind: str, dtype: torch.dtype = torch.float32
               ) -> dict[str, Any]:
    """Every component of ``kind`` from its folder, offline, through diffusers' own pipeline
    loader (a Stable Diffusion's safety checker is not loaded: synthesis never uses it)."""
    layout = LAYOUTS[kind]
    root = check_folder(path, kind)
    extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "sd" else {}
    try:
        pipeline = layout.pipeline.from_pretrained(root, local_files_only=True, dtype=dtype,
                                                   **extra)
    except (OSError, ValueError, TypeError) as err:
        for part in layout.components:  # name the component that fails on its own, if one does
            load_component(root, kind, part, dtype)
        raise ConfigError(f"generator.pretrained: {root} could not be loaded offline as a "
                          f"{layout.pipeline.__name__} ({err}); weights are never downloaded"
                          ) from None
    parts = {part: pipeline.components[part] for part in layout.components}
    parts["pipeline_config"] = dict(pipeline.config)
    return parts


def load_component(path: str | Path, kind: str, part: str,
                   dtype: torch.dtype = torch.float32) -> Any:
    """One component (a folder of ``LAYOUTS[kind]``), offline."""
    root = check_folder(path, kind)
    cls = LAYOUTS[kind].components[part]
    kwargs: dict[str, Any] = {"subfolder": part, "local_files_only": True}
    if cls in _WEIGHTED:
        kwargs["dtype"] = dtype
    try:
        return cls.from_pretrained(root, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(f"generator.pretrained: component {part!r} in {root / part} could "
                          f"not be loaded offline ({err}); weights are never downloaded"
                          ) from None


def check_tiny_decoder(path: str | Path | None) -> Path:
    folder = Path(path or "").expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"synthesis.tiny_decoder: {folder} holds no config.json of an "
                          "AutoencoderTiny (weights are never downloaded; fetch e.g. "
                          "madebyollin/taesd, or madebyollin/taesdxl for SDXL, into a local "
                          "folder)")
    return folder


def load_tiny_decoder(path: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderTiny:
    """An ``AutoencoderTiny`` (TAESD / TAESDXL weights) from a local folder, offline, for
    ``synthesis.guidance_decoder: tiny``."""
    folder = check_tiny_decoder(path)
    try:
        return AutoencoderTiny.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ConfigError(f"synthesis.tiny_decoder: {folder} could not be loaded as an "
                          f"AutoencoderTiny ({err})") from None
