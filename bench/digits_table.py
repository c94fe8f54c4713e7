"""The product's headline table on the embedded data: does feedback guidance beat unguided
synthesis on Few and worst-group accuracy?

    python bench/digits_table.py [--datasets digits_lt digits_groups] [--seeds 0 1 2]
                                 [--out runs/table] [--set key=value ...]

For every data set and seed (the seed changes the split, the initialisation and the samples):
ERM and balanced softmax on the real data, then the same synthesis + final training with
guidance off (unguided) and with each criterion (loss, entropy, hardness, total uncertainty)
and their equal mixture. Each seed's baseline classifier (balanced softmax on digits_lt, ERM
on digits_groups, as the final models) guides the sampler, and one generator per seed is
shared by every synthetic row. Every cell is its own run directory, so an interrupted table
resumes where it stopped. Prints mean and standard deviation over seeds; writes
``OUT/table.csv`` (per seed) and ``OUT/summary.csv``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from ray_lt import workflow
from ray_lt.config import load_config

COLUMNS = ["overall", "many", "medium", "few", "worst_group"]
EQUAL = "{entropy: 0.25, loss: 0.25, hardness: 0.25, total_uncertainty: 0.25}"
SYNTHETIC_ROWS = {
    "+ unguided synthetic": ["synthesis.guidance_scale=0", "synthesis.criteria={entropy: 1.0}"],
    "+ FG loss": ["synthesis.criteria={loss: 1.0}"],
    "+ FG entropy": ["synthesis.criteria={entropy: 1.0}"],
    "+ FG hardness": ["synthesis.criteria={hardness: 1.0}"],
    "+ FG total uncertainty": ["synthesis.criteria={total_uncertainty: 1.0}"],
    "+ FG equal mixture": [f"synthesis.criteria={EQUAL}"],
}
# The loss of the final model, also that of the guiding baseline.
FINAL_LOSS = {"digits_lt": "train.balanced_softmax_weight=1",
              "digits_groups": "train.balanced_softmax_weight=0"}


def cell(name: str, seed: int, dataset: str, metrics: dict, seconds: float) -> dict:
    return {"dataset": dataset, "setting": name, "seed": seed, "seconds": round(seconds),
            **{k: metrics.get(k) for k in COLUMNS}}


def run_seed(dataset: str, seed: int, out: Path, extra: list[str]) -> list[dict]:
    config = f"configs/{dataset}.yaml"
    base = out / dataset / f"seed{seed}"
    rows = []
    for name, loss in (("ERM", "train.balanced_softmax_weight=0"),
                       ("balanced softmax", "train.balanced_softmax_weight=1")):
        folder = base / ("guide" if loss == FINAL_LOSS[dataset] else name.replace(" ", "_"))
        started = time.perf_counter()
        cfg = load_config(config, [*extra, loss, f"seed={seed}"])
        rows.append(cell(name, seed, dataset, workflow.train(cfg, folder),
                         time.perf_counter() - started))
    guide = base / "guide"
    cfg = load_config(config, [*extra, FINAL_LOSS[dataset], f"seed={seed}"])
    workflow.train_generator(cfg, guide)
    for name, overrides in SYNTHETIC_ROWS.items():
        started = time.perf_counter()
        folder = base / name.strip("+ ").replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for stage in ("classifier", "generator", "metrics.json"):
            link = folder / stage
            if not link.exists():
                link.symlink_to((guide / stage).resolve())
        cfg = load_config(config, [*extra, FINAL_LOSS[dataset], f"seed={seed}", *overrides,
                                   "report.grid=false"])
        metrics = workflow.run(cfg, folder)
        rows.append(cell(name, seed, dataset, metrics, time.perf_counter() - started))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits_lt", "digits_groups"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/table"))
    parser.add_argument("--set", dest="overrides", nargs="+", default=[])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for dataset in args.datasets:
            rows += run_seed(dataset, seed, args.out, args.overrides)
            table = pd.DataFrame(rows)
            table.to_csv(args.out / "table.csv", index=False)
    summary = table.groupby(["dataset", "setting"], sort=False)[COLUMNS].agg(["mean", "std"])
    summary.to_csv(args.out / "summary.csv")
    pd.set_option("display.width", 200)
    print(summary.round(3).to_string())
    print(f"\nper seed: {args.out / 'table.csv'}")


if __name__ == "__main__":
    main()
