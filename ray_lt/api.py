"""The Python API, what ``import ray_lt`` gives a driver or a notebook: the commands of
``ray-lt`` as functions, and ``open_run`` for what a run directory holds.

    import ray_lt

    cfg = ray_lt.load_config("configs/digits_lt.yaml", ["train.epochs=10"])
    metrics = ray_lt.run(cfg, "runs/digits_lt")        # the final classifier's test metrics
    run = ray_lt.open_run("runs/digits_lt")
    run.metrics("baseline")["few"], run.metrics()["few"]
    run.synthetic()                                    # the synthetic set, a Ray Dataset
    run.sample(label=9, n=8, scale=0.1)                # (8, H, W, C) uint8, guided, here

A config is a ``Config``, a YAML path or a mapping; ``overrides`` are ``--set`` strings.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

from ray_lt import commands
from ray_lt.config import Config, config_from_dict, load_config
from ray_lt.errors import ConfigError, require_stage
from ray_lt.log import setup_console
from ray_lt.stages import timings

__all__ = ["Run", "grid", "load_config", "mine", "open_run", "run", "synthesize", "train",
           "train_generator", "tune"]

ConfigLike = Config | str | Path | dict[str, Any]


def _config(config: ConfigLike, overrides: list[str] | None) -> Config:
    if isinstance(config, Config):
        if overrides:
            return config_from_dict(
                _apply(config.model_dump(mode="json"), overrides), source="config")
        return config
    if isinstance(config, dict):
        return config_from_dict(_apply(config, overrides or []), source="config")
    return load_config(config, overrides)


def _apply(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    from ray_lt.config import apply_overrides

    return apply_overrides(json.loads(json.dumps(raw)), overrides)


def _command(body: Any, config: ConfigLike, out: str | Path, overrides: list[str] | None,
             **options: Any) -> Any:
    setup_console()  # ray_lt's lines on stdout, Ray's own at WARNING, as ray-lt prints them
    return body(_config(config, overrides), Path(out), **options)


def run(config: ConfigLike, out: str | Path, overrides: list[str] | None = None,
        sequential: bool = False) -> dict[str, Any]:
    """``ray-lt run``: every stage into ``out`` (side by side where they can be; one at a
    time with ``sequential``); the final classifier's test metrics."""
    return _command(commands.run, config, out, overrides, sequential=sequential)


def train(config: ConfigLike, out: str | Path, overrides: list[str] | None = None
          ) -> dict[str, Any]:
    """``ray-lt train``: the baseline classifier and its test metrics."""
    return _command(commands.train, config, out, overrides)


def train_generator(config: ConfigLike, out: str | Path, overrides: list[str] | None = None
                    ) -> Path:
    """``ray-lt train-generator``: the generator trained into ``out/generator``."""
    return _command(commands.train_generator, config, out, overrides)


def synthesize(config: ConfigLike, out: str | Path, overrides: list[str] | None = None
               ) -> Path:
    """``ray-lt synthesize``: guided samples to the quota in ``out/synthetic``."""
    return _command(commands.synthesize, config, out, overrides)


def grid(config: ConfigLike, out: str | Path, overrides: list[str] | None = None
         ) -> Path | None:
    """``ray-lt grid``: the sample grid PNG (criteria x guidance scales)."""
    return _command(commands.grid, config, out, overrides)


def mine(config: ConfigLike, out: str | Path, overrides: list[str] | None = None) -> Path:
    """``ray-lt mine``: the last round's gaps in words and prompts made of them; the prompts
    file ``out/mining/round<r>/prompts.jsonl``."""
    return _command(commands.mine, config, out, overrides)


def tune(config: ConfigLike, out: str | Path, overrides: list[str] | None = None) -> Any:
    """``ray-lt tune``: the search's result table (also ``out/tune/results.csv``)."""
    return _command(commands.tune, config, out, overrides)


def open_run(path: str | Path, overrides: list[str] | None = None) -> Run:
    """A handle on the run directory ``path`` (made by any command); ``overrides`` (``--set``
    strings) change its config for what the handle does, e.g. ``synthesis.num_steps=50`` for
    ``sample``."""
    return Run(path, overrides)


class Run:
    """What a run directory holds: its config, metrics, stage timings, synthetic set and
    classifiers, and guided samples drawn in this process from its generator and guide."""

    def __init__(self, path: str | Path, overrides: list[str] | None = None):
        self.path = Path(path).resolve()
        self.overrides = list(overrides or [])
        if not (self.path / "config.yaml").is_file():
            raise ConfigError(f"{self.path}: not a ray-lt run directory (no config.yaml; "
                              f"`ray-lt run CONFIG --out {path}` makes one)")
        self._drawers: dict[tuple, Any] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @cached_property
    def config(self) -> Config:
        """The config the run was made with (``DIR/config.yaml``), with the handle's
        overrides."""
        return load_config(self.path / "config.yaml", self.overrides)

    def metrics(self, model: str = "final", split: str = "test") -> dict[str, Any]:
        """The ``baseline`` or ``final`` classifier's metrics on ``split`` (val is written
        for the final classifier of tune trials)."""
        if model not in ("baseline", "final"):
            raise ValueError(f"model: 'baseline' or 'final', not {model!r}")
        folder = self.path if model == "baseline" else self.path / "final"
        where = folder if split == "test" else folder / split
        command = "ray-lt train" if model == "baseline" else "ray-lt run"
        return json.loads(require_stage(where / "metrics.json", f"{model} {split} metrics",
                                        command).read_text())

    def timings(self) -> dict[str, list[dict[str, Any]]]:
        """Every recorded measurement (seconds, driver peak RSS) per stage, oldest first."""
        return timings(self.path)

    def synthetic(self, filtered: bool = True) -> Any:
        """The synthetic set as a lazy Ray Dataset (``image`` decoded, or ``feature``, with
        label, group, criterion, guidance scale, seed, ...), without the rows the filter
        dropped unless ``filtered=False``; starts or joins Ray as the commands do."""
        from ray_lt.cluster import init_ray
        from ray_lt.generate.synthetic import load_synthetic

        init_ray(self.config.ray)
        return load_synthetic(self.path, self.config.dataset.channels, filtered=filtered)

    def classifier(self, model: str = "final", device: str = "cpu") -> Any:
        """The ``baseline`` or ``final`` classifier as a torch module in eval mode."""
        from ray_lt.train.trainer import MODEL_FILE, load_classifier

        folder = self.path / ("classifier" if model == "baseline" else "final/classifier")
        require_stage(folder / MODEL_FILE, f"{model} classifier",
                      "ray-lt train" if model == "baseline" else "ray-lt run")
        return load_classifier(folder, device).eval()

    @cached_property
    def _info(self) -> dict[str, Any]:
        from ray_lt.data import load_dataset
        from ray_lt.generate.factory import generator_info

        data = load_dataset(self.config.dataset, self.config.seed)
        return generator_info(data.class_names, data.context_names, data.image_shape[0])

    def sample(self, label: int, n: int = 8, *, criterion: str | None = None,
               scale: float | None = None, group: int = -1, seed: int = 0,
               guide: str | Path | None = None, device: str | None = None) -> Any:
        """``n`` samples of class ``label`` (of class x context ``group``) as an
        (n, H, W, C) uint8 array, drawn here from the run's generator and guided by its
        classifier (``guide``: another classifier folder, e.g. a round's) with ``criterion``
        (default the first of ``synthesis.criteria``) at ``scale`` (default
        ``synthesis.guidance_scale``; 0 is unguided). Sample i depends only on ``seed + i``
        and the settings, as in synthesis; the models are built once per criterion."""
        import torch

        from ray_lt.generate.grid import Drawer

        cfg = self.config
        if cfg.generator.OUTPUTS != "images":
            raise ConfigError(f"generator.kind: {cfg.generator.kind!r} samples feature "
                              f"vectors, not images")
        classes = len(self._info["class_names"])
        if not 0 <= label < classes:
            raise ValueError(f"label: {label} is not a class of this run (0 to {classes - 1})")
        criterion = criterion or next(iter(cfg.synthesis.criteria))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        key = (criterion, str(guide), device)
        if key not in self._drawers:
            self._drawers[key] = Drawer(cfg, self.path, self._info, [criterion],
                                        torch.device(device), Path(guide) if guide else None)
        scale = cfg.synthesis.guidance_scale if scale is None else float(scale)
        return self._drawers[key].draw(label, group, criterion, scale,
                                       [seed + i for i in range(n)])
