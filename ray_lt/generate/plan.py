"""The synthesis plan on the driver: quotas cut into seeded shards, the plan stored in the run
directory, the manifest of finished shards and the final count check. Each is linear in the
number of shards (18,500 for ImageNet-LT's 1.18M samples) and never reads an image."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ray_lt.atomic import write_text_atomic
from ray_lt.config import Config
from ray_lt.data import LongTailData
from ray_lt.errors import ConfigError
from ray_lt.generate.quota import class_quotas, group_quotas, plan_shards, round_shares
from ray_lt.generate.synthetic import shard_file

PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.jsonl"
# nonfinite: samples with a guidance step whose gradient was not finite (skipped);
# redrawn: samples not finite in reduced precision, sampled again from their seeds in float32;
# saturated: the mean fraction of the shard's pixel values at 0 or 255.
MANIFEST_KEYS = ("shard_id", "n", "file", "seconds", "write_seconds", "finished", "nonfinite",
                 "redrawn", "saturated")


def plan(cfg: Config, data: LongTailData, val_errors: np.ndarray | None = None
         ) -> list[dict[str, Any]]:
    """The shards that balance the training set (docs/method.md §4), each with its own
    guidance scale under ``synthesis.scale_by`` (``val_error`` needs ``val_errors``, the
    baseline's validation error per class or group; without them no scale is set). With
    ``rounds.count`` > 1 every shard also names its ``round`` (1, 2, ...): each class's
    (group's) quota is cut into that many shares, shard ids running on across rounds."""
    s = cfg.synthesis
    by_group = s.balance == "group"
    if by_group:
        if data.group_counts is None:
            raise ConfigError("synthesis.balance: 'group' needs a data set with groups")
        quotas = group_quotas(data.group_counts, s.target, s.quota_scale, s.quota_minimum)
    else:
        quotas = class_quotas(data.class_counts, s.target, s.quota_scale, s.quota_minimum)
    contexts = len(data.context_names) if by_group else 0
    if cfg.rounds.count == 1:
        shards = plan_shards(quotas, s.max_shard_size, cfg.seed, by_group, contexts)
    else:
        shards = []
        for index, share in enumerate(round_shares(quotas, cfg.rounds.count), start=1):
            part = plan_shards(share, s.max_shard_size, cfg.seed, by_group, contexts, index)
            for shard in part:
                shard["shard_id"] += len(shards)
                shard["round"] = index
            shards.extend(part)
        if len({sh["seed"] for sh in shards}) != len(shards):
            raise RuntimeError(f"two shard seeds of different rounds collide for seed="
                               f"{cfg.seed}; pick another seed")
    if not shards:
        raise ConfigError(f"synthesis: the quota is 0 for every {s.balance} (synthesis.target "
                          f"{s.target}, quota_scale {s.quota_scale:g}, quota_minimum "
                          f"{s.quota_minimum}); raise target or quota_scale")
    if s.scale_by == "count" or (s.scale_by == "val_error" and val_errors is not None):
        counts = data.group_counts if s.balance == "group" else data.class_counts
        scales = (count_scales(counts, quotas, s.guidance_scale, s.scale_slope)
                  if s.scale_by == "count" else
                  error_scales(val_errors, quotas, s.guidance_scale, s.scale_slope))
        key = "group" if s.balance == "group" else "label"
        for shard in shards:
            shard["scale"] = scales[shard[key]]
    return shards


def count_scales(counts: np.ndarray, quotas: np.ndarray, scale: float, slope: float
                 ) -> list[float]:
    """Guidance scale per class (group): ``scale * w_c`` with ``w_c`` proportional to
    ``(n_c + 1)^-slope`` and ``sum_c q_c w_c = sum_c q_c`` over the quotas ``q``, so the mean
    scale over the samples drawn is ``scale``; slope 0 gives ``scale`` everywhere."""
    weights = (np.asarray(counts, dtype=np.float64) + 1.0) ** -float(slope)
    return _normalised(weights, quotas, scale)


def error_scales(errors: np.ndarray, quotas: np.ndarray, scale: float, slope: float
                 ) -> list[float]:
    """As ``count_scales`` with weights ``(e_c + 0.01)^slope`` for the validation errors
    ``e_c``: the classes the guide gets wrong most are guided hardest."""
    weights = (np.asarray(errors, dtype=np.float64) + 0.01) ** float(slope)
    return _normalised(weights, quotas, scale)


def _normalised(weights: np.ndarray, quotas: np.ndarray, scale: float) -> list[float]:
    q = np.asarray(quotas, dtype=np.float64)
    weights = weights * q.sum() / max(float((q * weights).sum()), 1e-12)
    return [round(float(scale * w), 8) for w in weights]


def round_of(shards: list[dict[str, Any]], index: int | None) -> list[dict[str, Any]]:
    """The shards of round ``index`` (every shard for None or a plan without rounds)."""
    if index is None or not shards or "round" not in shards[0]:
        return shards
    return [sh for sh in shards if sh["round"] == index]


def store_plan(out: Path, shards: list[dict[str, Any]]) -> None:
    """Write the plan into ``out``, refusing one that differs from the plan stored there."""
    stored = Path(out) / PLAN_FILE
    if stored.is_file() and json.loads(stored.read_text()) != shards:
        raise ConfigError(f"{stored}: the synthesis plan in this run directory was made with "
                          f"other synthesis.* or rounds.* settings or seed; use a new --out "
                          f"or delete "
                          f"{out} to start over")
    write_text_atomic(stored, json.dumps(shards))


def finished_shards(out: Path) -> set[int]:
    """Shard ids in the manifest whose file is present."""
    manifest = Path(out) / MANIFEST_FILE
    if not manifest.is_file():
        return set()
    ids = set()
    for line in manifest.read_text().splitlines():
        try:
            ids.add(int(json.loads(line)["shard_id"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a killed driver: that shard is redone
    return {i for i in ids if shard_file(out, i).is_file()}


def unlisted_shards(out: Path, shards: list[dict[str, Any]], listed: set[int]
                    ) -> list[dict[str, Any]]:
    """Manifest records for shard files that are on disk but not in the manifest: written by a
    writer actor after the driver's last manifest line (a killed driver). Shard files are
    written atomically, so one whose Parquet footer holds its planned row count is complete;
    any other is removed and redone."""
    found = []
    for shard in shards:
        path = shard_file(out, shard["shard_id"])
        if shard["shard_id"] in listed or not path.is_file():
            continue
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
            rows = -1
        if rows == shard["n"]:
            found.append({"shard_id": int(shard["shard_id"]), "n": int(rows),
                          "file": path.name})
        else:
            path.unlink()
    return found


def check_counts(out: Path, shards: list[dict[str, Any]], threads: int = 16) -> pd.DataFrame:
    """Rows per (label, group) on disk against the plan, from each shard file's Parquet footer
    (no row is read); raises if any differ."""
    table = pd.DataFrame(shards)

    def rows(shard_id: int) -> int:
        path = shard_file(out, shard_id)
        return pq.ParquetFile(path).metadata.num_rows if path.is_file() else 0

    with ThreadPoolExecutor(threads) as pool:
        table["written"] = list(pool.map(rows, table["shard_id"].tolist(), chunksize=64))
    counts = table.groupby(["label", "group"]).agg(planned=("n", "sum"),
                                                   written=("written", "sum")).reset_index()
    wrong = counts[counts["planned"] != counts["written"]]
    if len(wrong):
        raise RuntimeError(f"synthetic rows in {out} differ from the plan:\n{wrong}")
    return counts
