"""The hooks a generator kind provides, and the shared halves of the trained and the
pretrained kinds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ray_lt.config import Config
from ray_lt.errors import ConfigError, require_stage
from ray_lt.generate.base import PRECISIONS, SPEC_FILE

if TYPE_CHECKING:
    from ray_lt.data import LongTailData
    from ray_lt.generate.base import Generator


class GeneratorKind:
    """The hooks of one generator kind; the defaults are those of a kind with nothing to do."""

    name: str = ""

    def check_config(self, cfg: Config) -> None:
        """Refuse settings of other sections this kind cannot honour (before Ray starts)."""

    def check(self, cfg: Config, run_dir: Path | None) -> None:
        """Fail, loading nothing, when the weights to sample from are missing or of another
        kind (before any actor starts); ``run_dir`` holds those trained here."""

    def train(self, cfg: Config, out_dir: Path, data: LongTailData) -> Path:
        """Train the generator into ``out_dir/generator`` and return that folder (kinds whose
        section says ``TRAINED``)."""
        raise NotImplementedError

    def prepare(self, cfg: Config, data: LongTailData, run_dir: Path) -> None:
        """Per-run inputs the sampler actors read from the run directory (references)."""

    def build(self, cfg: Config, run_dir: Path, device: torch.device, info: dict[str, Any],
              sources: Any = None) -> Generator:
        """The generator on ``device``, for sampling (``sources``: img2img's)."""
        raise NotImplementedError


class TrainedKind(GeneratorKind):
    """A kind trained here into ``DIR/generator`` (with a ``generator.json`` naming it)."""

    def check(self, cfg: Config, run_dir: Path | None) -> None:
        folder = require_stage(Path(run_dir) / "generator", "generator",
                               "ray-lt train-generator")
        spec, index = folder / SPEC_FILE, folder / "model_index.json"
        if spec.is_file():
            held = json.loads(spec.read_text()).get("kind")
            if held != self.name:
                raise ConfigError(f"generator.kind: {self.name!r}, but {folder} holds a trained "
                                  f"{held!r} generator ({SPEC_FILE}); set generator.kind: "
                                  f"{held}, or use another --out to train a {self.name} "
                                  f"generator")
        elif index.is_file():
            pipeline = json.loads(index.read_text()).get("_class_name")
            from ray_lt.generate.pretrained import kind_reading

            reader = kind_reading(pipeline) or "unclip, sd or sdxl"
            raise ConfigError(f"generator.kind: {self.name!r}, but {folder} holds pretrained "
                              f"weights of a {pipeline} (model_index.json), not a generator "
                              f"trained by `ray-lt train-generator`; for those weights set "
                              f"generator.kind: {reader} and generator.pretrained to that "
                              f"folder")


class PretrainedKind(GeneratorKind):
    """A pretrained Stable Diffusion read from ``generator.pretrained`` (never downloaded)."""

    def check(self, cfg: Config, run_dir: Path | None) -> None:
        from ray_lt.generate.pretrained import LAYOUTS, check_folder, check_tiny_decoder

        g = cfg.generator
        if g.pretrained is None:
            raise ConfigError(f"generator.pretrained: set the local folder (or cached hub id) "
                              f"of a {LAYOUTS[self.name].pipeline.__name__}, e.g. "
                              f"{LAYOUTS[self.name].example}")
        check_folder(g.pretrained, self.name)
        if cfg.synthesis.guidance_decoder == "tiny":
            check_tiny_decoder(cfg.synthesis.tiny_decoder)

    def prepare(self, cfg: Config, data: LongTailData, run_dir: Path) -> None:
        if cfg.generator.prompts_file is not None:  # every line checked before any sampling
            from ray_lt.generate.prompts import read_prompts_file

            read_prompts_file(cfg.generator.prompts_file, data.class_names)

    def options(self, cfg: Config, device: torch.device, info: dict[str, Any],
                sources: Any) -> dict[str, Any]:
        """What every pretrained generator's constructor takes from the config."""
        from ray_lt.generate.pretrained import load_tiny_decoder
        from ray_lt.generate.prompts import read_prompts_file

        g, s = cfg.generator, cfg.synthesis
        dtype = (PRECISIONS[s.precision] if device.type == "cuda" else None) or torch.float32
        tiny = load_tiny_decoder(s.tiny_decoder, dtype) if s.guidance_decoder == "tiny" else None
        by_class = (read_prompts_file(g.prompts_file, info["class_names"])
                    if g.prompts_file is not None else None)
        return {"device": device, "dtype": dtype, "class_names": info["class_names"],
                "context_names": info["context_names"], "prompts": g.prompts,
                "prompts_by_class": by_class, "negative_prompt": g.negative_prompt,
                "image_size": info["image_size"], "height": g.height, "width": g.width,
                "guidance_decoder": s.guidance_decoder, "tiny_decoder": tiny,
                "decoder_checkpointing": s.decoder_checkpointing, "sources": sources}

    def build(self, cfg: Config, run_dir: Path, device: torch.device, info: dict[str, Any],
              sources: Any = None) -> Generator:
        generator = self.load(cfg, Path(run_dir), self.options(cfg, device, info, sources))
        if cfg.synthesis.compile:
            generator.compile(cfg.synthesis.compile_mode)
        return generator

    def load(self, cfg: Config, run_dir: Path, options: dict[str, Any]) -> Generator:
        """The kind's generator from ``generator.pretrained`` with the shared ``options``."""
        raise NotImplementedError
