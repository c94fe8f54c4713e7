"""``sd``: Stable Diffusion 1.x / 2.x text-to-image from a ``StableDiffusionPipeline`` folder
(LTG's SD 1.4; ``ray_lt.generate.stable_diffusion``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray_lt.config import Config
from ray_lt.generate.kinds.base import PretrainedKind


class StableDiffusionKind(PretrainedKind):
    name = "sd"

    def load(self, cfg: Config, run_dir: Path, options: dict[str, Any]) -> Any:
        from ray_lt.generate.stable_diffusion import StableDiffusionGenerator

        return StableDiffusionGenerator.from_pretrained(cfg.generator.pretrained, **options)


KIND = StableDiffusionKind()
