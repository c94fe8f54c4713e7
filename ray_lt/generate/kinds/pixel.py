"""``pixel`` (DiffuLT): a class- or group-conditional UNet2DModel trained here on Ray Train
(``ray_lt.generate.pixel``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ray_lt.config import Config
from ray_lt.data.external import pool_summary
from ray_lt.errors import ConfigError
from ray_lt.generate.kinds.base import TrainedKind


class PixelKind(TrainedKind):
    name = "pixel"

    def train(self, cfg: Config, out_dir: Path, data: Any) -> Path:
        from ray_lt.generate.pixel import fit_pixel_generator

        g = cfg.generator
        if g.condition_on != "class" and data.group_counts is None:
            raise ConfigError(f"generator.condition_on: {g.condition_on!r} needs a data set "
                              f"with groups")
        by_group = g.condition_on == "group"
        num_contexts = len(data.context_names) if g.condition_on == "class+context" else 0
        num_conditions = data.num_groups if by_group else data.num_classes
        pool = pool_summary(cfg, data)
        if g.train_on == "external" and pool is None:
            raise ConfigError("generator.train_on: external, but no pool was read (load the "
                              "data with ray_lt.data.external.attach_external)")
        trained_on = ({"source": "long_tail", "images": int(data.class_counts.sum())}
                      if pool is None else {"source": "external", **pool.as_dict()})
        return fit_pixel_generator(data.split("external") if pool is not None else data.train, g,
                                   cfg.scaling, data.image_shape, num_conditions, cfg.seed,
                                   out_dir, num_contexts=num_contexts, trained_on=trained_on)

    def build(self, cfg: Config, run_dir: Path, device: torch.device, info: dict[str, Any],
              sources: Any = None) -> Any:
        from ray_lt.generate.pixel import PixelGenerator

        return PixelGenerator.from_pretrained(Path(run_dir) / "generator", device, sources)


KIND = PixelKind()
