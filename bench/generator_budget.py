"""The pixel generator's training budget on the embedded default: Few accuracy of the final
classifier and the independent judge's in-class rate of the samples, against the generator's
training seconds, per model size and step count, on several seeds:

    python bench/generator_budget.py [--seeds 0 1 2] [--out runs/budget] \
        [--setting NAME KEY=VALUE ... ] [--summarize]

Each (setting, seed) is ``ray-lt run configs/digits_lt.yaml`` with the setting's ``--set``
values and ``seed``, without the grid and the quality metrics, into ``OUT/<setting>/seed<k>``
(a rerun resumes: finished runs are read, not redone). The judge is ``digits_table``'s: an
SVM fitted on the seed's balanced val + test images. Writes ``OUT/budget.csv`` (per run),
``OUT/budget_summary.csv`` (mean and std over seeds) and ``OUT/budget.png`` (Few and the judge
against the generator's seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_table import fit_judge, sample_stats  # noqa: E402

from ray_lt import commands  # noqa: E402
from ray_lt.config import load_config  # noqa: E402
from ray_lt.stages import timings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "32-64-64 x 700": ["generator.block_out_channels=[32, 64, 64]", "generator.train_steps=700"],
    "16-32-32 x 400": ["generator.block_out_channels=[16, 32, 32]", "generator.train_steps=400"],
    "16-32-32 x 800": ["generator.block_out_channels=[16, 32, 32]", "generator.train_steps=800"],
}
FIXED = ["report.grid=false", "report.quality=false"]


def one_run(out: Path, setting: list[str], seed: int) -> dict:
    folder = out / f"seed{seed}"
    metrics_file = folder / "final" / "metrics.json"
    if not metrics_file.is_file():
        cfg = load_config(ROOT / "configs" / "digits_lt.yaml", [*setting, *FIXED, f"seed={seed}"])
        commands.run(cfg, folder)
    final = json.loads(metrics_file.read_text())
    first = {stage: entries[0] for stage, entries in timings(folder).items()}
    stats = sample_stats(folder, *fit_judge(folder))
    wall = max(e.get("started_after", 0.0) + e["seconds"] for e in first.values())
    return {"seed": seed, "generator_seconds": first["generator"]["seconds"],
            "synthesis_seconds": first["synthesis"]["seconds"], "run_seconds": wall,
            "few": final["few"], "overall": final["overall"],
            "judge_accuracy": stats["judge_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/budget"))
    parser.add_argument("--setting", dest="settings", nargs="+", action="append", default=[],
                        metavar="NAME KEY=VALUE", help="a setting of your own (repeatable)")
    parser.add_argument("--only", nargs="+", default=None, help="run these settings alone")
    parser.add_argument("--summarize", action="store_true", help="only read what is there")
    args = parser.parse_args()
    settings = {**SETTINGS, **{s[0]: s[1:] for s in args.settings}}
    if args.only:
        settings = {k: v for k, v in settings.items() if k in args.only}
    rows = []
    for name, values in settings.items():
        for seed in args.seeds:
            folder = args.out / name.replace(" ", "")
            if args.summarize and not (folder / f"seed{seed}" / "final" / "metrics.json"
                                       ).is_file():
                continue
            rows.append({"setting": name, **one_run(folder, values, seed)})
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "budget.csv", index=False)
    numbers = ["generator_seconds", "synthesis_seconds", "run_seconds", "few", "overall",
               "judge_accuracy"]
    summary = table.groupby("setting", sort=False)[numbers].agg(["mean", "std"]).round(3)
    summary.to_csv(args.out / "budget_summary.csv")
    print(table.round(3).to_string(index=False))
    print(summary.to_string())
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, column, title in ((axes[0], "few", "final Few accuracy"),
                                (axes[1], "judge_accuracy", "judge: samples in their class")):
        for name, group in table.groupby("setting", sort=False):
            axis.scatter(group["generator_seconds"], group[column], label=name)
        axis.set_xlabel("generator training (s)")
        axis.set_title(title)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out / "budget.png", dpi=120)


if __name__ == "__main__":
    main()
