"""The stages users run, each reading and writing one run directory.

``ray-lt <command>`` and ``jobs/<command>.py`` both call these functions; Python drivers can
too. A stage whose output is already complete in the run directory is not run again.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray._private.utils import read_ray_address

from ray_lt.config import Config, RayConfig, dump_config
from ray_lt.data import LongTailData, load_dataset
from ray_lt.errors import ConfigError
from ray_lt.evaluate import evaluate_classifier
from ray_lt.generate.base import SPEC_FILE as GENERATOR_SPEC
from ray_lt.generate.feature import train_feature_generator
from ray_lt.generate.pixel import fit_pixel_generator
from ray_lt.generate.statistics import FEATURES_FILE, fit_criterion_support
from ray_lt.generate.synthesize import filter_synthetic, require_stage
from ray_lt.generate.synthesize import synthesize as run_synthesis
from ray_lt.train import fit_classifier
from ray_lt.train.trainer import MODEL_FILE

SUMMARY_KEYS = ("overall", "many", "medium", "few", "worst_group")


def _reachable(address: str, timeout: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def ray_address(configured: str | None) -> str | None:
    """Where ``ray.init`` should connect: ``ray.address``, else RAY_ADDRESS (``ray job submit``
    sets it), else the cluster last started on this machine if it is still alive, else
    ``"local"`` (start Ray here).

    Left to itself ``ray.init()`` also tries the last cluster started on this machine, and
    when that cluster is gone it retries for minutes before failing.
    """
    if configured or os.environ.get("RAY_ADDRESS"):
        return configured
    last = read_ray_address()
    return last if last and _reachable(last) else "local"


def init_ray(cfg: RayConfig) -> None:
    """Connect to the configured cluster, to RAY_ADDRESS (ray job submit), or start Ray here."""
    if not ray.is_initialized():
        ray.init(address=ray_address(cfg.address), ignore_reinit_error=True,
                 runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}})


def prepare(cfg: Config, out_dir: Path) -> tuple[Path, LongTailData]:
    """Record the config in the run directory, start Ray, load and check the data."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out_dir / "config.yaml")
    init_ray(cfg.ray)
    return out_dir, load_dataset(cfg.dataset, cfg.seed)


def format_summary(metrics: dict[str, Any]) -> str:
    cells = [f"{k} {metrics[k]:.3f}" for k in SUMMARY_KEYS if metrics.get(k) is not None]
    return "  ".join(cells)


def train(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Train the classifier on the real data (unless already trained) and evaluate it on test.

    Writes ``classifier/`` (weights, spec, history), ``metrics.json``, ``predictions.parquet``
    and ``per_class_accuracy.png`` into ``out_dir``.
    """
    out_dir, data = prepare(cfg, out_dir)
    folder = out_dir / "classifier"
    if not (folder / MODEL_FILE).is_file():
        fit_classifier(data, cfg.model, cfg.train, cfg.scaling, cfg.seed, out_dir, "classifier")
    metrics = evaluate_classifier(folder, data, cfg.evaluate, out_dir)
    print(f"[ray-lt] test: {format_summary(metrics)}  -> {out_dir / 'metrics.json'}")
    return metrics


def criterion_support(cfg: Config, out_dir: Path, data: LongTailData) -> Path:
    """The baseline classifier's folder, with the class statistics and epistemic head that the
    criteria need (computed on first use); fails naming the stage when there is none."""
    classifier_dir = require_stage(out_dir / "classifier" / MODEL_FILE, "classifier",
                                   "ray-lt train").parent
    fit_criterion_support(classifier_dir, data, cfg.synthesis.epistemic_heads, cfg.evaluate,
                          cfg.seed)
    return classifier_dir


def train_generator(cfg: Config, out_dir: Path) -> Path:
    """Train the generator from scratch: ``pixel`` on the long-tailed images (DiffuLT, Ray
    Train), ``feature`` on the baseline classifier's training features (LDMLR, a Ray task)."""
    if cfg.generator.kind == "unclip":
        raise ConfigError("generator.kind: 'unclip' is not trained by train-generator (it loads "
                          "pretrained weights from generator.pretrained)")
    out_dir, data = prepare(cfg, out_dir)
    folder = out_dir / "generator"
    if (folder / GENERATOR_SPEC).is_file():
        print(f"[ray-lt] generator already trained: {folder}")
        return folder
    g = cfg.generator
    if g.kind == "feature":
        classifier_dir = criterion_support(cfg, out_dir, data)
        real = np.load(classifier_dir / FEATURES_FILE)
        task = ray.remote(train_feature_generator).options(num_cpus=cfg.scaling.cpus_per_worker)
        folder = ray.get(task.remote(real["features"], real["labels"], data.num_classes,
                                     g.train_steps, g.batch_size, g.lr, g.label_dropout,
                                     cfg.seed, folder))
    else:
        if g.condition_on != "class" and data.group_counts is None:
            raise ConfigError(f"generator.condition_on: {g.condition_on!r} needs a data set "
                              f"with groups")
        by_group = g.condition_on == "group"
        num_contexts = len(data.context_names) if g.condition_on == "class+context" else 0
        num_conditions = data.num_groups if by_group else data.num_classes
        folder = fit_pixel_generator(data.train, g, cfg.scaling, data.image_shape,
                                     num_conditions, cfg.seed, out_dir,
                                     num_contexts=num_contexts)
    print(f"[ray-lt] generator trained: {folder}")
    return folder


def synthesize(cfg: Config, out_dir: Path) -> Path:
    """Sample the quota of feedback-guided synthetic images into ``out_dir/synthetic``."""
    out_dir, data = prepare(cfg, out_dir)
    criterion_support(cfg, out_dir, data)
    counts = run_synthesis(cfg, data, out_dir)
    print(f"[ray-lt] synthetic rows: {int(counts['written'].sum())} in "
          f"{out_dir / 'synthetic'}")
    if cfg.synthesis.filter.enabled:
        report = filter_synthetic(out_dir, data, cfg)
        print(f"[ray-lt] filter dropped {int(report['dropped'].sum())} of "
              f"{int(report['generated'].sum())} samples; per class:\n{report.to_string()}")
    return out_dir / "synthetic"


def grid(cfg: Config, out_dir: Path) -> Path:
    """PNG grid of one class's samples: rows = criteria, columns = guidance scales."""
    from ray_lt.generate.grid import render_grid, save_grid
    from ray_lt.generate.synthesize import check_generator, data_info

    out_dir, data = prepare(cfg, out_dir)
    criterion_support(cfg, out_dir, data)
    check_generator(cfg, out_dir)
    s = cfg.synthesis
    label = s.grid_class if s.grid_class >= 0 else int(data.class_counts.argmin())
    if label >= data.num_classes:
        raise ConfigError(f"synthesis.grid_class: {label} is not a class of this data set")
    task = ray.remote(render_grid).options(num_cpus=s.cpus_per_actor, num_gpus=s.gpus_per_actor)
    images = ray.get(task.remote(cfg.model_dump(mode="json"), str(out_dir),
                                 data_info(cfg, data), label, s.gpus_per_actor > 0))
    path = save_grid(images, list(s.grid_criteria), [f"scale {x:g}" for x in s.grid_scales],
                     out_dir / f"grid_class{label}.png",
                     title=f"{data.class_names[label]}: criterion x guidance scale")
    print(f"[ray-lt] sample grid: {path}")
    return path
