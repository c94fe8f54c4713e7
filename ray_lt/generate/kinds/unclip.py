"""``unclip``: Stable Diffusion 2.1 unCLIP (FG's setting), text + the CLIP image embedding of
a real training image, whose references are embedded once per run (``ray_lt.generate.unclip``,
``ray_lt.generate.references``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray_lt.config import Config
from ray_lt.generate.kinds.base import PretrainedKind


class UnCLIPKind(PretrainedKind):
    name = "unclip"

    def prepare(self, cfg: Config, data: Any, run_dir: Path) -> None:
        """Choose the reference rows by index with the config seed and store their CLIP image
        embeddings in ``DIR/references/`` (once; redone when their settings change)."""
        from ray_lt.generate.references import (
            REFERENCES_DIR,
            choose_references,
            embed_references,
            reference_settings,
        )

        super().prepare(cfg, data, run_dir)
        g, s = cfg.generator, cfg.synthesis
        index = data.train_index
        settings = reference_settings(g.pretrained, g.references_per_group, cfg.seed,
                                      data.image_shape[0])
        chosen = choose_references(index["label"].to_numpy(), index["group"].to_numpy(),
                                   g.references_per_group, cfg.seed)
        column = "path" if data.root is not None else "image"
        chosen[column] = index[column].to_numpy()[chosen["row"].to_numpy()]
        embed_references(chosen, Path(run_dir) / REFERENCES_DIR, settings, data.root,
                         data.image_shape[2], s.reference_pool, s.precision)

    def load(self, cfg: Config, run_dir: Path, options: dict[str, Any]) -> Any:
        from ray_lt.generate.references import REFERENCES_DIR, load_references
        from ray_lt.generate.unclip import UnCLIPGenerator

        g = cfg.generator
        return UnCLIPGenerator.from_pretrained(
            g.pretrained, references=load_references(run_dir / REFERENCES_DIR),
            embedding_dropout=g.embedding_dropout, noise_level=g.noise_level, **options)


KIND = UnCLIPKind()
