"""The pipeline's stages, one registry (``STAGES``) of ``ray_lt.stages.Stage`` objects, each
reading and writing one run directory: the baseline classifier and its evaluation, the
criterion statistics, the generator, guided synthesis (in rounds, with the guide's fine-tunes
between them), the filter, the classifier on real + synthetic data, its evaluation, the sample
grid, the synthetic-data quality metrics and the report.

``run_stage`` is the one place that skips a stage whose output is complete, refuses one whose
recorded config changed, records it, times it and prints its banner. The commands users run
(``ray_lt.commands``) and the tuner's trials (``ray_lt.tune.search``) pick their stages from
the registry; ``prepare`` is what every command does before them (checks first, Ray started
once, the data loaded and checked once).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from ray_lt.cluster import (
    DATA_TASK_CPUS,
    Capacity,
    check_cluster_resources,
    cluster_capacity,
    init_ray,
    ray_session_logs,
)
from ray_lt.config import Config, Pool, check_paths, final_train_config
from ray_lt.data import LongTailData, check_images, load_dataset
from ray_lt.data.external import attach_external
from ray_lt.errors import ConfigError, require_stage
from ray_lt.evaluate.classifier import METRICS_FILE, evaluate_classifier
from ray_lt.evaluate.metrics import HEADLINE
from ray_lt.generate.base import SPEC_FILE as GENERATOR_SPEC
from ray_lt.generate.criteria import check_covariance_size
from ray_lt.generate.factory import check_generator, generator_info
from ray_lt.generate.filtering import filter_synthetic
from ray_lt.generate.kinds import generator_kind
from ray_lt.generate.mining import (
    MINING_DIR,
    PROMPTS_FILE,
    check_models,
    mine,
    mined,
    mining_dir,
    next_round_prompts,
)
from ray_lt.generate.plan import check_counts
from ray_lt.generate.rounds import (
    ROUNDS_DIR,
    check_fine_tunes,
    fine_tune_settings,
    record_fine_tune,
    round_dir,
    round_guide,
    shards_up_to,
    stored_plan,
    write_round_summary,
)
from ray_lt.generate.statistics import (
    SupportShape,
    ensure_training_features,
    fit_missing_support,
    load_training_features,
    missing_support,
    report_support,
    support_pieces,
)
from ray_lt.generate.synthesize import prepare_inputs
from ray_lt.generate.synthesize import synthesize as run_synthesis
from ray_lt.generate.synthetic import (
    FILTER_FILE,
    SYNTHETIC_DIR,
    load_synthetic,
    synthetic_count,
)
from ray_lt.log import banner, format_summary, log_to_file
from ray_lt.report import (
    QUALITY_FILE,
    REPORT_DIR,
    SWEEP_FILE,
    SWEEP_PLOT,
    synthetic_quality,
    write_report,
)
from ray_lt.rundir import check_run_config_file, write_run_config
from ray_lt.stages import (
    Stage,
    StageMeter,
    check_stage,
    check_stages,
    forget_stage,
    record_stage,
    record_timing,
    stage_matches,
)
from ray_lt.train import fit_classifier
from ray_lt.train.head import fit_head
from ray_lt.train.models import feature_dim
from ray_lt.train.trainer import MODEL_FILE

log = logging.getLogger(__name__)

FINAL_DIR = "final"
MATERIALIZE_BYTES = 1 << 30  # synthetic sets up to this size are decoded once, not per epoch


@dataclass
class Session:
    """One command's work on one run directory: the config, the directory, the loaded data,
    and the results and timings of the stages run so far (``callbacks`` go to the final
    classifier's Ray Train run: the tuner passes Tune's report callback)."""

    cfg: Config
    out_dir: Path
    data: LongTailData
    started: float = field(default_factory=time.perf_counter)
    results: dict[str, Any] = field(default_factory=dict)
    times: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    """Stage -> (seconds, the driver's peak RSS in MB, seconds after the start it began)."""
    callbacks: list[Any] | None = None
    capacity: Capacity | None = None

    def budget(self) -> dict[str, float]:
        """What stages running side by side may hold together: the cluster's CPUs (all its
        nodes can grow to) less one Ray Data task's, and its GPUs."""
        most = self.capacity.most if self.capacity is not None else {}
        return {"CPU": max(most.get("CPU", 0.0) - DATA_TASK_CPUS, 0.0),
                "GPU": most.get("GPU", 0.0)}


def run_stage(stage: Stage, session: Session, name: str | None = None,
              step: tuple[int, int] | None = None, enabled: bool | None = None,
              beside: list[Stage] | None = None, **kwargs: Any) -> Any:
    """Run ``stage`` (recorded and timed as ``name``, default its own) in ``session``: refuse
    it when its output exists and was made with another config, skip its work when its
    output is complete, record its config keys and time it into ``stages.json``. ``step``
    (i, n) prints the banner ``stage i/n`` (naming the stages running ``beside`` it);
    ``enabled`` overrides ``stage.enabled``."""
    cfg, out = session.cfg, session.out_dir
    name = name or stage.name
    if not (stage.enabled(cfg) if enabled is None else enabled):
        if step is not None:
            banner(*step, stage.title, stage.note(cfg), since=session.started)
        if stage.disabled is not None:
            stage.disabled(session)
        return None
    if step is not None:
        note = stage.note(cfg)
        if beside:
            note += f"{'; ' if note else ''}beside {', '.join(b.title for b in beside)}"
        banner(*step, stage.title, note, since=session.started)
    with StageMeter() as meter:
        result = _run(stage, session, name, **kwargs)
    session.results[name] = result
    session.times[name] = (meter.seconds, meter.peak_rss_mb, meter.started - session.started)
    record_timing(out, name, *session.times[name])
    return result


def _run(stage: Stage, session: Session, name: str, **kwargs: Any) -> Any:
    cfg, out = session.cfg, session.out_dir
    recorded = stage.keys is not None and stage.recorded(cfg)
    output = stage.output(cfg, out) if stage.output is not None else None
    if recorded and not stage.redo_on_change and output is not None and output.exists():
        check_stage(cfg, out, stage, output, name)
    complete = stage.complete is not None and stage.complete(session, **kwargs) and (
        not stage.redo_on_change or stage_matches(cfg, out, stage, name))
    if complete:
        result = stage.load(session, **kwargs) if stage.load is not None else output
        log.info(f"{stage.title} {stage.done}: {result}")
    else:
        result = stage.run(session, **kwargs)
    if recorded:
        record_stage(cfg, out, stage, name)
    return result


def prepare(cfg: Config, out_dir: Path, needs: tuple[str, ...] = (), command: str = "run",
            stages: tuple[Stage, ...] = (),
            check: Callable[[LongTailData], None] | None = None) -> Session:
    """Everything a command does before its stages, checks first: read and check the data's
    index files and what the config decides with them (``check_inputs``, then the caller's
    ``check``), that the recorded ``stages`` were made with this config; then start Ray,
    check that the cluster can run what the caller ``needs`` (``check_cluster_resources``),
    decode the images (``dataset.verify_images``), and only then record the config as
    ``out_dir/config.yaml``. Nothing in ``out_dir`` is written before the checks pass but
    the log."""
    out_dir = Path(out_dir).resolve()
    data = load_dataset(cfg.dataset, cfg.seed)
    attach_external(cfg, data)
    check_inputs(cfg, data)
    if check is not None:
        check(data)
    check_stages(cfg, out_dir, list(stages))
    check_run_config_file(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_to_file(out_dir)
    init_ray(cfg.ray)
    capacity = cluster_capacity(cfg.ray.autoscaler_config)
    check_cluster_resources(cfg, capacity, needs)
    log.debug("Ray session logs (every worker's output): %s", ray_session_logs())
    log.debug("full log: %s", log_file)
    check_images(cfg.dataset, data)
    write_run_config(cfg, out_dir, command)
    return Session(cfg, out_dir, data, capacity=capacity)


def check_inputs(cfg: Config, data: LongTailData) -> None:
    """What the config decides together with the data's index, refused before Ray starts
    (instead of in the stage that would meet it, after hours of training)."""
    if "hardness" in cfg.criteria_in_use():
        dim = feature_dim(cfg.model.name, data.image_shape[2], cfg.model.width)
        try:
            check_covariance_size(data.num_classes, dim, cfg.synthesis.hardness_covariance)
        except ValueError as err:
            raise ConfigError(f"{err} (model.name {cfg.model.name} has {dim} features, "
                              f"the data set {data.num_classes} classes)") from None
    label = cfg.synthesis.grid_class
    if cfg.report.grid and label >= data.num_classes:
        raise ConfigError(f"synthesis.grid_class: {label} is not a class of this data set "
                          f"(it has {data.num_classes}: 0 to {data.num_classes - 1}, or -1 for "
                          f"the rarest)")


def check_run_config(cfg: Config) -> None:
    """Settings ``run`` cannot honour and inputs that are not there (data folder, classifier
    checkpoint, pretrained generator), refused before Ray starts or anything is written."""
    check_paths(cfg)
    kind = generator_kind(cfg)
    kind.check_config(cfg)
    if not cfg.generator.TRAINED:
        kind.check(cfg, None)
    if cfg.mining.enabled:
        check_models(cfg)


# -- what each stage does ---------------------------------------------------------------------

def _train_baseline(session: Session) -> Path:
    s = session
    return fit_classifier(s.data, s.cfg.model, s.cfg.train, s.cfg.scaling, s.cfg.seed,
                          s.out_dir, "classifier", evaluate=s.cfg.evaluate)


def _fresh(metrics_file: Path, model_file: Path) -> bool:
    return metrics_file.is_file() and metrics_file.stat().st_mtime >= model_file.stat().st_mtime


def _evaluate(session: Session, which: str = "baseline", split: str = "test"
              ) -> dict[str, Any]:
    """Test (or ``split``) metrics of the baseline (``metrics.json``) or the final classifier
    (``final/metrics.json``, ``final/<split>/`` unless test), computed unless the file is newer
    than the model."""
    out = session.out_dir
    folder = out / "classifier" if which == "baseline" else out / FINAL_DIR / "classifier"
    where = folder.parent if split == "test" else folder.parent / split
    metrics_file = where / METRICS_FILE
    if _fresh(metrics_file, folder / MODEL_FILE):
        metrics = json.loads(metrics_file.read_text())
    else:
        metrics = evaluate_classifier(folder, session.data, session.cfg.evaluate, where,
                                      split=split)
    log.info(f"{which} {split}: {format_summary(metrics, HEADLINE)}  -> {metrics_file}")
    return metrics


def scoring_criteria(cfg: Config) -> set[str]:
    """The criteria the run scores with: synthesis, the search's mixture and, with
    ``report.grid``, the grid's rows."""
    s = cfg.synthesis
    return (set(s.criteria) | set(cfg.tune.space.criteria or [])
            | (set(s.grid_criteria) if cfg.report.grid else set()))


def criterion_support(cfg: Config, out_dir: Path, data: LongTailData,
                      classifier_dir: Path | None = None,
                      criteria: set[str] | None = None) -> Path:
    """The baseline classifier's folder (or ``classifier_dir``, a guide fine-tuned in rounds),
    with what ``criteria`` (default ``scoring_criteria``) need beside it: the training set's
    embeddings (a Ray Data job), then the missing class statistics and heads, fitted in a Ray
    task on the cluster rather than in this process. A piece no criterion needs is not fitted;
    a rerun that needs it fits it then. Fails naming the stage when there is no classifier."""
    classifier_dir = require_stage(Path(classifier_dir or out_dir / "classifier") / MODEL_FILE,
                                   "classifier", "ray-lt train").parent
    s = cfg.synthesis
    needs = support_pieces(scoring_criteria(cfg) if criteria is None else criteria)
    ensure_training_features(classifier_dir, data, cfg.evaluate)
    missing = missing_support(classifier_dir, data, needs, s.hardness_covariance)
    if missing:
        task = ray.remote(fit_missing_support).options(**support_task_options(cfg))
        report_support(classifier_dir, ray.get(task.remote(
            classifier_dir, SupportShape.of(data), s.epistemic_heads, cfg.seed,
            s.hardness_covariance, missing)))
    return classifier_dir


def support_task_options(cfg: Config) -> dict[str, float]:
    """The Ray task that fits the statistics and heads is placed like one prediction actor
    (``evaluate.cpus_per_actor``, ``evaluate.gpus_per_actor``), which the capacity check has
    found room for: on a GPU cluster the heads train on a GPU, not on the head node's CPU."""
    pool = cfg.evaluate.pool
    return {"num_cpus": pool.cpus, "num_gpus": pool.gpus}


def _statistics(session: Session) -> Path:
    return criterion_support(session.cfg, session.out_dir, session.data)


def _generator(session: Session) -> Path:
    """Train the generator into ``generator/`` (``pixel``: DiffuLT on Ray Train; ``feature``:
    LDMLR on the baseline's training features, a Ray task), or check a pretrained one's
    folder (``ray_lt.generate.kinds``)."""
    cfg = session.cfg
    if not cfg.generator.TRAINED:
        check_generator(cfg, session.out_dir)
        log.info(f"generator: pretrained {cfg.generator.kind} from {cfg.generator.pretrained}")
        return Path(str(cfg.generator.pretrained))
    folder = generator_kind(cfg).train(cfg, session.out_dir, session.data)
    log.info(f"generator trained: {folder}")
    return folder


def _small(rows: int, data: LongTailData) -> bool:
    """Whether ``rows`` synthetic images are small enough to decode once into the object
    store instead of every epoch."""
    return rows * int(np.prod(data.image_shape)) <= MATERIALIZE_BYTES


def _fine_tune(session: Session, index: int) -> Path:
    """After round ``index``: the guide of that round fine-tuned for ``rounds.epochs`` epochs
    on real + the synthetic rows of rounds 1..index (its own ``train`` loss, learning rate
    ``rounds.lr`` or train.lr, no warm-up) into ``rounds/round<index>/classifier``. An
    interrupted fine-tune resumes from its Ray Train checkpoint."""
    cfg, out, data = session.cfg, session.out_dir, session.data
    model = cfg.model.model_copy(update={"checkpoint": round_guide(out, index) / MODEL_FILE})
    r, settings = cfg.rounds, fine_tune_settings(cfg)
    train_cfg = cfg.train.model_copy(update={"epochs": r.epochs, "lr": settings["rounds.lr"],
                                             "warmup_epochs": 0})
    record_fine_tune(out, index, settings)
    shards = set(shards_up_to(out, index))
    synthetic = load_synthetic(out, data.image_shape[2], filtered=False, shards=shards)
    rows = sum(sh["n"] for sh in stored_plan(out) if sh["shard_id"] in shards)
    if _small(rows, data):
        synthetic = synthetic.materialize()
    log.info(f"round {index}/{r.count}: fine-tuning the guide for {r.epochs} epochs on "
             f"real + {rows} synthetic rows")
    return fit_classifier(data, model, train_cfg, cfg.scaling, cfg.seed, round_dir(out, index),
                          "classifier", evaluate=cfg.evaluate, synthetic=synthetic)


def _fine_tuned(session: Session, index: int) -> bool:
    return (round_dir(session.out_dir, index) / "classifier" / MODEL_FILE).is_file()


def _synthesis(session: Session) -> Path:
    """Feedback-guided samples to the quotas in ``synthetic/`` (finished shards are kept).
    With ``rounds.count`` > 1 the quota is drawn in rounds, the guide fine-tuned between them
    (the ``fine_tune`` stage, then its criterion statistics); a rerun resumes at the first
    unfinished round, and ``rounds/rounds.csv`` / ``rounds.png`` summarise the rounds."""
    cfg, out, data = session.cfg, session.out_dir, session.data
    count = cfg.rounds.count
    if count > 1:
        check_fine_tunes(out, count, fine_tune_settings(cfg))
    criterion_support(cfg, out, data)
    if count == 1:
        counts = run_synthesis(cfg, data, out)
    else:
        sampling = cfg
        for index in range(1, count + 1):
            run_synthesis(sampling, data, out, index, round_guide(out, index))
            if index < count:
                guide = run_stage(FINE_TUNE, session, f"fine_tune.round{index}", index=index)
                criterion_support(cfg, out, data, guide)
                if cfg.mining.enabled:
                    run_stage(MINING, session, f"mining.round{index}", index=index)
                    sampling = cfg.model_copy(update={"generator": cfg.generator.model_copy(
                        update={"prompts_file": next_round_prompts(cfg, out, index,
                                                          data.class_names)})})
        counts = check_counts(out / SYNTHETIC_DIR, stored_plan(out))
        table = write_round_summary(out, count)
        log.info(f"rounds:\n{table.to_string(index=False)}\n-> "
                 f"{out / ROUNDS_DIR / 'rounds.csv'}")
    log.info(f"synthetic rows: {int(counts['written'].sum())} in {out / SYNTHETIC_DIR}")
    return out / SYNTHETIC_DIR


def _mine(session: Session, index: int) -> Path:
    """After round ``index``: its hardest and easiest samples per mined class described, the
    keywords between them scored, and the next round's prompts written (``mining/round<r>``)."""
    data = session.data
    return mine(session.cfg, data.class_names, data.class_counts, session.out_dir, index,
                data.context_names)


def _filter(session: Session) -> Path:
    report = filter_synthetic(session.out_dir, session.data, session.cfg)
    log.info(f"filter dropped {int(report['dropped'].sum())} of "
             f"{int(report['generated'].sum())} samples; per class:\n{report.to_string()}")
    return session.out_dir / SYNTHETIC_DIR / FILTER_FILE


def _no_filter(session: Session) -> None:
    verdicts = session.out_dir / SYNTHETIC_DIR / FILTER_FILE
    if verdicts.is_file():
        verdicts.unlink()  # filtering switched off: train on every sample
        forget_stage(session.out_dir, FILTER)


def _final(session: Session) -> Path:
    """The classifier trained on real + synthetic data into ``final/classifier``: from scratch
    or fine-tuned from the baseline (images), or its head fine-tuned on pseudo-features
    (``feature`` generator, LDMLR)."""
    cfg, out, data = session.cfg, session.out_dir, session.data
    final_dir = out / FINAL_DIR
    folder = final_dir / "classifier"
    train_cfg = final_train_config(cfg)
    baseline = out / "classifier"
    if cfg.generator.OUTPUTS == "features":  # LDMLR: the baseline's head on pseudo-features
        real = load_training_features(baseline)
        rows = load_synthetic(out, data.image_shape[2]).select_columns(
            ["feature", "label"]).to_pandas()
        task = ray.remote(fit_head).options(num_cpus=cfg.scaling.cpus_per_worker)
        return ray.get(task.remote(
            baseline, real,
            (np.stack(rows["feature"].to_numpy()).astype(np.float32),
             rows["label"].to_numpy()),
            data.class_counts.tolist(), train_cfg.model_dump(mode="json"), cfg.seed, folder))
    model = cfg.model
    if cfg.final.init == "baseline":
        model = model.model_copy(update={"checkpoint": baseline / MODEL_FILE})
    synthetic = load_synthetic(out, data.image_shape[2])
    rows = synthetic_count(out)
    if rows == 0:
        log.info("no synthetic rows (the quota is empty or all were filtered): "
                 "the final classifier trains on the real data alone")
        synthetic = None
    elif _small(rows, data):
        synthetic = synthetic.materialize()
    return fit_classifier(data, model, train_cfg, cfg.scaling, cfg.seed, final_dir,
                          "classifier", evaluate=cfg.evaluate, synthetic=synthetic,
                          callbacks=session.callbacks)


def grid_label(cfg: Config, data: LongTailData) -> int:
    """The class the sample grid shows: ``synthesis.grid_class``, or the rarest (-1)."""
    label = cfg.synthesis.grid_class
    return label if label >= 0 else int(data.class_counts.argmin())


def _grid_path(cfg: Config, out: Path, data: LongTailData) -> Path:
    return out / f"grid_class{grid_label(cfg, data)}.png"


def _grid(session: Session) -> Path:
    """The guidance sweep of one class (``ray_lt.generate.sweep``: ``report/guidance_sweep``
    .csv and .png) and its PNG grid: rows = criteria, columns = guidance scales (fixed, or
    chosen from the sweep)."""
    from ray_lt.generate.grid import save_grid, tile
    from ray_lt.generate.sweep import (
        Judge,
        class_images,
        draw_sweep,
        grid_columns,
        judge_images,
        nearest_distance,
        plot_sweep,
        sweep_table,
    )

    cfg, out, data = session.cfg, session.out_dir, session.data
    criterion_support(cfg, out, data, criteria=set(cfg.synthesis.grid_criteria))
    check_generator(cfg, out)
    s = cfg.synthesis
    label = grid_label(cfg, data)
    prepare_inputs(cfg, data, out)
    group, title, contexts = -1, data.class_names[label], len(data.context_names)
    if data.num_groups:  # the class's rarest context (an empty group where there is one)
        group = label * contexts + int(np.argmin(
            data.group_counts[label * contexts:(label + 1) * contexts]))
        title += f" on {data.context_names[group % contexts]} " \
                 f"({int(data.group_counts[group])} training images)"
    else:
        count = int(data.class_counts[label])
        title += f" ({count} training image{'s' if count != 1 else ''})"
    scales = s.sweep_and_grid_scales()
    task = ray.remote(draw_sweep).options(num_cpus=s.pool.cpus, num_gpus=s.pool.gpus)
    info = generator_info(data.class_names, data.context_names, data.image_shape[0])
    drawn = task.remote(cfg.model_dump(mode="json"), str(out), info, label, group, scales,
                        s.pool.use_gpu)
    # The judge and the training images are made on the driver while the task draws.
    judge = Judge(*judge_images(data))
    train = class_images(data, "train", label)
    held_out = class_images(data, "val", label)
    reference = float(np.median(nearest_distance(held_out, train))) if len(held_out) \
        else float("nan")
    drawn = ray.get(drawn)
    table = sweep_table(drawn, list(s.grid_criteria), scales, label, group, contexts, judge,
                        train)
    columns = s.grid_scales or grid_columns(table, s.sweep_drop, s.grid_columns)
    folder = out / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    table.assign(in_grid=table["scale"].isin(columns), held_out_nearest_train=reference
                 ).to_csv(folder / SWEEP_FILE, index=False)
    plot_sweep(table, reference, folder / SWEEP_PLOT, f"{title}: what guidance does")
    picked = [scales.index(x) for x in columns]
    images = np.stack([np.stack([tile(drawn["images"][i, j, :s.grid_samples]) for j in picked])
                       for i in range(len(s.grid_criteria))])
    path = save_grid(images, list(s.grid_criteria), [f"scale {x:g}" for x in columns],
                     _grid_path(cfg, out, data),
                     title=f"{title}: criterion x guidance scale")
    log.info(f"sample grid: {path}; guidance sweep: {folder / SWEEP_PLOT}")
    return path


def _no_grid(session: Session) -> None:
    if not _images(session.cfg):
        log.info(f"no sample grid: the {session.cfg.generator.kind} generator makes no images")


def _quality(session: Session) -> Path:
    """FID, density and coverage of the synthetic rows per criterion (``report/quality.csv``,
    kept while it is newer than every shard)."""
    synthetic_quality(session.cfg, session.out_dir, session.data)
    return session.out_dir / REPORT_DIR / QUALITY_FILE


def _report(session: Session) -> Path:
    r = session.results
    path = write_report(session.cfg, session.out_dir, session.data,
                        r[BASELINE_EVALUATION.name], r[EVALUATION.name], session.times)
    log.info(f"done in {time.perf_counter() - session.started:.0f} s; report: {path}")
    return path


# -- the registry -------------------------------------------------------------------------------

_DATA_EXCLUDED = ("dataset.verify_images", "generator.threads")
_MINING_RESOURCES = ("mining.num_actors", "mining.cpus_per_actor", "mining.gpus_per_actor")
_SAMPLER_RESOURCES = ("synthesis.num_actors", "synthesis.cpus_per_actor",
                      "synthesis.gpus_per_actor", "synthesis.writer_cpus",
                      "synthesis.writer_actors", "synthesis.batch_size",
                      "synthesis.max_shard_size", "synthesis.guidance_micro_batch",
                      "synthesis.decoder_checkpointing", "synthesis.compile",
                      "synthesis.compile_mode")
# Keys (included prefixes, excluded prefixes) that change what a stage writes: resources,
# batch sizes of inference, reporting and anything read only at sampling time are left out.


def _images(cfg: Config) -> bool:
    return cfg.generator.OUTPUTS == "images"


def _total(*pools: Pool) -> dict[str, float]:
    return {"CPU": sum(p.size * p.cpus for p in pools),
            "GPU": sum(p.size * p.gpus for p in pools)}


def _training(cfg: Config) -> dict[str, float]:
    """The Ray Train workers of a classifier (or of the ``pixel`` generator)."""
    sc = cfg.scaling
    return {"CPU": sc.num_workers * sc.cpus_per_worker,
            "GPU": sc.num_workers * sc.gpus_per_worker if sc.use_gpu else 0.0}


def _predicting(cfg: Config) -> dict[str, float]:
    return _total(cfg.evaluate.pool)


def _generator_holds(cfg: Config) -> dict[str, float]:
    if not cfg.generator.TRAINED:
        return {}
    if cfg.generator.OUTPUTS == "features":  # one task on the baseline's features
        return {"CPU": cfg.scaling.cpus_per_worker}
    return _training(cfg)


def _generator_reads(cfg: Config) -> tuple[str, ...]:
    """LDMLR's generator learns the baseline classifier's features; the others read nothing of
    the run, so they train beside the baseline."""
    return ("statistics",) if cfg.generator.OUTPUTS == "features" else ()


CLASSIFIER = Stage(
    "classifier", "baseline classifier", _train_baseline,
    keys=(("seed", "dataset.", "model.", "train."),
          _DATA_EXCLUDED + ("train.synthetic_weight", "train.synthetic_fraction")),
    output=lambda cfg, out: out / "classifier",
    complete=lambda s: (s.out_dir / "classifier" / MODEL_FILE).is_file(),
    needs=("train",), holds=_training,
    note=lambda cfg: f"{cfg.model.name}, {cfg.train.epochs} epochs", done="already trained")
BASELINE_EVALUATION = Stage(
    "baseline_evaluation", "baseline evaluation", _evaluate, holds=_predicting,
    after=("classifier",))
STATISTICS = Stage(
    "statistics", "criterion statistics", _statistics, holds=_predicting,
    after=("classifier",),
    note=lambda cfg: ", ".join(sorted(scoring_criteria(cfg))))
GENERATOR = Stage(
    "generator", "generator", _generator,
    keys=(("seed", "dataset.", "generator."),
          # what a trained generator is made of: none of the sampling-time keys
          _DATA_EXCLUDED + ("generator.embedding_dropout", "generator.noise_level",
                            "generator.prompts", "generator.negative_prompt",
                            "generator.references_per_group", "generator.height",
                            "generator.width")),
    output=lambda cfg, out: out / "generator",
    complete=lambda s: s.cfg.generator.TRAINED and (
        s.out_dir / "generator" / GENERATOR_SPEC).is_file(),
    recorded=lambda cfg: cfg.generator.TRAINED, needs=("train",), holds=_generator_holds,
    after=_generator_reads, note=lambda cfg: cfg.generator.kind, done="already trained")
SYNTHESIS = Stage(
    "synthesis", "synthesis", _synthesis,
    keys=(("seed", "dataset.", "generator.", "synthesis.", "rounds.", "mining."),
          _DATA_EXCLUDED + _SAMPLER_RESOURCES + _MINING_RESOURCES + ("synthesis.filter.",
                                                                       "synthesis.grid_")),
    output=lambda cfg, out: out / SYNTHETIC_DIR if (out / SYNTHETIC_DIR).exists()
    or not (out / ROUNDS_DIR).exists() else out / ROUNDS_DIR,
    needs=("synthesis",), after=("statistics", "generator"),
    holds=lambda cfg: _total(cfg.synthesis.pool, cfg.synthesis.writer_pool),
    note=lambda cfg: f"guidance {cfg.synthesis.guidance_scale:g}, {cfg.synthesis.num_actors} "
                     f"sampler actor(s)"
                     + (f", {cfg.rounds.count} rounds" if cfg.rounds.count > 1 else ""))
FINE_TUNE = Stage(
    "fine_tune", "guide fine-tune", _fine_tune, keys=(("rounds.epochs", "rounds.lr"), ()),
    complete=_fine_tuned, load=lambda s, index: round_dir(s.out_dir, index) / "classifier",
    needs=("train",), holds=_training, after=("synthesis",))
MINING = Stage(
    "mining", "mining", _mine, keys=(("mining.",), _MINING_RESOURCES + ("mining.enabled",)),
    output=lambda cfg, out: out / MINING_DIR,
    complete=lambda s, index: mined(s.out_dir, index),
    load=lambda s, index: mining_dir(s.out_dir, index) / PROMPTS_FILE,
    needs=("mining",), holds=lambda cfg: _total(cfg.mining.pool), after=("synthesis",),
    done="already done")
FILTER = Stage(
    "filter", "filter", _filter, keys=(("synthesis.filter.",), ()),
    output=lambda cfg, out: out / SYNTHETIC_DIR / FILTER_FILE,
    enabled=lambda cfg: cfg.synthesis.filter.enabled, disabled=_no_filter,
    holds=_predicting, after=("synthesis",))
FINAL = Stage(
    "final", "final classifier", _final,
    keys=(("seed", "dataset.", "model.", "train.", "final.", "generator.", "synthesis.",
           "rounds.", "mining."),
          _DATA_EXCLUDED + _SAMPLER_RESOURCES + _MINING_RESOURCES + ("synthesis.grid_",)),
    output=lambda cfg, out: out / FINAL_DIR,
    complete=lambda s: (s.out_dir / FINAL_DIR / "classifier" / MODEL_FILE).is_file(),
    load=lambda s: s.out_dir / FINAL_DIR / "classifier",
    needs=("train",), holds=_training, after=("synthesis", "filter"),
    note=lambda cfg: f"real + synthetic, init {cfg.final.init}", done="already trained")
EVALUATION = Stage(
    "evaluation", "evaluation", lambda s, split="test": _evaluate(s, "final", split),
    holds=_predicting, after=("final",))
GRID = Stage(
    "grid", "sample grid", _grid,
    keys=(("seed", "dataset.", "generator.", "synthesis."),
          _DATA_EXCLUDED + _SAMPLER_RESOURCES + (
              "synthesis.filter.", "synthesis.criteria.", "synthesis.balance",
              "synthesis.target", "synthesis.quota_")),
    complete=lambda s: _grid_path(s.cfg, s.out_dir, s.data).is_file(),
    load=lambda s: _grid_path(s.cfg, s.out_dir, s.data),
    redo_on_change=True, needs=("synthesis",), after=("statistics", "generator"),
    holds=lambda cfg: {"CPU": cfg.synthesis.pool.cpus, "GPU": cfg.synthesis.pool.gpus},
    enabled=lambda cfg: cfg.report.grid and _images(cfg), disabled=_no_grid,
    done="already drawn")
QUALITY = Stage(
    "quality", "synthetic-data quality", _quality, holds=_predicting,
    after=("synthesis", "filter"),
    enabled=lambda cfg: cfg.report.quality, note=lambda cfg: "FID, density, coverage")
REPORT = Stage(
    "report", "report", _report, after=("baseline_evaluation", "evaluation", "grid", "quality"))

STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    CLASSIFIER, BASELINE_EVALUATION, STATISTICS, GENERATOR, SYNTHESIS, FINE_TUNE, MINING,
    FILTER, FINAL, EVALUATION, GRID, QUALITY, REPORT)}
"""Every stage, in the order ``ray-lt run`` runs them (``fine_tune`` and ``mining`` inside
``synthesis``)."""
RUN_STAGES = tuple(stage for stage in STAGES.values() if stage not in (FINE_TUNE, MINING))
