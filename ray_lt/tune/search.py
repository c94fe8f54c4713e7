"""``ray-lt tune``: Ray Tune with Optuna around guided synthesis and final training.

The baseline classifier, its criterion statistics and the generator are made once in DIR and
shared by every trial. A trial is a plain function (Ray Train V2): it samples its own synthetic
set into ``DIR/trials/<trial id>`` and fits a ``TorchTrainer`` whose per-epoch validation
metrics reach Tune through ``TuneReportCallback``. Objectives are measured on the validation
split; test metrics are recorded beside them. Results: ``DIR/tune/results.csv``, the Pareto
front, a plot, TensorBoard logs under ``DIR/tune`` and ``DIR/best_config.yaml``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ray_lt.config import Config, config_from_dict
from ray_lt.data import LongTailData
from ray_lt.errors import ConfigError
from ray_lt.evaluate.metrics import HEADLINE
from ray_lt.log import verbose
from ray_lt.stages import run_graph
from ray_lt.tune.plots import plot_search

log = logging.getLogger(__name__)

TUNE_DIR = "tune"
TRIALS_DIR = "trials"
RESULTS_FILE = "results.csv"
BEST_CONFIG_FILE = "best_config.yaml"
OBJECTIVES = {"few": ["val_few"], "worst_group": ["val_worst_group"],
              "both": ["val_few", "val_worst_group"],
              "unseen_groups": ["val_unseen_groups", "val_worst_group"]}
# The folders of the stages made once in the tune's run directory, linked into every trial's.
SHARED_FOLDERS = ("classifier", "generator", "references", "sources")


def objective_metrics(cfg: Config, has_groups: bool, has_few: bool,
                      has_unseen: bool = False) -> list[str]:
    """The validation metrics Optuna maximises; refused when the data set cannot give them."""
    metrics = OBJECTIVES[cfg.tune.objective]
    if "val_unseen_groups" in metrics and not has_unseen:
        raise ConfigError(f"tune.objective: 'unseen_groups' needs class x context groups "
                          f"with no training image, but {cfg.dataset.kind} has "
                          f"{'none' if has_groups else 'no groups'}; use 'worst_group'")
    if "val_worst_group" in metrics and not has_groups:
        raise ConfigError(f"tune.objective: {cfg.tune.objective!r} needs worst-group accuracy, "
                          f"but {cfg.dataset.kind} has no groups; use 'few'")
    if "val_few" in metrics and not has_few:
        raise ConfigError(f"tune.objective: {cfg.tune.objective!r} needs Few classes, but no "
                          f"class has fewer than evaluate.few_threshold = "
                          f"{cfg.evaluate.few_threshold} training images")
    return metrics


def search_space(cfg: Config) -> dict[str, Any]:
    """Ray Tune search space (nested like the config) from ``tune.space``."""
    from ray import tune

    space, sp = {}, cfg.tune.space
    if sp.guidance_scale is not None:
        space.setdefault("synthesis", {})["guidance_scale"] = tune.loguniform(*sp.guidance_scale)
    if sp.embedding_dropout is not None:
        if "embedding_dropout" not in type(cfg.generator).model_fields:
            raise ConfigError(f"tune.space.embedding_dropout: the {cfg.generator.kind} "
                              f"generator has no image embedding to drop (unclip has)")
        space.setdefault("generator", {})["embedding_dropout"] = tune.uniform(
            *sp.embedding_dropout)
    if sp.criteria is not None:
        space["mixture"] = {name: tune.uniform(0.0, 1.0) for name in sp.criteria}
    if sp.synthetic_weight is not None:
        space.setdefault("train", {})["synthetic_weight"] = tune.uniform(*sp.synthetic_weight)
    if sp.balanced_softmax_weight is not None:
        space.setdefault("final", {})["balanced_softmax_weight"] = tune.uniform(
            *sp.balanced_softmax_weight)
    if sp.scale_slope is not None:
        if cfg.synthesis.scale_by == "none":
            raise ConfigError("tune.space.scale_slope: synthesis.scale_by is 'none', so the "
                              "slope changes nothing; set synthesis.scale_by: count")
        space.setdefault("synthesis", {})["scale_slope"] = tune.uniform(*sp.scale_slope)
    if sp.rounds:
        if cfg.generator.OUTPUTS == "features":
            raise ConfigError(f"tune.space.rounds: the {cfg.generator.kind} generator's "
                              f"pseudo-features train a head, not a guide to fine-tune; set it "
                              f"to null")
        if cfg.mining.enabled and min(sp.rounds) < 2:
            raise ConfigError(f"tune.space.rounds: {sorted(set(sp.rounds))} holds 1 round, and "
                              f"mining.enabled mines between rounds; search 2 rounds or more, "
                              f"or set mining.enabled: false")
        space.setdefault("rounds", {})["count"] = tune.choice(sorted(set(sp.rounds)))
    if sp.final_group_objective:
        space.setdefault("final", {})["group_objective"] = tune.choice(
            sorted(set(sp.final_group_objective)))
    if not space:
        raise ConfigError("tune.space: every range is null; nothing to search")
    return space


def mixture(weights: dict[str, float]) -> dict[str, float]:
    """Normalised criterion probabilities from raw non-negative weights (equal if all zero)."""
    total = sum(weights.values())
    if total <= 0:
        return {k: 1.0 / len(weights) for k in weights}
    probs = {k: round(v / total, 6) for k, v in weights.items()}
    first = next(iter(probs))
    probs[first] = round(1.0 - sum(v for k, v in probs.items() if k != first), 6)
    return {k: v for k, v in probs.items() if v > 0}


def trial_config(base: dict[str, Any], params: dict[str, Any], quota_scale: float
                 ) -> dict[str, Any]:
    """The full config dict of one trial: ``base`` with the sampled ``params`` applied."""
    raw = yaml.safe_load(yaml.safe_dump(base))  # deep copy of plain data
    for section, values in params.items():
        if section == "mixture":
            raw["synthesis"]["criteria"] = mixture(values)
        else:
            raw.setdefault(section, {}).update(values)
    raw["synthesis"]["quota_scale"] = raw["synthesis"].get("quota_scale", 1.0) * quota_scale
    return raw


def check_trial_quota(cfg: Config, data: LongTailData) -> None:
    """Refuse, before any training, a ``tune.quota_scale`` that leaves a trial nothing to
    generate."""
    from ray_lt.generate.plan import plan

    raw = trial_config(cfg.model_dump(mode="json"), {}, cfg.tune.quota_scale)
    try:
        plan(config_from_dict(raw, source="trial config"), data)
    except ConfigError as err:
        raise ConfigError(f"tune.quota_scale: {cfg.tune.quota_scale:g} times "
                          f"synthesis.quota_scale {cfg.synthesis.quota_scale:g} leaves a trial "
                          f"no synthetic image ({err})") from None


def pareto_front(table: pd.DataFrame, metrics: list[str]) -> np.ndarray:
    """Mask of the rows no other row beats on every metric (maximised) and strictly on one."""
    values = table[metrics].to_numpy(dtype=float)
    keep = np.isfinite(values).all(axis=1)
    front = np.zeros(len(values), bool)
    for i in np.flatnonzero(keep):
        others = values[keep]
        dominated = ((others >= values[i]).all(axis=1) & (others > values[i]).any(axis=1)).any()
        front[i] = not dominated
    return front


def run_trial(params: dict[str, Any], base: dict[str, Any], shared_dir: str) -> None:
    """One Tune trial: synthesize to the trial's quota, train on real + synthetic, evaluate on
    val (objectives) and test, ``tune.report`` the final metrics."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_lt import pipeline
    from ray_lt.data import load_dataset
    from ray_lt.rundir import write_run_config

    raw = trial_config(base, params, base["tune"]["quota_scale"])
    if "verify_images" in raw["dataset"]:
        raw["dataset"]["verify_images"] = False  # checked once before the search
    cfg = config_from_dict(raw, source="trial config")
    shared = Path(shared_dir)
    trial_dir = shared / TRIALS_DIR / ray.tune.get_context().get_trial_id()
    trial_dir.mkdir(parents=True, exist_ok=True)
    for folder in SHARED_FOLDERS:
        link = trial_dir / folder
        if (shared / folder).exists() and not link.exists():
            link.symlink_to(shared / folder, target_is_directory=True)
    write_run_config(cfg, trial_dir, "run")
    session = pipeline.Session(cfg, trial_dir, load_dataset(cfg.dataset, cfg.seed),
                               callbacks=[TuneReportCallback()])
    for stage in (pipeline.SYNTHESIS, pipeline.FILTER, pipeline.FINAL):
        pipeline.run_stage(stage, session)
    val = pipeline.run_stage(pipeline.EVALUATION, session, "evaluation.val", split="val")
    test = pipeline.run_stage(pipeline.EVALUATION, session)
    result = {f"{split}_{k}": m[k] for split, m in (("val", val), ("test", test))
              for k in HEADLINE if m.get(k) is not None}
    result["val_acc"] = val["overall"]
    result["criteria"] = ",".join(f"{k}={v:g}" for k, v in cfg.synthesis.criteria.items())
    ray.tune.report(result)


def tune(cfg: Config, out_dir: Path) -> pd.DataFrame:
    """Search ``tune.space`` with Optuna; returns the result table (also in
    ``DIR/tune/results.csv``) and writes the best trial's config to ``DIR/best_config.yaml``."""
    import ray.tune
    from ray.tune.search.optuna import OptunaSearch

    from ray_lt import pipeline

    space = search_space(cfg)
    pipeline.check_run_config(cfg)

    def check(data: Any) -> None:  # before Ray starts: objectives and the trials' quota
        has_few = bool((data.class_counts < cfg.evaluate.few_threshold).any())
        found.extend(objective_metrics(cfg, data.group_counts is not None, has_few,
                                       has_unseen=data.group_counts is not None
                                       and bool((data.group_counts == 0).any())))
        check_trial_quota(cfg, data)

    found: list[str] = []
    shared = (pipeline.CLASSIFIER, pipeline.BASELINE_EVALUATION, pipeline.STATISTICS,
              pipeline.GENERATOR)
    session = pipeline.prepare(cfg, out_dir, needs=("train", "synthesis", "tune"),
                               command="tune", stages=shared, check=check)
    out_dir = session.out_dir
    metrics = found
    log.info("tune: shared stages (baseline classifier, statistics, generator)")
    run_graph(shared, lambda stage, beside: pipeline.run_stage(stage, session), cfg,
              session.budget())  # the generator trains beside the baseline, as in a run
    baseline = session.results[pipeline.BASELINE_EVALUATION.name]
    pipeline.prepare_inputs(cfg, session.data, out_dir)
    t = cfg.tune
    log.info(f"tune: {t.num_trials} trials, {t.max_concurrent_trials} at a time, "
             f"maximising {metrics} on the validation split; TensorBoard: "
             f"tensorboard --logdir {out_dir / TUNE_DIR}")
    trainable = ray.tune.with_parameters(run_trial, base=cfg.model_dump(mode="json"),
                                         shared_dir=str(out_dir))
    # The trial driver only orchestrates (Ray Data, TorchTrainer); with trial_cpus 0 it reserves
    # memory alone, so its CPU does not starve the Ray Data tasks feeding the Train workers.
    resources = {"memory": t.trial_memory_mb * 2**20}
    if t.trial_cpus > 0:
        resources["CPU"] = t.trial_cpus
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trainable, resources),
        param_space=space,
        tune_config=ray.tune.TuneConfig(
            search_alg=OptunaSearch(metric=metrics if len(metrics) > 1 else metrics[0],
                                    mode=["max"] * len(metrics) if len(metrics) > 1 else "max",
                                    seed=cfg.seed),
            num_samples=t.num_trials, max_concurrent_trials=t.max_concurrent_trials),
        run_config=ray.tune.RunConfig(name="search", storage_path=str(out_dir / TUNE_DIR),
                                      failure_config=ray.tune.FailureConfig(max_failures=1),
                                      verbose=1 if verbose() else 0),
    )
    grid = tuner.fit()
    table = results_table(grid.get_dataframe(), metrics)
    folder = out_dir / TUNE_DIR
    table.to_csv(folder / RESULTS_FILE, index=False)
    plot_search(table, metrics, folder / "search.png")
    errors = [r.error for r in grid if r.error is not None]
    if table.empty or not table["pareto"].any():
        raise RuntimeError(f"no tuning trial finished; first error: {errors[:1]}")
    best = table[table["pareto"]].assign(
        score=table[metrics].mean(axis=1)).sort_values("score", ascending=False).iloc[0]
    write_best_config(cfg, best, metrics, out_dir / BEST_CONFIG_FILE)
    shown = [c for c in table.columns if c.startswith(("config/", "val_", "test_"))
             or c in ("trial_id", "pareto")]
    log.info(f"tune results ({out_dir / TUNE_DIR / RESULTS_FILE}):\n"
             f"{table[shown].to_string(index=False, float_format=lambda x: f'{x:.4g}')}")
    log.info(f"baseline test few {baseline.get('few')}, worst-group "
             f"{baseline.get('worst_group')}; best trial {best['trial_id']} -> "
             f"{out_dir / BEST_CONFIG_FILE}")
    return table


def results_table(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Tune's result frame cut to the searched values and the metrics, Pareto front marked."""
    keep = [c for c in df.columns if c.startswith("config/") or c.startswith(("val_", "test_"))
            or c in ("trial_id", "criteria", "time_total_s")]
    table = df[keep].dropna(axis=1, how="all")  # keys only the per-epoch reports had
    for m in metrics:
        if m not in table:
            table[m] = np.nan
    table["pareto"] = pareto_front(table, metrics)
    return table.sort_values(metrics, ascending=False).reset_index(drop=True)


def write_best_config(cfg: Config, best: pd.Series, metrics: list[str], path: Path) -> None:
    """The run's config with the best trial's values, loadable by ``ray-lt run`` (at the
    run's own quota, not the trial's scaled one)."""
    raw = cfg.model_dump(mode="json")
    params: dict[str, Any] = {}
    for column, value in best.items():
        if column.startswith("config/") and not (isinstance(value, float) and math.isnan(value)):
            section, _, key = column[len("config/"):].partition("/")
            # Ranges give floats, choices keep their type (rounds.count 3, group objective
            # "dro"); numpy scalars from the result frame become plain values for YAML.
            params.setdefault(section, {})[key] = value.item() if isinstance(
                value, np.generic) else value
    raw = trial_config(raw, params, 1.0)
    config_from_dict(raw, source=str(path))  # what ray-lt run will read must validate
    scores = ", ".join(f"{m} {best[m]:.4f}" for m in metrics)
    header = (f"# Best trial {best['trial_id']} of `ray-lt tune` ({scores} on the validation "
              f"split).\n# Run it in full with: ray-lt run {path.name} --out DIR\n")
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
