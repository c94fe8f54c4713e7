"""The pipeline's stages, each reading and writing one run directory: the classifier on the
real data, the criterion statistics, the generator, guided synthesis (+ filter), the
classifier on real + synthetic data, evaluation and the sample grid; and the session they
share (Ray started once, the data loaded and checked once).

A stage whose output is already complete in the run directory is not run again. The commands
users run (``ray_lt.commands``) and the tuner's trials (``ray_lt.tune.search``) are made of
these stages.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray._private.utils import read_ray_address

from ray_lt.cluster import Capacity, cluster_capacity
from ray_lt.config import Config, RayConfig, final_train_config
from ray_lt.data import LongTailData, check_images, load_dataset
from ray_lt.errors import ClusterError, ConfigError, DataError, require_stage
from ray_lt.evaluate.classifier import METRICS_FILE, evaluate_classifier
from ray_lt.evaluate.metrics import HEADLINE
from ray_lt.generate.base import SPEC_FILE as GENERATOR_SPEC
from ray_lt.generate.criteria import check_covariance_size
from ray_lt.generate.factory import check_generator, generator_info
from ray_lt.generate.filtering import filter_synthetic
from ray_lt.generate.kinds import generator_kind
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
from ray_lt.generate.statistics import fit_criterion_support, load_training_features
from ray_lt.generate.synthesize import prepare_inputs
from ray_lt.generate.synthesize import synthesize as run_synthesis
from ray_lt.generate.synthetic import (
    FILTER_FILE,
    SYNTHETIC_DIR,
    load_synthetic,
    synthetic_count,
)
from ray_lt.log import log_to_file, verbose
from ray_lt.rundir import check_run_config_file, write_run_config
from ray_lt.stages import (
    STAGES_FILE,
    check_stage,
    check_stages,
    forget_stage,
    record_stage,
    stage_matches,
)
from ray_lt.train import fit_classifier
from ray_lt.train.head import fit_head
from ray_lt.train.models import feature_dim
from ray_lt.train.trainer import MODEL_FILE

log = logging.getLogger(__name__)

FINAL_DIR = "final"
MATERIALIZE_BYTES = 1 << 30  # synthetic sets up to this size are decoded once, not per epoch


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
    """Connect to the configured cluster, to RAY_ADDRESS (ray job submit), or start Ray here;
    a cluster that cannot be reached or started is a ClusterError saying where and why.

    Unless verbose (``--verbose``), the workers' output and Ray's INFO lines stay in Ray's
    session logs and Ray Data shows no per-dataset progress bars (see ``ray_lt.log``).
    """
    loud = verbose()
    if not ray.is_initialized():
        address = ray_address(cfg.address)
        if address not in (None, "local", "auto") and not address.startswith("ray://") \
                and not _reachable(address, timeout=5.0):  # ray.init would retry for minutes
            raise ClusterError(ray_start_failure(address, cfg.address, ConnectionError(
                f"nothing answers at {address}")))
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=loud,
                     logging_level=logging.INFO if loud else logging.WARNING,
                     runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}})
        except Exception as err:  # Ray raises ConnectionError, RuntimeError or plain Exception
            ray.shutdown()  # stop what a half-started local cluster left running
            raise ClusterError(ray_start_failure(address, cfg.address, err)) from err
    ray.data.DataContext.get_current().enable_progress_bars = loud


def ray_start_failure(address: str | None, configured: str | None, err: Exception) -> str:
    """What failed when ``ray.init`` raised ``err``, and what to try."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if address == "local":
        return (f"Ray could not start a local cluster on this machine: {reason}. On a busy "
                f"machine Ray's processes can time out while starting: try again when it is "
                f"less loaded, or start one with `ray start --head` and set ray.address")
    where = (f"ray.address {configured!r}" if configured
             else f"RAY_ADDRESS {os.environ.get('RAY_ADDRESS', address)!r}")
    lowered = reason.lower()
    if "token" in lowered or "auth" in lowered or "unauthenticated" in lowered:
        hint = ("the cluster refused this machine's authentication token: use that cluster's "
                "token (`ray get-auth-token` on its head node, then RAY_AUTH_TOKEN)")
    else:
        hint = ("check the address (`ray status` on the head node prints it) and that the "
                "cluster is up and reachable from here")
    return f"{where}: could not connect to the Ray cluster: {reason}; {hint}"


def prepare(cfg: Config, out_dir: Path, needs: tuple[str, ...] = (), command: str = "run",
            stages: tuple[str, ...] = (),
            check: Callable[[LongTailData], None] | None = None) -> tuple[Path, LongTailData]:
    """Everything a command does before its stages, checks first: read and check the data's
    index files and what the config decides with them (``check_inputs``, then the caller's
    ``check``), that the recorded ``stages`` were made with this config; then start Ray,
    check that the cluster can run what the caller ``needs`` (``check_cluster_resources``),
    decode the images (``dataset.verify_images``), and only then record the config as
    ``out_dir/config.yaml``. Nothing in ``out_dir`` is written before the checks pass but
    the log."""
    out_dir = Path(out_dir).resolve()
    data = load_dataset(cfg.dataset, cfg.seed)
    check_inputs(cfg, data)
    if check is not None:
        check(data)
    outputs = stage_outputs(cfg, out_dir)
    check_stages(cfg, out_dir, {k: v for k, v in outputs.items() if k in stages})
    check_run_config_file(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_to_file(out_dir)
    init_ray(cfg.ray)
    check_cluster_resources(cfg, cluster_capacity(cfg.ray.autoscaler_config), needs)
    log.debug("Ray session logs (every worker's output): %s", ray_session_logs())
    log.debug("full log: %s", log_file)
    check_images(cfg.dataset, data)
    write_run_config(cfg, out_dir, command)
    return out_dir, data


def criteria_in_use(cfg: Config) -> set[str]:
    """Every criterion the config may score with: synthesis, the grid's rows, the search."""
    return (set(cfg.synthesis.criteria) | set(cfg.synthesis.grid_criteria)
            | set(cfg.tune.space.criteria or []))


def check_inputs(cfg: Config, data: LongTailData) -> None:
    """What the config decides together with the data's index, refused before Ray starts
    (instead of in the stage that would meet it, after hours of training)."""
    if "hardness" in criteria_in_use(cfg):
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


DATA_TASK_CPUS = 1.0  # what a Ray Data read or map task asks for unless told otherwise


def check_cluster_resources(cfg: Config, capacity: Capacity | dict[str, float],
                            needs: tuple[str, ...]) -> None:
    """Refuse settings that the cluster (``ray_lt.cluster.cluster_capacity``: its nodes and
    what its autoscaler may add; a plain dict of resources is a fixed cluster) can never
    schedule, which would otherwise wait for them forever with every process idle.

    ``needs`` names what the command runs: ``train`` (Ray Train workers, which must leave
    Ray Data a CPU for its read and map tasks), ``synthesis`` (the sampler actor pool, the grid
    task) and ``tune`` (each trial's driver beside its Train workers); the evaluation actor
    pool is always checked. A worker or actor must also fit on one node.
    """
    if not isinstance(capacity, Capacity):
        capacity = Capacity(dict(capacity), dict(capacity))
    resources = capacity.most
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    has = capacity.describe()
    problems = []

    def one_node(key: str, what: str, demand: dict[str, float]) -> None:
        if capacity.nodes and not capacity.fits_one_node(demand):
            shown = ", ".join(f"{v:g} {k}" for k, v in demand.items() if v > 0)
            problems.append(f"{key}: {what} needs {shown} on one node, but no node "
                            f"{'or node type ' if capacity.autoscaling else ''}of the cluster "
                            f"has that much ({has}); lower {key}")

    def pool(section: str, size: int, cpus_each: float, gpus_each: float) -> None:
        if size * cpus_each > cpus:
            problems.append(f"{section}.cpus_per_actor: {size} actor(s) x {cpus_each:g} CPU = "
                            f"{size * cpus_each:g} CPUs, but {has}; lower {section}.num_actors "
                            f"or {section}.cpus_per_actor")
        if gpus_each > 0 and size * gpus_each > gpus:
            problems.append(f"{section}.gpus_per_actor: {size} actor(s) x {gpus_each:g} GPU = "
                            f"{size * gpus_each:g} GPUs, but {has}; lower {section}.num_actors "
                            f"or set {section}.gpus_per_actor: 0")
        one_node(f"{section}.cpus_per_actor", f"one {section} actor",
                 {"CPU": cpus_each, "GPU": gpus_each})

    sc = cfg.scaling
    if "train" in needs:
        if sc.use_gpu and sc.num_workers * sc.gpus_per_worker > gpus:
            problems.append(f"scaling.use_gpu: true asks for {sc.num_workers} worker(s) x "
                            f"{sc.gpus_per_worker:g} GPU (scaling.gpus_per_worker), but {has}; "
                            f"set scaling.use_gpu: false or connect to a cluster with GPUs "
                            f"(ray.address)")
        trial = cfg.tune.trial_cpus if "tune" in needs else 0.0
        held = sc.num_workers * sc.cpus_per_worker + trial
        if held + DATA_TASK_CPUS > cpus:
            beside = f" + tune.trial_cpus {trial:g}" if trial else ""
            problems.append(f"scaling.cpus_per_worker: {sc.num_workers} worker(s) x "
                            f"{sc.cpus_per_worker:g} CPU{beside} = {held:g} CPUs leave Ray Data "
                            f"{max(cpus - held, 0):g} of the cluster's CPUs, and each of its "
                            f"tasks needs {DATA_TASK_CPUS:g}: training would wait forever; "
                            f"{has}; lower scaling.cpus_per_worker or scaling.num_workers")
        one_node("scaling.cpus_per_worker", "one training worker",
                 {"CPU": sc.cpus_per_worker,
                  "GPU": sc.gpus_per_worker if sc.use_gpu else 0.0})
    if "synthesis" in needs:
        # The sampler pool goes on with as many actors as fit (ray_lt.generate.synthesize):
        # one actor beside the writer must fit; fewer than asked is worth a warning.
        s = cfg.synthesis
        if s.cpus_per_actor + s.writer_cpus > cpus:
            problems.append(f"synthesis.cpus_per_actor: one sampler actor ({s.cpus_per_actor:g} "
                            f"CPU) beside the shard writer (synthesis.writer_cpus "
                            f"{s.writer_cpus:g}) needs {s.cpus_per_actor + s.writer_cpus:g} "
                            f"CPUs, but {has}; lower synthesis.cpus_per_actor")
        if s.gpus_per_actor > gpus:
            problems.append(f"synthesis.gpus_per_actor: one sampler actor needs "
                            f"{s.gpus_per_actor:g} GPU, but {has}; set "
                            f"synthesis.gpus_per_actor: 0 or connect to a cluster with GPUs")
        one_node("synthesis.cpus_per_actor", "one sampler actor",
                 {"CPU": s.cpus_per_actor, "GPU": s.gpus_per_actor})
        fit = min(s.num_actors, int((cpus - s.writer_cpus) // s.cpus_per_actor),
                  int(gpus // s.gpus_per_actor) if s.gpus_per_actor > 0 else s.num_actors)
        if not problems and 0 < fit < s.num_actors:
            log.warning(f"synthesis.num_actors: {s.num_actors} asked, {fit} fit beside the "
                        f"writer ({has}); the sampler pool runs with {fit}")
    e = cfg.evaluate
    pool("evaluate", e.num_actors, e.cpus_per_actor, e.gpus_per_actor)
    if problems:
        raise ConfigError("the Ray cluster cannot run this config\n  " + "\n  ".join(problems))


def ray_session_logs() -> str:
    """Where this Ray session keeps its logs, on the head node."""
    try:
        from ray._private.worker import global_worker

        return str(Path(global_worker.node.get_session_dir_path()) / "logs")
    except AttributeError:  # connected through a client: the path is on the cluster
        return "the head node's /tmp/ray/session_latest/logs"


def format_summary(metrics: dict[str, Any]) -> str:
    cells = [f"{k} {metrics[k]:.3f}" for k in HEADLINE if metrics.get(k) is not None]
    return "  ".join(cells)


def banner(step: int, total: int, name: str, note: str = "", since: float | None = None
           ) -> None:
    elapsed = f" [{time.perf_counter() - since:.0f} s]" if since is not None else ""
    log.info(f"stage {step}/{total} {name}{': ' + note if note else ''}{elapsed}")


# -- stages: each takes the loaded data, skips itself when its output is complete -------------

def baseline_stage(cfg: Config, out_dir: Path, data: LongTailData) -> dict[str, Any]:
    """The classifier on the real data (``classifier/``) and its test metrics."""
    folder = out_dir / "classifier"
    if (folder / MODEL_FILE).is_file():
        check_stage(cfg, out_dir, "classifier", folder)
        log.info(f"baseline classifier already trained: {folder}")
    else:
        fit_classifier(data, cfg.model, cfg.train, cfg.scaling, cfg.seed, out_dir, "classifier",
                       many_threshold=cfg.evaluate.many_threshold,
                       few_threshold=cfg.evaluate.few_threshold)
    record_stage(cfg, out_dir, "classifier")
    metrics_file = out_dir / METRICS_FILE
    if metrics_file.is_file() and metrics_file.stat().st_mtime >= \
            (folder / MODEL_FILE).stat().st_mtime:
        metrics = json.loads(metrics_file.read_text())
    else:
        metrics = evaluate_classifier(folder, data, cfg.evaluate, out_dir)
    log.info(f"baseline test: {format_summary(metrics)}  -> {metrics_file}")
    return metrics


def criterion_support(cfg: Config, out_dir: Path, data: LongTailData,
                      classifier_dir: Path | None = None) -> Path:
    """The baseline classifier's folder (or ``classifier_dir``, a guide fine-tuned in rounds),
    with the class statistics and heads that the criteria need (computed on first use); fails
    naming the stage when there is none."""
    classifier_dir = require_stage(Path(classifier_dir or out_dir / "classifier") / MODEL_FILE,
                                   "classifier", "ray-lt train").parent
    fit_criterion_support(classifier_dir, data, cfg.synthesis.epistemic_heads, cfg.evaluate,
                          cfg.seed, cfg.synthesis.hardness_covariance)
    return classifier_dir


def generator_stage(cfg: Config, out_dir: Path, data: LongTailData) -> Path:
    """Train the generator into ``generator/`` (``pixel``: DiffuLT on Ray Train; ``feature``:
    LDMLR on the baseline's training features, a Ray task), or check a pretrained one's
    folder (``ray_lt.generate.kinds``)."""
    g = cfg.generator
    if not g.TRAINED:
        check_generator(cfg, out_dir)
        log.info(f"generator: pretrained {g.kind} from {g.pretrained}")
        return Path(str(g.pretrained))
    folder = out_dir / "generator"
    if (folder / GENERATOR_SPEC).is_file():
        check_stage(cfg, out_dir, "generator", folder)
        record_stage(cfg, out_dir, "generator")
        log.info(f"generator already trained: {folder}")
        return folder
    folder = generator_kind(cfg).train(cfg, out_dir, data)
    record_stage(cfg, out_dir, "generator")
    log.info(f"generator trained: {folder}")
    return folder


def _small(rows: int, data: LongTailData) -> bool:
    """Whether ``rows`` synthetic images are small enough to decode once into the object
    store instead of every epoch."""
    return rows * int(np.prod(data.image_shape)) <= MATERIALIZE_BYTES


def fine_tune_guide(cfg: Config, out_dir: Path, data: LongTailData, index: int) -> Path:
    """After round ``index``: the guide of that round fine-tuned for ``rounds.epochs`` epochs
    on real + the synthetic rows of rounds 1..index (its own ``train`` loss, learning rate
    ``rounds.lr`` or train.lr, no warm-up) into ``rounds/round<index>/classifier``, with its
    criterion statistics and heads. Kept when already there; an interrupted fine-tune resumes
    from its Ray Train checkpoint."""
    folder = round_dir(out_dir, index)
    classifier_dir = folder / "classifier"
    if not (classifier_dir / MODEL_FILE).is_file():
        model = cfg.model.model_copy(
            update={"checkpoint": round_guide(out_dir, index) / MODEL_FILE})
        r, settings = cfg.rounds, fine_tune_settings(cfg)
        train_cfg = cfg.train.model_copy(update={"epochs": r.epochs, "lr": settings["rounds.lr"],
                                                 "warmup_epochs": 0})
        record_fine_tune(out_dir, index, settings)
        shards = set(shards_up_to(out_dir, index))
        synthetic = load_synthetic(out_dir, data.image_shape[2], filtered=False, shards=shards)
        rows = sum(sh["n"] for sh in stored_plan(out_dir) if sh["shard_id"] in shards)
        if _small(rows, data):
            synthetic = synthetic.materialize()
        log.info(f"round {index}/{r.count}: fine-tuning the guide for {r.epochs} epochs on "
                 f"real + {rows} synthetic rows")
        fit_classifier(data, model, train_cfg, cfg.scaling, cfg.seed, folder, "classifier",
                       synthetic=synthetic, many_threshold=cfg.evaluate.many_threshold,
                       few_threshold=cfg.evaluate.few_threshold)
    criterion_support(cfg, out_dir, data, classifier_dir)
    return classifier_dir


def synthesis_stage(cfg: Config, out_dir: Path, data: LongTailData) -> Path:
    """Feedback-guided samples to the quotas in ``synthetic/`` (finished shards are kept),
    then the optional DiffuLT filter. With ``rounds.count`` > 1 the quota is drawn in rounds,
    the guide fine-tuned between them (``fine_tune_guide``); a rerun resumes at the first
    unfinished round, and ``rounds/rounds.csv`` / ``rounds.png`` summarise the rounds."""
    out = out_dir / SYNTHETIC_DIR
    if out.exists() or (out_dir / ROUNDS_DIR).exists():
        check_stage(cfg, out_dir, "synthesis", out)
    count = cfg.rounds.count
    if count > 1:
        check_fine_tunes(out_dir, count, fine_tune_settings(cfg))
    criterion_support(cfg, out_dir, data)
    if count == 1:
        counts = run_synthesis(cfg, data, out_dir)
    else:
        for index in range(1, count + 1):
            run_synthesis(cfg, data, out_dir, index, round_guide(out_dir, index))
            if index < count:
                fine_tune_guide(cfg, out_dir, data, index)
        counts = check_counts(out, stored_plan(out_dir))
        table = write_round_summary(out_dir, count)
        log.info(f"rounds:\n{table.to_string(index=False)}\n-> "
                 f"{out_dir / ROUNDS_DIR / 'rounds.csv'}")
    record_stage(cfg, out_dir, "synthesis")
    log.info(f"synthetic rows: {int(counts['written'].sum())} in {out}")
    if cfg.synthesis.filter.enabled:
        verdicts = out / FILTER_FILE
        if verdicts.is_file() and (out_dir / STAGES_FILE).is_file():
            check_stage(cfg, out_dir, "filter", verdicts)
        report = filter_synthetic(out_dir, data, cfg)
        record_stage(cfg, out_dir, "filter")
        log.info(f"filter dropped {int(report['dropped'].sum())} of "
                 f"{int(report['generated'].sum())} samples; per class:\n{report.to_string()}")
    elif (out / FILTER_FILE).is_file():
        (out / FILTER_FILE).unlink()  # filtering switched off: train on every sample
        forget_stage(out_dir, "filter")
    return out


def final_stage(cfg: Config, out_dir: Path, data: LongTailData,
                callbacks: list[Any] | None = None) -> Path:
    """The classifier trained on real + synthetic data into ``final/classifier``: from scratch
    or fine-tuned from the baseline (images), or its head fine-tuned on pseudo-features
    (``feature`` generator, LDMLR)."""
    final_dir = out_dir / FINAL_DIR
    folder = final_dir / "classifier"
    if (folder / MODEL_FILE).is_file():
        check_stage(cfg, out_dir, "final", final_dir)
        log.info(f"final classifier already trained: {folder}")
        return folder
    train_cfg = final_train_config(cfg)
    baseline = out_dir / "classifier"
    if cfg.generator.OUTPUTS == "features":  # LDMLR: the baseline's head on pseudo-features
        real = load_training_features(baseline)
        rows = load_synthetic(out_dir, data.image_shape[2]).select_columns(
            ["feature", "label"]).to_pandas()
        task = ray.remote(fit_head).options(num_cpus=cfg.scaling.cpus_per_worker)
        folder = ray.get(task.remote(
            baseline, real,
            (np.stack(rows["feature"].to_numpy()).astype(np.float32),
             rows["label"].to_numpy()),
            data.class_counts.tolist(), train_cfg.model_dump(mode="json"), cfg.seed, folder))
    else:
        model = cfg.model
        if cfg.final.init == "baseline":
            model = model.model_copy(update={"checkpoint": baseline / MODEL_FILE})
        synthetic = load_synthetic(out_dir, data.image_shape[2])
        rows = synthetic_count(out_dir)
        if rows == 0:
            log.info("no synthetic rows (the quota is empty or all were filtered): "
                     "the final classifier trains on the real data alone")
            synthetic = None
        elif _small(rows, data):
            # Small enough to decode once into the object store instead of every epoch.
            synthetic = synthetic.materialize()
        folder = fit_classifier(data, model, train_cfg, cfg.scaling, cfg.seed, final_dir,
                                "classifier", synthetic=synthetic,
                                many_threshold=cfg.evaluate.many_threshold,
                                few_threshold=cfg.evaluate.few_threshold, callbacks=callbacks)
    record_stage(cfg, out_dir, "final")
    return folder


def evaluate_stage(cfg: Config, out_dir: Path, data: LongTailData, split: str = "test"
                   ) -> dict[str, Any]:
    """Metrics of the final classifier on ``split`` in ``final/`` (``final/<split>/`` unless
    test)."""
    final_dir = out_dir / FINAL_DIR
    where = final_dir if split == "test" else final_dir / split
    metrics_file = where / METRICS_FILE
    model_file = final_dir / "classifier" / MODEL_FILE
    if metrics_file.is_file() and metrics_file.stat().st_mtime >= model_file.stat().st_mtime:
        metrics = json.loads(metrics_file.read_text())
    else:
        metrics = evaluate_classifier(final_dir / "classifier", data, cfg.evaluate, where,
                                      split=split)
    log.info(f"final {split}: {format_summary(metrics)}  -> {metrics_file}")
    return metrics


def grid_stage(cfg: Config, out_dir: Path, data: LongTailData) -> Path | None:
    """PNG grid of one class's samples: rows = criteria, columns = guidance scales."""
    from ray_lt.generate.grid import render_grid, save_grid

    if cfg.generator.OUTPUTS == "features":
        log.info(f"no sample grid: the {cfg.generator.kind} generator makes no images")
        return None
    criterion_support(cfg, out_dir, data)
    check_generator(cfg, out_dir)
    s = cfg.synthesis
    label = s.grid_class if s.grid_class >= 0 else int(data.class_counts.argmin())
    if label >= data.num_classes:
        raise ConfigError(f"synthesis.grid_class: {label} is not a class of this data set")
    path = out_dir / f"grid_class{label}.png"
    if path.is_file() and stage_matches(cfg, out_dir, "grid"):
        log.info(f"sample grid already drawn: {path}")
        return path
    prepare_inputs(cfg, data, out_dir)
    group, title = -1, data.class_names[label]
    if data.num_groups:  # the class's rarest context (an empty group where there is one)
        contexts = len(data.context_names)
        group = label * contexts + int(np.argmin(
            data.group_counts[label * contexts:(label + 1) * contexts]))
        title += f" on {data.context_names[group % contexts]} " \
                 f"({int(data.group_counts[group])} training images)"
    task = ray.remote(render_grid).options(num_cpus=s.cpus_per_actor, num_gpus=s.gpus_per_actor)
    info = generator_info(data.class_names, data.context_names, data.image_shape[0])
    images = ray.get(task.remote(cfg.model_dump(mode="json"), str(out_dir), info, label,
                                 s.gpus_per_actor > 0, group))
    save_grid(images, list(s.grid_criteria), [f"scale {x:g}" for x in s.grid_scales], path,
              title=f"{title}: criterion x guidance scale")
    record_stage(cfg, out_dir, "grid")
    log.info(f"sample grid: {path}")
    return path


def stage_outputs(cfg: Config, out_dir: Path) -> dict[str, Path]:
    """What each recorded stage leaves in ``out_dir``."""
    outputs = {"classifier": out_dir / "classifier", "generator": out_dir / "generator",
               "synthesis": out_dir / SYNTHETIC_DIR, "final": out_dir / FINAL_DIR}
    if cfg.synthesis.filter.enabled:
        outputs["filter"] = out_dir / SYNTHETIC_DIR / FILTER_FILE
    return outputs


def check_run_config(cfg: Config) -> None:
    """Settings ``run`` cannot honour and inputs that are not there (data folder, classifier
    checkpoint, pretrained generator), refused before Ray starts or anything is written."""
    root = getattr(cfg.dataset, "root", None)
    if root is not None and not Path(root).is_dir():
        raise DataError(f"dataset.root: data folder {root} does not exist")
    if cfg.model.checkpoint is not None and not Path(cfg.model.checkpoint).is_file():
        raise ConfigError(f"model.checkpoint: file {cfg.model.checkpoint} does not exist")
    kind = generator_kind(cfg)
    kind.check_config(cfg)
    if not cfg.generator.TRAINED:
        kind.check(cfg, None)
