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
from ray_lt.errors import ConfigError, StageError, require_stage
from ray_lt.generate.factory import check_generator
from ray_lt.generate.plan import plan
from ray_lt.log import close_log_files
from ray_lt.pipeline import (
    BASELINE_EVALUATION,
    CLASSIFIER,
    EVALUATION,
    FILTER,
    GENERATOR,
    GRID,
    MINING,
    RUN_STAGES,
    STATISTICS,
    SYNTHESIS,
    check_run_config,
    prepare,
    run_stage,
)
from ray_lt.rundir import run_lock
from ray_lt.stages import Stage, StageMeter, record_timing, run_graph
from ray_lt.train.trainer import MODEL_FILE

log = logging.getLogger(__name__)
Result = TypeVar("Result")


def command(name: str) -> Callable[[Callable[..., Result]], Callable[..., Result]]:
    """Run the decorated command holding ``out_dir``'s lock: a second command into the same
    directory is refused at once, naming the process that holds it. Its log file
    (``DIR/logs/ray-lt.log``) is closed when it ends, so that a Python driver's next command
    logs into its own run directory only."""
    def wrap(body: Callable[..., Result]) -> Callable[..., Result]:
        @functools.wraps(body)
        def locked(cfg: Config, out_dir: Path, **options: Any) -> Result:
            try:
                with run_lock(Path(out_dir), name):
                    return body(cfg, Path(out_dir), **options)
            finally:
                close_log_files()
        return locked
    return wrap


@command("train")
def train(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Train the classifier on the real data (unless already trained) and evaluate it on test.

    Writes ``classifier/`` (weights, spec, history), ``metrics.json``, ``predictions.parquet``
    and ``per_class_accuracy.png`` into ``out_dir``.
    """
    session = prepare(cfg, out_dir, needs=("train",), command="train", stages=(CLASSIFIER,))
    run_stage(CLASSIFIER, session)
    return run_stage(BASELINE_EVALUATION, session)


@command("train-generator")
def train_generator(cfg: Config, out_dir: Path) -> Path:
    """Train the generator from scratch: ``pixel`` on the long-tailed images (DiffuLT, Ray
    Train) or on an external pool (``generator.train_on``), ``feature`` on the baseline
    classifier's training features (LDMLR, a Ray task)."""
    if not cfg.generator.TRAINED:
        raise ConfigError(f"generator.kind: {cfg.generator.kind!r} is not trained by "
                          f"train-generator (it loads pretrained weights from "
                          f"generator.pretrained)")
    session = prepare(cfg, out_dir, needs=("train",), command="train-generator",
                      stages=(GENERATOR,))
    return run_stage(GENERATOR, session)


@command("synthesize")
def synthesize(cfg: Config, out_dir: Path) -> Path:
    """Sample the quota of feedback-guided synthetic images into ``out_dir/synthetic`` (in
    rounds with ``rounds.count`` > 1), then the optional filter.

    The classifier and the generator it needs are checked (loading nothing) before Ray starts.
    """
    require_stage(Path(out_dir) / "classifier" / MODEL_FILE, "classifier", "ray-lt train")
    check_generator(cfg, Path(out_dir))
    if cfg.mining.enabled:
        from ray_lt.generate.mining import check_models

        check_models(cfg)
    session = prepare(cfg, out_dir, needs=("synthesis",), command="synthesize",
                      stages=(SYNTHESIS, FILTER), check=lambda data: plan(cfg, data))
    for stage in (STATISTICS, SYNTHESIS, FILTER):
        run_stage(stage, session)
    return session.results[SYNTHESIS.name]


@command("mine")
def mine(cfg: Config, out_dir: Path) -> Path:
    """Mine a finished synthesis (its last round, ``rounds.count``): the hardest and easiest
    samples of each mined class described by ``mining.vlm``, the keywords between them scored
    and ``mining.prompts`` prompts per class written to ``mining/round<r>/prompts.jsonl``,
    which ``generator.prompts_file`` can name for a later ``ray-lt synthesize``. The models
    and the finished round are checked before Ray starts."""
    from ray_lt.generate.mining import check_models, round_shards
    from ray_lt.generate.rounds import stored_plan

    out_dir = Path(out_dir)
    check_models(cfg, key="generator.kind")
    require_stage(out_dir / "synthetic" / "plan.json", "synthesis", "ray-lt synthesize")
    index = cfg.rounds.count
    planned = [sh for sh in stored_plan(out_dir) if sh.get("round", 1) == index]
    written = round_shards(out_dir, index)
    if len(written) < len(planned) or not planned:
        raise StageError(f"{out_dir / 'synthetic'}: round {index}'s synthesis is not finished "
                         f"({len(written)} of {len(planned)} shards); run `ray-lt synthesize` "
                         f"with the same --out first")
    session = prepare(cfg, out_dir, needs=("mining",), command="mine")
    return run_stage(MINING, session, f"mining.round{index}", index=index)


@command("grid")
def grid(cfg: Config, out_dir: Path) -> Path | None:
    """The guidance sweep of one class (``report/guidance_sweep.csv`` and ``.png``) and its
    PNG grid: rows = criteria, columns = guidance scales (drawn whatever ``report.grid``
    says)."""
    session = prepare(cfg, out_dir, needs=("synthesis",), command="grid")
    return run_stage(GRID, session, enabled=cfg.generator.OUTPUTS == "images")


@command("run")
def run(cfg: Config, out_dir: Path, sequential: bool = False) -> dict[str, Any]:
    """The whole pipeline into one run directory, every stage of
    ``ray_lt.pipeline.RUN_STAGES``, each skipped when its output is complete: baseline ->
    criterion statistics -> generator -> guided synthesis (rounds and fine-tunes) -> filter
    -> classifier on real + synthetic -> evaluation -> sample grid -> quality -> report.

    A stage starts as soon as the stages it reads are done and what it holds fits on the
    cluster beside the stages running (``ray_lt.stages.run_graph``): the ``pixel`` generator
    trains beside the baseline classifier, the quality metrics run beside the final
    classifier. ``sequential`` runs them one at a time in the order above. Each stage's wall
    time, start and the driver's peak memory go to ``stages.json`` and the report; returns the
    final classifier's test metrics."""
    started = time.perf_counter()
    check_run_config(cfg)
    with StageMeter() as meter:
        # an empty quota is refused before any training
        session = prepare(cfg, out_dir, needs=("train", "synthesis"), command="run",
                          stages=RUN_STAGES, check=lambda data: plan(cfg, data))
    session.started = started
    session.times["data"] = (meter.seconds, meter.peak_rss_mb, meter.started - started)
    record_timing(session.out_dir, "data", *session.times["data"])
    shown = [stage for stage in RUN_STAGES if stage.enabled(cfg)]

    def start(stage: Stage, beside: list[Stage]) -> None:
        step = (shown.index(stage) + 1, len(shown)) if stage in shown else None
        run_stage(stage, session, step=step, beside=[b for b in beside if b in shown])

    run_graph(RUN_STAGES, start, cfg, None if sequential else session.budget())
    return session.results[EVALUATION.name]


@command("tune")
def tune(cfg: Config, out_dir: Path) -> Any:
    """Ray Tune + Optuna over the configured search space (``ray_lt.tune.search``)."""
    from ray_lt.tune.search import tune as run_search

    return run_search(cfg, out_dir)


def plan_run(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """``ray-lt plan``: read and check the data, print what a run of ``cfg`` will make and an
    estimate of what its sampling costs (``ray_lt.planning``), and write the class-count
    histogram and ``plan_summary.json`` into ``out_dir``. Starts no Ray, trains and samples
    nothing."""
    from ray_lt.planning import render, summarize

    summary = summarize(cfg, out_dir)
    print("\n".join(render(summary, cfg)), flush=True)
    return summary


def export(run_dir: Path, to: Path, fmt: str, with_real: bool = False,
           include_filtered: bool = False, overrides: list[str] | None = None
           ) -> dict[str, Any]:
    """``ray-lt export``: write ``run_dir``'s synthetic set (with ``with_real`` also its real
    training set) to ``to`` as an image folder, WebDataset shards or Parquet, on Ray Data
    (``ray_lt.export``); a rerun skips what is written. Holds the run directory's lock, so
    nothing writes the synthetic set meanwhile."""
    from ray_lt.cluster import init_ray
    from ray_lt.config import load_config
    from ray_lt.data import load_dataset
    from ray_lt.export import check_export, export_run

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a ray-lt run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", overrides or [])
    check_export(run_dir, Path(to), fmt, with_real, include_filtered)
    data = load_dataset(cfg.dataset, cfg.seed)
    try:
        with run_lock(run_dir, "export"):
            init_ray(cfg.ray)
            return export_run(cfg, run_dir, Path(to), fmt, with_real, include_filtered, data)
    finally:
        close_log_files()
