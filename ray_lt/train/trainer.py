"""Driver side of classifier training: build a ``TorchTrainer``, fit, export the model."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ray_lt.atomic import staged_folder
from ray_lt.config import EvaluateConfig, ModelConfig, ScalingSection, TrainConfig
from ray_lt.data import LongTailData
from ray_lt.errors import ConfigError, StageError, TrainingError
from ray_lt.train.loop import STATE_FILE, train_loop_per_worker
from ray_lt.train.models import Classifier, build_model
from ray_lt.train.progress import divergence, train_progress

MODEL_FILE = "model.pt"
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Ray Train passes it on to its controller
_POLL_SET_BY_USER = POLL_ENV in os.environ
SPEC_FILE = "classifier.json"
HISTORY_FILE = "history.csv"
TRAINING_COLUMNS = ["image", "label"]


def model_spec(model: ModelConfig, data: LongTailData) -> dict[str, Any]:
    """Plain keyword arguments of ``build_model`` for this data set."""
    return {"name": model.name, "num_classes": data.num_classes,
            "in_channels": data.image_shape[2], "width": model.width, "mean": model.mean,
            "std": model.std, "checkpoint": str(model.checkpoint) if model.checkpoint else None}


def _training_columns(ds: ray.data.Dataset, extra: tuple[str, ...] = ("weight",)
                      ) -> ray.data.Dataset:
    columns = ds.columns()
    return ds.select_columns(TRAINING_COLUMNS + [c for c in extra if c in columns])


def fit_classifier(data: LongTailData, model: ModelConfig, train: TrainConfig,
                   scaling: ScalingSection, seed: int, out_dir: Path, name: str, *,
                   evaluate: EvaluateConfig, synthetic: ray.data.Dataset | None = None,
                   callbacks: list[Any] | None = None) -> Path:
    """Train on ``data.train`` (+ ``synthetic``) with DDP and export to ``out_dir/name``.

    Every epoch reports validation accuracy, Few accuracy and worst-group accuracy (Many/Few
    by ``evaluate.many_threshold`` / ``few_threshold``); ``callbacks`` go to Ray Train's
    ``RunConfig`` (``ray-lt tune`` passes Tune's report callback). Ray Train keeps its run under
    ``out_dir/ray_results/name``; running again after an interruption resumes from that run's
    latest checkpoint (Ray Train V2 restores a run found under the same name and storage path).
    Returns the exported folder,
    holding ``model.pt``, ``classifier.json`` (how to rebuild it) and ``history.csv``.
    """
    out_dir = Path(out_dir).resolve()
    spec = model_spec(model, data)
    build_model(**spec)  # fail on a bad name, channel count or checkpoint before Ray starts
    loop_config = {
        "model": spec, "train": train.model_dump(mode="json"), "seed": seed,
        "class_counts": data.class_counts.tolist(), "has_synthetic": synthetic is not None,
        "has_val": True, "num_groups": data.num_groups,
        "many_threshold": evaluate.many_threshold, "few_threshold": evaluate.few_threshold,
        "group_counts": data.group_counts.tolist() if data.group_counts is not None else [],
    }
    if train.group_objective != "erm" and not data.num_groups:
        raise ConfigError(f"train.group_objective: {train.group_objective!r} needs a data set "
                          f"with class x context groups (nico_pp, digits_groups); set erm")
    extra = ("weight", "group") if train.group_objective != "erm" else ("weight",)
    datasets = {"train": _training_columns(data.train, extra),
                "val": _training_columns(data.val, extra=("group",))}
    if synthetic is not None:
        datasets["synthetic"] = _training_columns(synthetic, extra)
    result = run_trainer(train_loop_per_worker, loop_config, datasets, scaling, out_dir, name,
                         split=[k for k in datasets if k != "val"], callbacks=callbacks,
                         progress=None if callbacks else (name, train.epochs, "epoch"),
                         ordered=train.deterministic, lr=("train.lr", train.lr))
    return export(result, spec, out_dir / name)


def run_trainer(loop: Any, loop_config: dict[str, Any], datasets: dict[str, ray.data.Dataset],
                scaling: ScalingSection, out_dir: Path, name: str, split: list[str],
                callbacks: list[Any] | None = None,
                progress: tuple[str, int, str] | None = None, ordered: bool = True,
                lr: tuple[str, float] = ("train.lr", float("nan"))) -> ray.train.Result:
    """Fit ``loop`` with a ``TorchTrainer`` whose run lives in ``out_dir/ray_results/name``, so
    that a rerun after an interruption resumes from the run's latest checkpoint.
    ``progress`` (description, total, unit) draws a bar on the driver that the loop advances
    with ``report_progress``. ``ordered`` keeps Ray Data's block order in the workers' shards,
    so that seeded shuffles make the same batches on every run. A loop that reports its loss
    no longer finite (``report_divergence``) ends in a TrainingError naming ``lr`` (its config
    key and value)."""
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    shown = progress or (name, 0, "")
    with train_progress(loop_config, *shown, bar=progress is not None) as loop_config:
        result = _trainer(loop, loop_config, datasets, scaling, resources, out_dir, name,
                          split, callbacks, ordered).fit()
        diverged = divergence(loop_config)
    if diverged is not None:
        unit = progress[2] if progress else "epoch"
        folder = Path(out_dir).resolve() / "ray_results" / name
        kept = (f"the last finite checkpoint ({unit} {diverged['last_checkpoint']}) is kept in "
                f"{folder}" if diverged["last_checkpoint"] is not None else
                f"no {unit} before it ended finite, so there is no checkpoint to keep")
        raise TrainingError(f"{name}: the training loss became {diverged['loss']} in {unit} "
                            f"{diverged['at']}, so training stopped there and nothing was "
                            f"exported; {kept}. Lower {lr[0]} (now {lr[1]:g}), delete {folder} "
                            f"and train again (a rerun that keeps it resumes from its "
                            f"checkpoint with the old settings)")
    return result


def _trainer(loop: Any, loop_config: dict[str, Any], datasets: dict[str, ray.data.Dataset],
             scaling: ScalingSection, resources: dict[str, float], out_dir: Path, name: str,
             split: list[str], callbacks: list[Any] | None, ordered: bool) -> TorchTrainer:
    # The controller takes each ray.train.report at its next poll of the workers; a variable
    # that the user set before ray_lt was imported wins.
    if not _POLL_SET_BY_USER:
        os.environ[POLL_ENV] = f"{scaling.poll_seconds:g}"
    with warnings.catch_warnings():  # Ray's own defaults set a field it now deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = ordered
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=str(Path(out_dir).resolve() / "ray_results"),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=scaling.checkpoints_to_keep),
            callbacks=callbacks),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=split, execution_options=ingest),
    )


def export(result: ray.train.Result, spec: dict[str, Any], folder: Path) -> Path:
    """Write the final weights, the build spec and the per-epoch history to ``folder``."""
    if result.checkpoint is None:
        raise RuntimeError(f"training {folder.name} finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        state = torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=True)
    with staged_folder(folder) as tmp:
        tmp.mkdir(parents=True)
        torch.save(state["model"], tmp / MODEL_FILE)
        (tmp / SPEC_FILE).write_text(json.dumps({**spec, "checkpoint": None}, indent=2))
        pd.DataFrame(state["history"]).to_csv(tmp / HISTORY_FILE, index=False)
    return folder


def load_classifier(folder: Path, device: str | torch.device = "cpu") -> Classifier:
    """Rebuild an exported classifier in eval mode."""
    folder = Path(folder)
    spec = json.loads((folder / SPEC_FILE).read_text())
    model = build_model(**spec)
    try:  # tensors and plain containers only: a pickled object is refused, never run
        state = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise StageError(f"{folder / MODEL_FILE}: not a state dict of tensors, refused "
                         f"({type(err).__name__}); train the classifier stage again") from None
    model.load_state_dict(state)
    return model.to(device).eval()
