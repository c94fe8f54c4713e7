"""The product's headline table on the embedded data: does feedback guidance beat unguided
synthesis on Few and worst-group accuracy?

    python bench/digits_table.py [--datasets digits_lt digits_groups] [--seeds 0 1 2]
                                 [--out runs/table] [--set key=value ...] [--summarize]
                                 [--criteria entropy ...] [--scales 0.1 0.3]

For every data set and seed (the seed changes the split, the initialisation and the samples):
ERM and balanced softmax on the real data, then the same synthesis + final training with
guidance off (unguided) and with each criterion (loss, entropy, hardness, total uncertainty)
and their equal mixture. Each seed's baseline classifier (balanced softmax on digits_lt, ERM
on digits_groups, as the final models) guides the sampler, and one generator per seed is
shared by every synthetic row. Every cell is its own run directory, so an interrupted table
resumes where it stopped, and every run adds its cells to ``OUT/table.csv``; ``--summarize``
only reads what is there. ``--scales`` runs the chosen ``--criteria`` at other guidance scales
(settings ``+ FG entropy @ 0.1``, ...) beside the same unguided row: the guidance-scale study.
``--rounds 3`` adds each chosen criterion as closed-loop synthesis in 3 rounds with the same
total quota (``+ FG entropy, 3 rounds``; the guide fine-tuned between rounds); every cell
records its sampler's seconds (the manifest's per-shard time).
``--group-guide`` adds, on digits_groups, the group-aware rows: the criteria that read the
class x context group (``target group``, ``group entropy``), a guide trained with group DRO
(``..., DRO guide``; the final model stays ERM) and group DRO as the final model's objective
(``+ unguided synthetic, DRO final``, ``+ FG target group, DRO final``).
``--row NAME KEY=VALUE ...`` adds a row of your own (for instance the values of the
``best_config.yaml`` that ``ray-lt tune`` wrote), beside the same unguided row.
``--round-two`` guides the chosen criteria with the unguided row's final model, already trained
on real + unguided synthetic data (settings ``+ FG entropy, round 2``): does a guide that knows
the tail (or the empty groups) steer better than the baseline?

On digits_groups the table also gives the mean accuracy over the empty class x colour groups
(``empty_groups``: 100 test images, where worst-group accuracy moves in steps of one image in
10). Besides the test metrics, every synthetic cell records what an independent judge (an SVM
on held-out real images) and the guiding classifier make of its samples (accuracy and mean
entropy: guidance should lower the guide's accuracy and raise its entropy); on digits_groups
``judge_empty`` is the judge's accuracy on the samples asked for an empty group alone. Prints
mean and standard deviation over seeds and the per-seed difference of every guided row to the
unguided one; writes ``OUT/table.csv`` (per seed), ``OUT/summary.csv``, ``OUT/paired.csv``
and ``OUT/table.png``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.svm import SVC  # noqa: E402

from ray_lt import commands  # noqa: E402
from ray_lt.config import DigitsLTData, load_config  # noqa: E402
from ray_lt.data import digits_tables  # noqa: E402
from ray_lt.generate.codec import decode_png  # noqa: E402
from ray_lt.generate.synthetic import synthetic_files  # noqa: E402
from ray_lt.train.trainer import load_classifier  # noqa: E402

COLUMNS = ["overall", "many", "medium", "few", "worst_group"]
GROUP_COLUMNS = ["empty_groups"]  # read back from each cell's metrics.json
SAMPLE_COLUMNS = ["synthetic_rows", "judge_accuracy", "judge_empty", "guide_accuracy",
                  "guide_entropy",
                  "guidance_norm", "sampler_seconds"]
UNGUIDED = "+ unguided synthetic"
EQUAL = "{entropy: 0.25, loss: 0.25, hardness: 0.25, total_uncertainty: 0.25}"
CRITERIA = {"loss": "{loss: 1.0}", "entropy": "{entropy: 1.0}", "hardness": "{hardness: 1.0}",
            "total_uncertainty": "{total_uncertainty: 1.0}", "equal_mixture": EQUAL,
            # digits_groups only: they read the class x context group
            "target_group": "{target_group: 1.0}", "group_entropy": "{group_entropy: 1.0}"}


ROUND_TWO = ", round 2"  # guided by the unguided row's final model instead of the baseline
PER_CLASS = ", per class s="  # guidance strength per class (group) by training count
ROUNDS = " rounds"  # closed-loop synthesis: ", 3 rounds" (rounds.count 3, same total quota)
DRO_GUIDE = ", DRO guide"  # the guide is trained with group DRO (the final model stays ERM)
# The group-aware options (digits_groups): criteria that read the class x context group, a
# guide trained with group DRO, and group DRO as the final model's objective.
GROUP_ROWS = {
    "+ FG target group": ["synthesis.criteria={target_group: 1.0}"],
    "+ FG group entropy": ["synthesis.criteria={group_entropy: 1.0}"],
    "+ FG entropy" + DRO_GUIDE: ["synthesis.criteria={entropy: 1.0}"],
    "+ FG group entropy" + DRO_GUIDE: ["synthesis.criteria={group_entropy: 1.0}"],
    "+ unguided synthetic, DRO final": ["synthesis.guidance_scale=0",
                                        "synthesis.criteria={entropy: 1.0}",
                                        "final.group_objective=dro"],
    "+ FG target group, DRO final": ["synthesis.criteria={target_group: 1.0}",
                                     "final.group_objective=dro"],
}
DRO = ["train.group_objective=dro", "final.group_objective=erm"]


def group_rows(only: list[str] | None) -> dict[str, list[str]]:
    """``GROUP_ROWS``, or those whose name contains one of ``only``."""
    rows = {name: o for name, o in GROUP_ROWS.items()
            if only is None or any(text in name for text in only)}
    if not rows:
        raise SystemExit(f"--group-rows {only}: no group row matches; the rows are "
                         f"{list(GROUP_ROWS)}")
    return rows


def own_rows(rows: list[list[str]]) -> dict[str, list[str]]:
    """``--row NAME KEY=VALUE ...`` -> setting name -> overrides; a row needs overrides and a
    name no built-in row has."""
    own = {}
    for name, *overrides in rows:
        if not overrides or any("=" not in o for o in overrides):
            raise SystemExit(f"--row {name!r}: give KEY=VALUE overrides after the name, got "
                             f"{overrides}")
        if name in (UNGUIDED, *GROUP_ROWS, *BASELINES) or name in own:
            raise SystemExit(f"--row {name!r}: that name is taken")
        own[name] = list(overrides)
    return own


def synthetic_rows(criteria: list[str], scales: list[float] | None, round_two: bool = False,
                   slopes: list[float] | None = None, rounds: list[int] | None = None
                   ) -> dict[str, list[str]]:
    """Setting name -> config overrides: unguided, then each criterion at the config's
    guidance scale (``scales`` None) or at each of ``scales`` (named ``... @ scale``);
    ``round_two`` names them ``..., round 2``: guided by the unguided row's final model;
    ``slopes`` adds, per criterion and scale, per-class strength at each slope (named
    ``..., per class s=slope``: ``synthesis.scale_by: count``); ``rounds`` adds, per
    criterion and scale, closed-loop synthesis in that many rounds (``..., N rounds``)."""
    rows = {UNGUIDED: ["synthesis.guidance_scale=0", "synthesis.criteria={entropy: 1.0}"]}
    for name in criteria:
        for scale in scales or [None]:
            setting = f"+ FG {name.replace('_', ' ')}" + ("" if scale is None else f" @ {scale:g}")
            setting += ROUND_TWO if round_two else ""
            rows[setting] = [f"synthesis.criteria={CRITERIA[name]}"] + (
                [] if scale is None else [f"synthesis.guidance_scale={scale}"])
            for slope in slopes or []:
                rows[f"{setting}{PER_CLASS}{slope:g}"] = rows[setting] + [
                    "synthesis.scale_by=count", f"synthesis.scale_slope={slope}"]
            for count in rounds or []:
                rows[f"{setting}, {count}{ROUNDS}"] = rows[setting] + [f"rounds.count={count}"]
    return rows


BASELINES = {"ERM": "train.balanced_softmax_weight=0",
             "balanced softmax": "train.balanced_softmax_weight=1"}
# The loss of the final model, also that of the guiding baseline.
FINAL_LOSS = {"digits_lt": "train.balanced_softmax_weight=1",
              "digits_groups": "train.balanced_softmax_weight=0",
              # the same data sets with the generator trained on an external pool
              "digits_external": "train.balanced_softmax_weight=1",
              "digits_groups_external": "train.balanced_softmax_weight=0"}


def cell_dir(out: Path, dataset: str, seed: int, setting: str) -> Path:
    name = setting.strip("+ ").replace(" @ ", "_s").replace(ROUND_TWO, "_round2")
    name = name.replace(PER_CLASS, "_perclass").replace(", ", "_")
    name = re.sub(r"[^\w.-]", "", name.replace(" ", "_"))  # a plain folder name for any row
    return out / dataset / f"seed{seed}" / name


def result_file(out: Path, dataset: str, seed: int, setting: str) -> Path:
    """A cell's test metrics: the final model's for synthetic rows, else the baseline's (the
    baseline trained with the final loss is the seed's ``guide``)."""
    if setting.startswith("+"):
        return cell_dir(out, dataset, seed, setting) / "final" / "metrics.json"
    loss = BASELINES[setting]
    name = "guide" if loss == FINAL_LOSS[dataset] else setting.replace(" ", "_")
    return out / dataset / f"seed{seed}" / name / "metrics.json"


def empty_group_accuracy(metrics: dict) -> float:
    """Mean test accuracy over the class x context groups that have no training image: 100
    test images on digits_groups, against the 10 that worst-group accuracy rests on."""
    counts = metrics.get("group_counts")
    if counts is None:
        return float("nan")
    per_group = np.asarray(metrics["per_group"], dtype=float)
    empty = np.asarray(counts) == 0
    return float(np.nanmean(per_group[empty])) if empty.any() else float("nan")


def with_empty_groups(table: pd.DataFrame, out: Path) -> pd.DataFrame:
    values = [empty_group_accuracy(json.loads(result_file(out, *key).read_text()))
              for key in table[["dataset", "seed", "setting"]].itertuples(index=False)]
    return table.assign(empty_groups=values)


def fit_judge(folder: Path) -> tuple[SVC, str, np.ndarray | None]:
    """An RBF SVM fitted on the balanced val + test images of the run's data set: an
    independent judge of whether a synthetic image shows its class (digits_lt) or its class
    and background colour (digits_groups), unaffected by the long tail; with the groups that
    have no training image (None on digits_lt)."""
    cfg = load_config(folder / "config.yaml")
    tables = digits_tables(cfg.dataset, cfg.seed)
    real = pd.concat([tables["val"], tables["test"]], ignore_index=True)
    target = "label" if isinstance(cfg.dataset, DigitsLTData) else "group"
    x = np.stack(real["image"]).reshape(len(real), -1) / 255.0
    empty = None
    if target == "group":
        seen = set(tables["train"]["group"].tolist())
        empty = np.array(sorted(set(real["group"].tolist()) - seen))
    return SVC(C=10.0).fit(x, real[target]), target, empty


@torch.no_grad()
def sample_stats(folder: Path, judge: SVC, target: str, empty: np.ndarray | None = None
                 ) -> dict:
    """The independent judge's accuracy on a cell's synthetic images (and on those asked for
    an ``empty`` group alone: what synthesis adds there), the guiding classifier's accuracy
    and mean predictive entropy, and the mean guidance norm the sampler recorded."""
    frame = pd.concat([pd.read_parquet(f) for f in synthetic_files(folder)], ignore_index=True)
    if frame.empty:
        return {"synthetic_rows": 0}
    classifier = load_classifier(folder / "classifier")
    channels = classifier.mean.shape[1]
    images = np.stack([decode_png(b, channels) for b in frame["image"]])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    probs = torch.cat([classifier(chunk).softmax(1) for chunk in x.split(256)])
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    labels = torch.tensor(frame["label"].to_numpy())
    verdict = judge.predict(images.reshape(len(images), -1) / 255.0)
    manifest = folder / "synthetic" / "manifest.jsonl"
    seconds = sum(json.loads(line).get("seconds", 0.0)
                  for line in manifest.read_text().splitlines()) if manifest.is_file() else 0.0
    right = verdict == frame[target].to_numpy()
    in_empty = np.isin(frame[target].to_numpy(), empty) if empty is not None else None
    return {"synthetic_rows": len(frame), "sampler_seconds": round(seconds, 1),
            "judge_accuracy": float(right.mean()),
            "judge_empty": float(right[in_empty].mean()) if in_empty is not None
            and in_empty.any() else None,
            "guide_accuracy": float((probs.argmax(1) == labels).float().mean()),
            "guide_entropy": float(entropy.mean()),
            "guidance_norm": float(frame["guidance_norm"].mean())}


def cell(name: str, seed: int, dataset: str, metrics: dict, seconds: float) -> dict:
    return {"dataset": dataset, "setting": name, "seed": seed, "seconds": round(seconds),
            **{k: metrics.get(k) for k in COLUMNS}}


def run_seed(dataset: str, seed: int, out: Path, extra: list[str],
             settings: dict[str, list[str]]) -> list[dict]:
    config = f"configs/{dataset}.yaml"
    base = out / dataset / f"seed{seed}"
    rows = []
    for name, loss in BASELINES.items():
        folder = result_file(out, dataset, seed, name).parent
        started = time.perf_counter()
        cfg = load_config(config, [*extra, loss, f"seed={seed}"])
        rows.append(cell(name, seed, dataset, commands.train(cfg, folder),
                         time.perf_counter() - started))
    guide = base / "guide"
    cfg = load_config(config, [*extra, FINAL_LOSS[dataset], f"seed={seed}"])
    commands.train_generator(cfg, guide)
    dro_guide = base / "guide_dro"
    if any(name.endswith(DRO_GUIDE) for name in settings):
        commands.train(load_config(config, [*extra, FINAL_LOSS[dataset], f"seed={seed}", *DRO]),
                       dro_guide)
    for name, overrides in settings.items():
        started = time.perf_counter()
        folder = cell_dir(out, dataset, seed, name)
        folder.mkdir(parents=True, exist_ok=True)
        if name.endswith(ROUND_TWO):
            # The guide is the classifier already trained on real + unguided synthetic data
            # (a copy: the criterion statistics are written beside it); its test metrics
            # become the cell's baseline.
            if not (folder / "classifier").exists():
                shutil.copytree(cell_dir(out, dataset, seed, UNGUIDED) / "final" / "classifier",
                                folder / "classifier")
            stages = ("generator",)
        else:
            stages = ("classifier", "generator", "metrics.json")
        for stage in stages:
            link = folder / stage
            source = dro_guide if name.endswith(DRO_GUIDE) and stage != "generator" else guide
            if not link.exists():
                link.symlink_to((source / stage).resolve())
        if name.endswith(DRO_GUIDE):
            overrides = [*overrides, *DRO]
        cfg = load_config(config, [*extra, FINAL_LOSS[dataset], f"seed={seed}", *overrides,
                                   "report.grid=false"])
        metrics = commands.run(cfg, folder)
        rows.append(cell(name, seed, dataset, metrics, time.perf_counter() - started))
    return rows


def merge(table: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the cells of ``new`` added or replaced (one row per data set, setting
    and seed, in their first position), so that partial runs of this script build up one
    table. A replaced cell keeps its longest ``seconds``: rerunning a finished cell only
    reads its results."""
    if table.empty:
        return new
    key = ["dataset", "setting", "seed"]
    old, new = table.set_index(key), new.set_index(key)
    new["seconds"] = np.fmax(new["seconds"], old["seconds"].reindex(new.index))
    order = old.index.append(new.index[~new.index.isin(old.index)])
    return pd.concat([old[~old.index.isin(new.index)], new]).loc[order].reset_index()


def with_sample_stats(table: pd.DataFrame, out: Path) -> pd.DataFrame:
    judges = {}  # one judge per data set and seed, fitted on the seed's guide run
    stats = []
    for r in table.itertuples():
        if not r.setting.startswith("+"):
            stats.append({})
            continue
        if (r.dataset, r.seed) not in judges:
            judges[r.dataset, r.seed] = fit_judge(out / r.dataset / f"seed{r.seed}" / "guide")
        stats.append(sample_stats(cell_dir(out, r.dataset, r.seed, r.setting),
                                  *judges[r.dataset, r.seed]))
    return pd.concat([table.drop(columns=SAMPLE_COLUMNS, errors="ignore"),
                      pd.DataFrame(stats, index=table.index, columns=SAMPLE_COLUMNS,
                                   dtype=float)], axis=1)


def paired(table: pd.DataFrame) -> pd.DataFrame:
    """Each guided row minus the unguided row of the same data set and seed."""
    rows, metrics = [], ["few", "worst_group", "empty_groups", "overall"]
    table = table.assign(**{k: pd.to_numeric(table[k], errors="coerce") for k in metrics})
    for (dataset, seed), group in table.groupby(["dataset", "seed"]):
        unguided = group[group["setting"] == UNGUIDED]
        if unguided.empty:
            continue
        for r in group[group["setting"].str.startswith("+") &
                       (group["setting"] != UNGUIDED)].itertuples():
            rows.append({"dataset": dataset, "setting": r.setting, "seed": seed,
                         **{k: getattr(r, k) - unguided[k].iloc[0]
                            for k in metrics}})
    if not rows:
        return pd.DataFrame()
    diffs = pd.DataFrame(rows)
    return diffs.groupby(["dataset", "setting"], sort=False).agg(
        seeds=("seed", "count"), few=("few", "mean"), few_std=("few", "std"),
        few_wins=("few", lambda d: int((d > 0).sum())),
        worst_group=("worst_group", "mean"), worst_group_std=("worst_group", "std"),
        worst_group_wins=("worst_group", lambda d: int((d > 0).sum())),
        empty_groups=("empty_groups", "mean"), empty_groups_std=("empty_groups", "std"),
        empty_groups_wins=("empty_groups", lambda d: int((d > 0).sum())),
        overall=("overall", "mean"))


def plot(summary: pd.DataFrame, path: Path) -> None:
    """Few accuracy (digits_lt) and worst-group accuracy (digits_groups), mean +- std."""
    panels = [(d, "worst_group" if d.startswith("digits_groups") else "few")
              for d in summary.index.get_level_values("dataset").unique()]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (dataset, metric) in zip(axes[0], panels, strict=True):
        part = summary.loc[dataset]
        mean, std = part[(metric, "mean")], part[(metric, "std")].fillna(0)
        colours = ["#999999" if not s.startswith("+") else
                   "#4c72b0" if s == UNGUIDED else "#dd8452" for s in part.index]
        ax.bar(range(len(part)), mean, yerr=std, color=colours, capsize=3)
        ax.set_xticks(range(len(part)), part.index, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(metric.replace("_", "-") + " accuracy (test)")
        ax.set_title(dataset)
        ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits_lt", "digits_groups"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/table"))
    parser.add_argument("--set", dest="overrides", nargs="+", default=[])
    parser.add_argument("--criteria", nargs="+", choices=list(CRITERIA),
                        default=[c for c in CRITERIA if c not in ("target_group",
                                                                   "group_entropy")])
    parser.add_argument("--scales", type=float, nargs="+", default=None,
                        help="guidance scales to run each criterion at (default: the config's)")
    parser.add_argument("--scale-slopes", type=float, nargs="+", default=None,
                        help="also run each criterion with per-class guidance strength at "
                             "these slopes (synthesis.scale_by: count): rows '..., per class "
                             "s=SLOPE'")
    parser.add_argument("--round-two", action="store_true",
                        help="guide with the unguided row's final model (trained on real + "
                             "unguided synthetic) instead of the baseline: rows '..., round 2'")
    parser.add_argument("--rounds", type=int, nargs="+", default=None,
                        help="also run each criterion as closed-loop synthesis in this many "
                             "rounds (rounds.count, same total quota): rows '..., N rounds'")
    parser.add_argument("--group-guide", action="store_true",
                        help="digits_groups: add the group-aware rows (criteria target group "
                             "and group entropy, a guide trained with group DRO, group DRO "
                             "as the final objective)")
    parser.add_argument("--group-rows", nargs="+", default=None, metavar="TEXT",
                        help="with --group-guide, only the group rows whose name contains one "
                             "of these (e.g. 'target group' 'DRO final')")
    parser.add_argument("--row", dest="extra_rows", nargs="+", action="append", default=[],
                        metavar=("NAME", "KEY=VALUE"),
                        help="add a row of your own: its name, then config overrides (e.g. "
                             "the values of a best_config.yaml from ray-lt tune); repeatable")
    parser.add_argument("--summarize", action="store_true",
                        help="only summarise the cells already in OUT/table.csv")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "table.csv"
    table = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if not args.summarize:
        settings = synthetic_rows(args.criteria, args.scales, args.round_two, args.scale_slopes,
                                  args.rounds)
        settings.update(own_rows(args.extra_rows))
        for seed in args.seeds:
            for dataset in args.datasets:
                rows = dict(settings)
                if args.group_guide and dataset.startswith("digits_groups"):
                    rows.update(group_rows(args.group_rows))
                new = pd.DataFrame(run_seed(dataset, seed, args.out, args.overrides, rows))
                table = merge(table, new)
                table.to_csv(path, index=False)
    table = with_sample_stats(with_empty_groups(table, args.out), args.out)
    table.to_csv(args.out / "table.csv", index=False)
    summary = table.groupby(["dataset", "setting"], sort=False)[
        COLUMNS + GROUP_COLUMNS + SAMPLE_COLUMNS[1:]]
    summary = summary.agg(["mean", "std"])
    summary.to_csv(args.out / "summary.csv")
    diffs = paired(table)
    diffs.to_csv(args.out / "paired.csv")
    plot(summary, args.out / "table.png")
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    print(summary.round(3).to_string())
    print("\nguided minus unguided, per seed (mean, std, seeds where guided is higher):")
    print(diffs.round(3).to_string())
    print(f"\nper seed: {args.out / 'table.csv'}; plot: {args.out / 'table.png'}")


if __name__ == "__main__":
    main()
