"""Building the configured generator and criterion scorer inside a worker (sampler actor, grid
task), and the cheap checks that fail on a missing stage before any actor starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ray_lt.config import Config
from ray_lt.errors import ConfigError, require_stage
from ray_lt.generate.base import SPEC_FILE
from ray_lt.generate.criteria import CriterionScorer
from ray_lt.generate.feature import FeatureGenerator
from ray_lt.generate.pixel import PixelGenerator
from ray_lt.generate.references import REFERENCES_DIR, load_references
from ray_lt.generate.statistics import load_context_head, load_criterion_support
from ray_lt.train.trainer import MODEL_FILE, load_classifier

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def generator_info(class_names: list[str], context_names: list[str], image_size: int
                   ) -> dict[str, Any]:
    """What a worker needs to know about the data set to build its generator: names and the
    image size, nothing that grows with the number of images."""
    return {"class_names": list(class_names), "context_names": list(context_names),
            "image_size": int(image_size)}


def build_generator(cfg: Config, run_dir: Path, device: torch.device,
                    info: dict[str, Any]) -> Any:
    """The configured generator: trained in the run directory (pixel, feature) or pretrained
    (unclip, with the references stored in the run directory)."""
    g = cfg.generator
    if g.kind == "pixel":
        folder = require_stage(run_dir / "generator", "generator", "ray-lt train-generator")
        return PixelGenerator.from_pretrained(folder, device)
    if g.kind == "feature":
        folder = require_stage(run_dir / "generator", "generator", "ray-lt train-generator")
        return FeatureGenerator.from_pretrained(folder, device)
    if g.kind == "unclip":
        from ray_lt.generate.unclip import UnCLIPGenerator, load_tiny_decoder

        s = cfg.synthesis
        dtype = (PRECISIONS[s.precision] if device.type == "cuda" else None) or torch.float32
        tiny = load_tiny_decoder(s.tiny_decoder, dtype) if s.guidance_decoder == "tiny" else None
        generator = UnCLIPGenerator.from_pretrained(
            g.pretrained, device=device, dtype=dtype,
            class_names=info["class_names"], context_names=info["context_names"],
            references=load_references(Path(run_dir) / REFERENCES_DIR),
            prompt_template=g.prompt_template, embedding_dropout=g.embedding_dropout,
            noise_level=g.noise_level, image_size=info["image_size"], height=g.height,
            width=g.width, guidance_decoder=s.guidance_decoder, tiny_decoder=tiny,
            decoder_checkpointing=s.decoder_checkpointing)
        if s.compile:
            generator.compile(s.compile_mode)
        return generator
    raise ConfigError(f"generator.kind: {g.kind!r} is not available for synthesis yet")


def _check_trained(kind: str, folder: Path) -> None:
    """Fail, loading nothing, when ``folder`` (``DIR/generator``) holds no trained generator of
    ``kind``: a missing stage, another kind, or pretrained weights copied there."""
    require_stage(folder, "generator", "ray-lt train-generator")
    spec, index = folder / SPEC_FILE, folder / "model_index.json"
    if spec.is_file():
        held = json.loads(spec.read_text()).get("kind")
        if held != kind:
            raise ConfigError(f"generator.kind: {kind!r}, but {folder} holds a trained {held!r} "
                              f"generator ({SPEC_FILE}); set generator.kind: {held}, or use "
                              f"another --out to train a {kind} generator")
    elif index.is_file():
        pipeline = json.loads(index.read_text()).get("_class_name")
        raise ConfigError(f"generator.kind: {kind!r}, but {folder} holds pretrained weights of "
                          f"a {pipeline} (model_index.json), not a generator trained by "
                          f"`ray-lt train-generator`; for unCLIP weights set generator.kind: "
                          f"unclip and generator.pretrained to that folder")


def check_generator(cfg: Config, run_dir: Path) -> None:
    """Fail on a missing generator or one of another kind before any actor starts (loads no
    weights)."""
    if cfg.generator.kind in ("pixel", "feature"):
        _check_trained(cfg.generator.kind, Path(run_dir) / "generator")
    elif cfg.generator.kind == "unclip":
        from ray_lt.generate.unclip import check_pretrained

        if cfg.generator.pretrained is None:
            raise ConfigError("generator.pretrained: set the local folder (or cached hub id) of "
                              "Stable Diffusion 2.1 unCLIP")
        check_pretrained(cfg.generator.pretrained)
        if cfg.synthesis.guidance_decoder == "tiny":
            folder = Path(cfg.synthesis.tiny_decoder).expanduser()
            if not (folder / "config.json").is_file():
                raise ConfigError(f"synthesis.tiny_decoder: {folder} holds no config.json of "
                                  "an AutoencoderTiny (weights are never downloaded)")
    else:
        raise ConfigError(f"generator.kind: {cfg.generator.kind!r} is not available for "
                          f"synthesis yet")


def build_scorer(cfg: Config, run_dir: Path, device: torch.device,
                 names: list[str] | None = None, classifier_dir: Path | None = None
                 ) -> CriterionScorer:
    """The classifier in ``classifier_dir`` (default: the baseline, ``run_dir/classifier``)
    scoring ``names`` (default: those of ``synthesis.criteria``)."""
    classifier_dir = Path(classifier_dir or Path(run_dir) / "classifier")
    require_stage(classifier_dir / MODEL_FILE, "classifier", "ray-lt train")
    statistics, head = load_criterion_support(classifier_dir)
    names = names or list(cfg.synthesis.criteria)
    inputs = "features" if cfg.generator.kind == "feature" else "images"
    context_head = load_context_head(classifier_dir)
    return CriterionScorer(load_classifier(classifier_dir, device), names, statistics, head,
                           inputs=inputs, context_head=context_head).to(device)


def check_scorer(cfg: Config, run_dir: Path, names: list[str] | None = None,
                 classifier_dir: Path | None = None) -> None:
    """Fail, loading nothing, when the classifier or what the criteria need beside it (class
    statistics, epistemic head) is missing from the run directory."""
    from ray_lt.generate.criteria import CRITERIA
    from ray_lt.generate.statistics import CONTEXT_HEAD_FILE, HEAD_FILE, STATISTICS_FILE

    classifier_dir = Path(classifier_dir or Path(run_dir) / "classifier")
    require_stage(classifier_dir / MODEL_FILE, "classifier", "ray-lt train")
    files = {"statistics": STATISTICS_FILE, "epistemic_head": HEAD_FILE,
             "context_head": CONTEXT_HEAD_FILE}
    for name in names or list(cfg.synthesis.criteria):
        needs = CRITERIA[name].needs
        if needs is not None:
            require_stage(classifier_dir / files[needs], f"criterion support ({name})",
                          "ray-lt synthesize")
