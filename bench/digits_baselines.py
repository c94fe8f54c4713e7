"""Baselines on the embedded data: ERM vs balanced softmax on digits_lt, ERM on digits_groups.

    python bench/digits_baselines.py [--seeds 0 1 2] [--out runs/baselines]

Each (setting, seed) is a full ``ray-lt train`` run (seed changes the data split and the
initialisation); prints mean and standard deviation over seeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ray_lt import commands
from ray_lt.config import load_config

SETTINGS = {
    "digits_lt ERM": ("configs/digits_lt.yaml", ["train.balanced_softmax_weight=0"]),
    "digits_lt balanced softmax": ("configs/digits_lt.yaml", ["train.balanced_softmax_weight=1"]),
    "digits_groups ERM": ("configs/digits_groups.yaml", ["train.balanced_softmax_weight=0"]),
}
COLUMNS = ["overall", "many", "medium", "few", "worst_group"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/baselines"))
    args = parser.parse_args()
    rows = []
    for name, (path, overrides) in SETTINGS.items():
        for seed in args.seeds:
            cfg = load_config(path, [*overrides, f"seed={seed}"])
            out = args.out / name.replace(" ", "_") / f"seed{seed}"
            metrics = commands.train(cfg, out)
            rows.append({"setting": name, "seed": seed, **{k: metrics[k] for k in COLUMNS}})
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "baselines.csv", index=False)
    summary = table.groupby("setting", sort=False)[COLUMNS].agg(["mean", "std"])
    pd.set_option("display.width", 160)
    print(summary.round(3).to_string())


if __name__ == "__main__":
    main()
