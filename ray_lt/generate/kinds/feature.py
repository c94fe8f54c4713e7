"""``feature`` (LDMLR): a class-conditional denoiser over the baseline classifier's features,
trained here as a Ray task (``ray_lt.generate.feature``); its samples are feature vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ray_lt.config import Config
from ray_lt.errors import ConfigError, require_stage
from ray_lt.generate.kinds.base import TrainedKind
from ray_lt.train.trainer import MODEL_FILE


class FeatureKind(TrainedKind):
    name = "feature"

    def check_config(self, cfg: Config) -> None:
        if cfg.synthesis.filter.enabled:
            raise ConfigError("synthesis.filter.enabled: filtering works on images; the feature "
                              "generator writes feature vectors")
        if cfg.rounds.count > 1:
            raise ConfigError("rounds.count: the feature generator (LDMLR) fine-tunes a head on "
                              "pseudo-features; closed-loop rounds fine-tune an image "
                              "classifier between rounds: set rounds.count: 1")
        if cfg.final.init == "scratch":
            raise ConfigError("final.init: the feature generator (LDMLR) fine-tunes the "
                              "baseline's head on pseudo-features; set final.init: baseline")

    def train(self, cfg: Config, out_dir: Path, data: Any) -> Path:
        import ray

        from ray_lt.generate.feature import train_feature_generator
        from ray_lt.generate.statistics import ensure_training_features, load_training_features

        g = cfg.generator
        classifier_dir = require_stage(Path(out_dir) / "classifier" / MODEL_FILE, "classifier",
                                       "ray-lt train").parent
        ensure_training_features(classifier_dir, data, cfg.evaluate)
        features, labels = load_training_features(classifier_dir)
        task = ray.remote(train_feature_generator).options(num_cpus=cfg.scaling.cpus_per_worker)
        return ray.get(task.remote(features, labels, data.num_classes, g.train_steps,
                                   g.batch_size, g.lr, g.label_dropout, cfg.seed,
                                   Path(out_dir) / "generator"))

    def build(self, cfg: Config, run_dir: Path, device: torch.device, info: dict[str, Any],
              sources: Any = None) -> Any:
        from ray_lt.generate.feature import FeatureGenerator

        return FeatureGenerator.from_pretrained(Path(run_dir) / "generator", device)


KIND = FeatureKind()
