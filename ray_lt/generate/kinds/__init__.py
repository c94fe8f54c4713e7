"""Generator kinds by name (``generator.kind``): each is one module holding its hooks
(``ray_lt.generate.kinds.base``), with its config section in ``ray_lt.config.GENERATOR_SECTIONS``
(whose class constants say what it outputs, whether it is latent and whether it is trained
here). The rest of the pipeline calls these hooks and never branches on a kind's name.

Adding a kind: its section in ``ray_lt.config``, its module here, and one line in ``KINDS``.
"""

from __future__ import annotations

from ray_lt.config import Config
from ray_lt.generate.kinds import feature, pixel, sd, sdxl, unclip
from ray_lt.generate.kinds.base import GeneratorKind

KINDS: dict[str, GeneratorKind] = {
    "pixel": pixel.KIND,
    "feature": feature.KIND,
    "unclip": unclip.KIND,
    "sd": sd.KIND,
    "sdxl": sdxl.KIND,
}


def generator_kind(cfg: Config) -> GeneratorKind:
    """The hooks of ``cfg.generator.kind``."""
    return KINDS[cfg.generator.kind]
