"""Closed-loop synthesis in rounds (LTG, docs/method.md §7): which classifier guides each
round, and the per-round summary the report shows (``DIR/rounds/rounds.csv``, ``rounds.png``).

Round 1 is guided by the baseline (``DIR/classifier``); after round r < R the guide is
fine-tuned on real + the synthetic rows of rounds 1..r into ``DIR/rounds/round<r>/classifier``,
which guides round r + 1. The fine-tuning itself is a pipeline stage (``ray_lt.pipeline``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ray_lt.atomic import write_text_atomic
from ray_lt.errors import ConfigError
from ray_lt.generate.plan import MANIFEST_FILE, PLAN_FILE
from ray_lt.generate.synthetic import SYNTHETIC_DIR, shard_file

if TYPE_CHECKING:
    from ray_lt.config import Config

ROUNDS_DIR = "rounds"
SUMMARY_FILE = "rounds.csv"
PLOT_FILE = "rounds.png"
GUIDE_METRICS = ("val_acc", "val_balanced_acc", "val_few", "val_worst_group",
                 "val_unseen_groups")
FINE_TUNE_FILE = "fine_tune.json"


def round_dir(run_dir: Path, index: int) -> Path:
    """Where the guide fine-tuned after round ``index`` lives."""
    return Path(run_dir) / ROUNDS_DIR / f"round{index}"


def round_guide(run_dir: Path, index: int) -> Path:
    """The classifier folder that guides round ``index``: the baseline for round 1, else the
    guide fine-tuned after the round before."""
    if index < 1:
        raise ValueError(f"rounds are numbered from 1, got {index}")
    return Path(run_dir) / "classifier" if index == 1 else round_dir(run_dir, index - 1) / \
        "classifier"


def fine_tune_settings(cfg: Config) -> dict[str, float]:
    """What a round's fine-tune is made with, as its record keeps it: ``rounds.epochs`` and
    the learning rate, ``rounds.lr`` or train.lr where that is null."""
    return {"rounds.epochs": cfg.rounds.epochs, "rounds.lr": cfg.rounds.lr or cfg.train.lr}


def record_fine_tune(run_dir: Path, index: int, settings: dict[str, float]) -> None:
    """Written when the fine-tune after round ``index`` begins, so that an interrupted one is
    checked on resume as a finished one is."""
    folder = round_dir(run_dir, index)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / FINE_TUNE_FILE, json.dumps(settings))


def check_fine_tunes(run_dir: Path, count: int, settings: dict[str, float]) -> None:
    """Refuse a rerun whose fine-tuning settings differ from those of a round's fine-tune
    already begun or done, before anything is sampled or trained: its guide, and every round
    after it, were made with the stored ones."""
    for index in range(1, count):
        record = round_dir(run_dir, index) / FINE_TUNE_FILE
        if not record.is_file():
            continue
        stored = json.loads(record.read_text())
        changed = [f"{key}: {stored.get(key)} -> {value}" for key, value in settings.items()
                   if stored.get(key) != value]
        if changed:
            raise ConfigError(
                f"{record}: the guide after round {index} was fine-tuned with other settings: "
                f"{'; '.join(changed)} (rounds.lr null means train.lr); set them back, or use "
                f"a new --out")


def stored_plan(run_dir: Path) -> list[dict]:
    return json.loads((Path(run_dir) / SYNTHETIC_DIR / PLAN_FILE).read_text())


def shards_up_to(run_dir: Path, index: int) -> list[int]:
    """Shard ids of rounds 1..``index`` in the stored plan."""
    return [sh["shard_id"] for sh in stored_plan(run_dir) if sh.get("round", 1) <= index]


def _guide_metrics(classifier_dir: Path) -> dict[str, float]:
    """The guide's validation metrics after its last epoch (its ``history.csv``)."""
    history = classifier_dir / "history.csv"
    if not history.is_file():
        return {}
    last = pd.read_csv(history).iloc[-1]
    return {k: float(last[k]) for k in GUIDE_METRICS if k in last and pd.notna(last[k])}


def round_summary(run_dir: Path, count: int) -> pd.DataFrame:
    """One row per round: samples, shards, sampler seconds (the manifest's per-shard time),
    the guide's mean criterion on x0 predicted at the first guided step (``before``) and on
    the final samples (``after``), and the guide's
    validation metrics (for round 1 the baseline's)."""
    run_dir = Path(run_dir)
    plan = pd.DataFrame(stored_plan(run_dir))
    out = run_dir / SYNTHETIC_DIR
    seconds: dict[int, float] = {}
    manifest = out / MANIFEST_FILE
    if manifest.is_file():
        for line in manifest.read_text().splitlines():
            try:
                record = json.loads(line)
                seconds[int(record["shard_id"])] = float(record.get("seconds") or 0.0)
            except (ValueError, KeyError, TypeError):
                continue
    rows = []
    for index in range(1, count + 1):
        part = plan[plan["round"] == index] if "round" in plan else plan
        before, after = [], []
        for shard_id in part["shard_id"]:
            path = shard_file(out, shard_id)
            if path.is_file():
                table = pq.read_table(path, columns=["criterion_before", "criterion_after"])
                before.append(table.column("criterion_before").to_numpy())
                after.append(table.column("criterion_after").to_numpy())
        guide = round_guide(run_dir, index)
        rows.append({"round": index, "guide": str(guide.relative_to(run_dir)),
                     "samples": int(part["n"].sum()), "shards": len(part),
                     "sampler_seconds": round(sum(seconds.get(int(i), 0.0)
                                                  for i in part["shard_id"]), 1),
                     "criterion_before": float(np.nanmean(np.concatenate(before)))
                     if before else float("nan"),
                     "criterion_after": float(np.nanmean(np.concatenate(after)))
                     if after else float("nan"),
                     **_guide_metrics(guide)})
    return pd.DataFrame(rows)


def write_round_summary(run_dir: Path, count: int) -> pd.DataFrame:
    """``round_summary`` to ``rounds/rounds.csv`` and its plot to ``rounds/rounds.png``."""
    table = round_summary(run_dir, count)
    folder = Path(run_dir) / ROUNDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / SUMMARY_FILE, table.to_csv(index=False))
    plot_rounds(table, folder / PLOT_FILE)
    return table


def plot_rounds(table: pd.DataFrame, path: Path) -> Path:
    """The guide's validation metrics per round beside the mean criterion of its samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in GUIDE_METRICS:
        if key in table and table[key].notna().any():
            left.plot(table["round"], table[key], marker="o", label=key.removeprefix("val_"))
    left.set_xlabel("round (its guide)")
    left.set_ylabel("validation accuracy of the guide")
    left.set_xticks(table["round"])
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)
    right.plot(table["round"], table["criterion_before"], marker="o",
               label="at the first guided step")
    right.plot(table["round"], table["criterion_after"], marker="o", label="final samples")
    right.set_xlabel("round")
    right.set_ylabel("mean criterion of the samples")
    right.set_xticks(table["round"])
    right.legend(fontsize=8)
    fig.suptitle("closed-loop synthesis: guide and samples per round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
