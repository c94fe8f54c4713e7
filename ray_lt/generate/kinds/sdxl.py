"""``sdxl``: Stable Diffusion XL text-to-image from a ``StableDiffusionXLPipeline`` folder
(``ray_lt.generate.stable_diffusion``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray_lt.config import Config
from ray_lt.generate.kinds.base import PretrainedKind


class StableDiffusionXLKind(PretrainedKind):
    name = "sdxl"

    def load(self, cfg: Config, run_dir: Path, options: dict[str, Any]) -> Any:
        from ray_lt.generate.stable_diffusion import StableDiffusionXLGenerator

        return StableDiffusionXLGenerator.from_pretrained(cfg.generator.pretrained, **options)


KIND = StableDiffusionXLKind()
