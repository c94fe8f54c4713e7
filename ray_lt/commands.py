"""The commands users run: ``ray-lt <command>``, ``jobs/<command>.py`` and Python drivers call
these functions. Each holds its run directory's lock (``ray_lt.rundir``: one command at a
time per directory), prepares the session (``ray_lt.pipeline.prepare``: every check first)
and runs its stages into the directory; a stage whose output is complete is not run again.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ray_lt.config import Config
from ray_lt.errors import ConfigError, require_stage
from ray_lt.generate.factory import check_generator
from ray_lt.generate.plan import plan
from ray_lt.pipeline import (
    banner,
    baseline_stage,
    check_run_config,
    criterion_support,
    evaluate_stage,
    final_stage,
    generator_stage,
    grid_stage,
    prepare,
    synthesis_stage,
)
from ray_lt.report import write_report
from ray_lt.rundir import run_lock
from ray_lt.stages import StageMeter, record_timing
from ray_lt.train.trainer import MODEL_FILE

log = logging.getLogger(__name__)
Result = TypeVar("Result")


def command(name: str) -> Callable[[Callable[[Config, Path], Result]],
                                   Callable[[Config, Path], Result]]:
    """Run the decorated command holding ``out_dir``'s lock: a second command into the same
    directory is refused at once, naming the process that holds it."""
    def wrap(body: Callable[[Config, Path], Result]) -> Callable[[Config, Path], Result]:
        @functools.wraps(body)
        def locked(cfg: Config, out_dir: Path) -> Result:
            with run_lock(Path(out_dir), name):
                return body(cfg, Path(out_dir))
        return locked
    return wrap


ALL_STAGES = ("classifier", "generator", "synthesis", "filter", "final")


@command("train")
def train(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Train the classifier on the real data (unless already trained) and evaluate it on test.

    Writes ``classifier/`` (weights, spec, history), ``metrics.json``, ``predictions.parquet``
    and ``per_class_accuracy.png`` into ``out_dir``.
    """
    out_dir, data = prepare(cfg, out_dir, needs=("train",), command="train",
                            stages=("classifier",))
    return baseline_stage(cfg, out_dir, data)


@command("train-generator")
def train_generator(cfg: Config, out_dir: Path) -> Path:
    """Train the generator from scratch: ``pixel`` on the long-tailed images (DiffuLT, Ray
    Train), ``feature`` on the baseline classifier's training features (LDMLR, a Ray task)."""
    if not cfg.generator.TRAINED:
        raise ConfigError(f"generator.kind: {cfg.generator.kind!r} is not trained by "
                          f"train-generator (it loads pretrained weights from "
                          f"generator.pretrained)")
    out_dir, data = prepare(cfg, out_dir, needs=("train",), command="train-generator",
                            stages=("generator",))
    return generator_stage(cfg, out_dir, data)


@command("synthesize")
def synthesize(cfg: Config, out_dir: Path) -> Path:
    """Sample the quota of feedback-guided synthetic images into ``out_dir/synthetic``.

    The classifier and the generator it needs are checked (loading nothing) before Ray starts.
    """
    require_stage(Path(out_dir) / "classifier" / MODEL_FILE, "classifier", "ray-lt train")
    check_generator(cfg, Path(out_dir))
    out_dir, data = prepare(cfg, out_dir, needs=("synthesis",), command="synthesize",
                            stages=("synthesis", "filter"), check=lambda data: plan(cfg, data))
    return synthesis_stage(cfg, out_dir, data)


@command("grid")
def grid(cfg: Config, out_dir: Path) -> Path | None:
    """PNG grid of one class's samples: rows = criteria, columns = guidance scales."""
    out_dir, data = prepare(cfg, out_dir, needs=("synthesis",), command="grid")
    return grid_stage(cfg, out_dir, data)


@command("run")
def run(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """The whole pipeline into one run directory, each stage skipped when its output is
    complete: baseline -> criterion statistics -> generator -> guided synthesis (+ filter)
    -> classifier on real + synthetic -> evaluation -> sample grid -> report. Each stage's wall
    time and the driver's peak memory go to ``stages.json`` and the report."""
    started = time.perf_counter()
    check_run_config(cfg)
    with StageMeter() as meter:
        # an empty quota is refused before any training
        out_dir, data = prepare(cfg, out_dir, needs=("train", "synthesis"), command="run",
                                stages=ALL_STAGES, check=lambda data: plan(cfg, data))
    times = {"data": (meter.seconds, meter.peak_rss_mb)}
    record_timing(out_dir, "data", *times["data"])
    s = cfg.synthesis
    steps = [
        ("classifier", "baseline classifier", f"{cfg.model.name}, {cfg.train.epochs} epochs",
         lambda: baseline_stage(cfg, out_dir, data)),
        ("statistics", "criterion statistics", ", ".join(s.criteria),
         lambda: criterion_support(cfg, out_dir, data)),
        ("generator", "generator", cfg.generator.kind,
         lambda: generator_stage(cfg, out_dir, data)),
        ("synthesis", "synthesis", f"guidance {s.guidance_scale:g}, {s.num_actors} sampler "
         f"actor(s)" + (f", {cfg.rounds.count} rounds" if cfg.rounds.count > 1 else ""),
         lambda: synthesis_stage(cfg, out_dir, data)),
        ("final", "final classifier", f"real + synthetic, init {cfg.final.init}",
         lambda: final_stage(cfg, out_dir, data)),
        ("evaluation", "evaluation", "", lambda: evaluate_stage(cfg, out_dir, data)),
        ("grid", "sample grid", "", lambda: grid_stage(cfg, out_dir, data)
         if cfg.report.grid else None),
    ]
    results = {}
    for step, (key, name, note, call) in enumerate(steps, start=1):
        banner(step, len(steps) + 1, name, note, since=started)
        with StageMeter() as meter:
            results[key] = call()
        times[key] = (meter.seconds, meter.peak_rss_mb)
        record_timing(out_dir, key, *times[key])
    banner(len(steps) + 1, len(steps) + 1, "report", since=started)
    path = write_report(cfg, out_dir, data, results["classifier"], results["evaluation"], times)
    log.info(f"done in {time.perf_counter() - started:.0f} s; report: {path}")
    return results["evaluation"]


@command("tune")
def tune(cfg: Config, out_dir: Path) -> Any:
    """Ray Tune + Optuna over the configured search space (``ray_lt.tune.search``)."""
    from ray_lt.tune.search import tune as run_search

    return run_search(cfg, out_dir)
