"""``DIR/report.md`` and ``DIR/report.html``: baseline vs final metrics, the per-class accuracy
plot, sample grids, synthetic-data quality per criterion and the config of the run."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ray_lt.atomic import write_text_atomic
from ray_lt.config import Config
from ray_lt.data import LongTailData
from ray_lt.evaluate.metrics import HEADLINE
from ray_lt.evaluate.plots import plot_per_class_accuracy
from ray_lt.evaluate.predict import predict
from ray_lt.evaluate.quality import quality_table
from ray_lt.generate.codec import decode_png
from ray_lt.generate.grid import save_grid
from ray_lt.generate.plan import PLAN_FILE
from ray_lt.generate.rounds import PLOT_FILE, ROUNDS_DIR, SUMMARY_FILE
from ray_lt.generate.synthetic import FILTER_FILE, SYNTHETIC_DIR, shard_file, synthetic_files

REPORT_DIR = "report"
QUALITY_FILE = "quality.csv"
SWEEP_FILE = "guidance_sweep.csv"
SWEEP_PLOT = "guidance_sweep.png"
MOSAIC_CLASSES = 20
"""Classes shown in the synthetic-sample mosaic: the rarest ones."""
CLASS_TABLE_ROWS = 50
"""Above this many classes the report lists the rarest ones and writes the rest to a CSV."""
QUALITY_SAMPLES = 5000
"""Synthetic rows (a seeded sample of whole shards) the quality metrics are computed on."""


@dataclass
class Block:
    """One piece of the report: a heading, a paragraph, a table, an image or a code block."""

    kind: str
    content: Any
    caption: str = ""


def metrics_table(rows: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per model with the headline accuracies (None where undefined) and, for the last
    row, its change against the first."""
    table = pd.DataFrame([{"model": name, **{k: m.get(k) for k in HEADLINE}}
                          for name, m in rows.items()])
    if len(rows) >= 2:
        first, last = table.iloc[0], table.iloc[-1]
        delta = {"model": f"{table['model'].iloc[-1]} - {table['model'].iloc[0]}"}
        for k in HEADLINE:
            both = first[k] is not None and last[k] is not None and \
                not pd.isna(first[k]) and not pd.isna(last[k])
            delta[k] = float(last[k]) - float(first[k]) if both else None
        table = pd.concat([table, pd.DataFrame([delta])], ignore_index=True)
    return table


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, float | np.floating):
        return f"{value:.3f}"
    return str(value)


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind == "h1":
            out.append(f"# {b.content}\n")
        elif b.kind == "h2":
            out.append(f"## {b.content}\n")
        elif b.kind == "p":
            out.append(f"{b.content}\n")
        elif b.kind == "table":
            df: pd.DataFrame = b.content
            out.append("| " + " | ".join(map(str, df.columns)) + " |")
            out.append("|" + "---|" * len(df.columns))
            out.extend("| " + " | ".join(_cell(v) for v in row) + " |"
                       for row in df.itertuples(index=False))
            out.append("")
        elif b.kind == "image":
            out.append(f"![{b.caption}]({b.content})\n")
        elif b.kind == "code":
            out.append(f"```yaml\n{b.content}```\n")
    return "\n".join(out)


def to_html(blocks: list[Block], title: str) -> str:
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            body.append(f"<{b.kind}>{html.escape(b.content)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{html.escape(b.content)}</p>")
        elif b.kind == "table":
            df = b.content
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row)
                           + "</tr>" for row in df.itertuples(index=False))
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "image":
            src, caption = html.escape(b.content), html.escape(b.caption)
            body.append(f'<figure><img src="{src}" alt="{caption}">'
                        f"<figcaption>{caption}</figcaption></figure>")
        elif b.kind == "code":
            body.append(f"<pre>{html.escape(b.content)}</pre>")
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:3px 8px;"
             "text-align:right}img{max-width:100%}pre{background:#f4f4f4;padding:1em}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def planned_shards(run_dir: Path) -> pd.DataFrame:
    """The synthesis plan (one row per shard: shard_id, label, group, n)."""
    return pd.DataFrame(json.loads((Path(run_dir) / SYNTHETIC_DIR / PLAN_FILE).read_text()))


def synthetic_counts(run_dir: Path, num_classes: int) -> np.ndarray:
    """Synthetic rows per class that training uses: the plan less the filter's drops (reads
    no shard file)."""
    shards = planned_shards(run_dir)
    counts = np.bincount(shards["label"], weights=shards["n"], minlength=num_classes)
    verdicts = Path(run_dir) / SYNTHETIC_DIR / FILTER_FILE
    if verdicts.is_file():
        dropped = pd.read_parquet(verdicts).query("~keep")
        labels = shards.set_index("shard_id").loc[dropped["shard_id"], "label"]
        counts -= np.bincount(labels, minlength=num_classes)
    return counts.astype(np.int64)


def synthetic_rows(run_dir: Path, channels: int, shard_ids: list[int]) -> pd.DataFrame:
    """The rows of the given shards (images decoded or feature vectors), without filtered-out
    rows: the report reads a bounded sample of shards, never the whole synthetic set."""
    out = Path(run_dir) / SYNTHETIC_DIR
    frames = [pd.read_parquet(shard_file(out, i)) for i in shard_ids]
    if not frames:
        return pd.DataFrame({"label": [], "criterion": []})
    rows = pd.concat(frames, ignore_index=True)
    verdicts = out / FILTER_FILE
    if verdicts.is_file():
        keep = pd.read_parquet(verdicts)
        rows = rows.merge(keep[["shard_id", "seed", "keep"]], on=["shard_id", "seed"])
        rows = rows[rows["keep"]].drop(columns="keep").reset_index(drop=True)
    if "image" in rows:
        rows["image"] = [decode_png(b, channels) for b in rows["image"]]
    return rows


def _leading_shards(shards: pd.DataFrame, rows: int) -> list[int]:
    """The ids of the first shards, in table order, that together hold ``rows`` rows."""
    take = shards["n"].cumsum().shift(fill_value=0) < rows
    return shards.loc[take, "shard_id"].tolist()


def sample_shards(shards: pd.DataFrame, max_rows: int, seed: int) -> list[int]:
    """Shard ids in a seeded random order, as many as hold ``max_rows`` rows."""
    return sorted(_leading_shards(shards.sample(frac=1.0, random_state=seed), max_rows))


def mosaic_shards(shards: pd.DataFrame, class_counts: np.ndarray, per_class: int,
                  max_classes: int = MOSAIC_CLASSES) -> list[int]:
    """Enough shards to show ``per_class`` samples of each of the ``max_classes`` classes with
    the fewest real images (every class when there are fewer)."""
    labels = shards["label"].unique()
    shown = labels[np.argsort(class_counts[labels], kind="stable")][:max_classes]
    ids: list[int] = []
    for label in sorted(shown.tolist()):
        ids += _leading_shards(shards[shards["label"] == label], per_class)
    return ids


def sample_mosaic(rows: pd.DataFrame, class_names: list[str], per_class: int, path: Path,
                  seed: int) -> Path | None:
    """A grid of synthetic images: one row per class that has samples, ``per_class`` columns."""
    if "image" not in rows or rows.empty:
        return None
    rng = np.random.default_rng(seed)
    labels = sorted(rows["label"].unique().tolist())
    per_class = min(per_class, int(rows["label"].value_counts().max()))
    shape = rows["image"].iloc[0].shape
    grid = np.zeros((len(labels), per_class, *shape), np.uint8)
    for r, label in enumerate(labels):
        idx = np.flatnonzero(rows["label"].to_numpy() == label)
        for c, i in enumerate(rng.choice(idx, size=min(per_class, len(idx)), replace=False)):
            grid[r, c] = rows["image"].iloc[i]
    return save_grid(grid, [class_names[label] for label in labels],
                     [str(i + 1) for i in range(per_class)], path,
                     title="synthetic samples used for training")


def synthetic_quality(cfg: Config, run_dir: Path, data: LongTailData) -> pd.DataFrame:
    """FID, density and coverage of a seeded sample of ``QUALITY_SAMPLES`` synthetic rows
    against real test rows, on the baseline classifier's features, per criterion (kept in
    ``report/quality.csv`` while that is newer than every shard)."""
    run_dir = Path(run_dir)
    cache = run_dir / REPORT_DIR / QUALITY_FILE
    if cache.is_file() and cache.stat().st_mtime >= max(
            Path(f).stat().st_mtime for f in synthetic_files(run_dir)):
        return pd.read_csv(cache)
    import ray

    rows = synthetic_rows(run_dir, data.image_shape[2],
                          sample_shards(planned_shards(run_dir), QUALITY_SAMPLES, cfg.seed))
    pool = cfg.evaluate.pool
    classifier = run_dir / "classifier"
    real = predict(data.test, classifier, pool, features=True)
    if "feature" in rows:
        fake_features = np.stack(rows["feature"].to_numpy())
        fake_labels, criteria = rows["label"].to_numpy(), rows["criterion"].to_numpy()
    else:
        ds = ray.data.from_pandas(rows[["image", "label", "group", "criterion"]])
        fake = predict(ds, classifier, pool, features=True, keep=("criterion",))
        fake_features = np.stack(fake["features"].to_numpy())
        fake_labels, criteria = fake["label"].to_numpy(), fake["criterion"].to_numpy()
    table = quality_table(np.stack(real["features"].to_numpy()), real["label"].to_numpy(),
                          fake_features, fake_labels, criteria.astype(str),
                          k=cfg.report.quality_k, seed=cfg.seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache, table.to_csv(index=False))
    return table


def rounds_blocks(cfg: Config, run_dir: Path) -> list[Block]:
    """The per-round table and plot of closed-loop synthesis (none for one-shot runs)."""
    rounds_csv = Path(run_dir) / ROUNDS_DIR / SUMMARY_FILE
    if cfg.rounds.count == 1 or not rounds_csv.is_file():
        return []
    blocks = [Block("h2", "Rounds"),
              Block("p", f"Closed-loop synthesis in {cfg.rounds.count} rounds: round 1 guided "
                         f"by the baseline, each later round by the guide fine-tuned for "
                         f"{cfg.rounds.epochs} epochs on real + all synthetic rows so far. "
                         f"criterion_before: the guide's mean criterion on x0 predicted at "
                         f"the first guided step; criterion_after: on the final samples; "
                         f"val_*: the guide's validation accuracy."),
              Block("table", pd.read_csv(rounds_csv).round(4))]
    if (Path(run_dir) / ROUNDS_DIR / PLOT_FILE).is_file():
        blocks.append(Block("image", f"{ROUNDS_DIR}/{PLOT_FILE}", "guide and samples per round"))
    return blocks


def mining_blocks(run_dir: Path, class_names: list[str]) -> list[Block]:
    """"What the model misses": per mined round, each class's keywords (the words that mark
    the guide's hardest samples against its easiest, with their scores), three of the prompts
    written from them, the hardest samples beside the easiest, and the guide's Few accuracy
    per round."""
    from ray_lt.generate.mining import FIGURE_FILE, MINING_DIR, PROMPTS_FILE, read_entries

    folders = sorted((Path(run_dir) / MINING_DIR).glob("round*"),
                     key=lambda p: int(p.name.removeprefix("round") or 0))
    folders = [f for f in folders if (f / PROMPTS_FILE).is_file()]
    if not folders:
        return []
    blocks = [Block("h2", "What the model misses"),
              Block("p", "After a round, the guide's hardest samples of each mined class "
                         "(highest criterion on the final sample) and its easiest were "
                         "described by a vision-language model; the keywords are the words "
                         "that mark the hard descriptions against the easy ones (a smoothed "
                         "log-odds z-score each), and the prompts written from them drove the "
                         "next round.")]
    rounds_csv = Path(run_dir) / ROUNDS_DIR / SUMMARY_FILE
    if rounds_csv.is_file():
        table = pd.read_csv(rounds_csv)
        if "val_few" in table and table["val_few"].notna().any():
            few = ", ".join(f"round {int(r)}: {v:.3f}" for r, v in
                            zip(table["round"], table["val_few"], strict=True) if pd.notna(v))
            blocks.append(Block("p", f"Few accuracy (validation) of each round's guide: "
                                     f"{few}."))
    for folder in folders:
        entries = read_entries(folder / PROMPTS_FILE)
        rows = [{"class": e["class"],
                 "keywords (score)": ", ".join(f"{w} ({score:.2f})" for w, score
                                               in e.get("keywords", [])),
                 "prompts": len(e["prompts"]),
                 "three of them": " / ".join(
                     p.format(class_name=e["class"], context="<context>")
                     for p in e["prompts"][:3])}
                for e in entries]
        blocks.append(Block("p", f"Mined after {folder.name.replace('round', 'round ')}: "
                                 f"{len(entries)} classes (mining/{folder.name}/)."))
        if rows:
            blocks.append(Block("table", pd.DataFrame(rows)))
        if (folder / FIGURE_FILE).is_file():
            blocks.append(Block("image", f"{MINING_DIR}/{folder.name}/{FIGURE_FILE}",
                                "per class: the four hardest samples (left) beside the four "
                                "easiest (right)"))
    return blocks


def generator_source(run_dir: Path, data: LongTailData) -> str:
    """What the trained generator learnt from (its ``training.json``), in a sentence; empty for
    a pretrained generator or one trained before this was recorded."""
    try:
        trained_on = json.loads((run_dir / "generator" / "training.json").read_text())[
            "trained_on"]
    except (OSError, ValueError, KeyError):
        return ""
    if not trained_on:
        return ""
    if trained_on["source"] != "external":
        return (f"The generator learnt from the classifier's own long-tailed training split "
                f"({trained_on['images']} images).")
    per_class = trained_on["per_class"]
    text = (f"The generator learnt from an external pool of {trained_on['images']} real images "
            f"that none of the classifier's splits holds ({trained_on['pool']}): "
            f"{min(per_class)} to {max(per_class)} per class")
    per_group = trained_on.get("per_group")
    if per_group and data.group_counts is not None:
        empty = np.asarray(data.group_counts) == 0
        covered = int((np.asarray(per_group)[empty] > 0).sum())
        text += (f", {sum(g > 0 for g in per_group)} of {len(per_group)} class x context "
                 f"groups, {covered} of the {int(empty.sum())} empty in training among them")
    return text + "."


def write_report(cfg: Config, run_dir: Path, data: LongTailData, baseline: dict[str, Any],
                 final: dict[str, Any],
                 times: dict[str, tuple[float, float, float]] | None = None
                 ) -> Path:
    """Write ``report.md`` and ``report.html`` into ``run_dir``; returns the Markdown path.
    ``times`` maps a stage to its (seconds, driver peak RSS in MB, start after the run began)
    in this run."""
    run_dir = Path(run_dir)
    folder = run_dir / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    ev, s = cfg.evaluate, cfg.synthesis
    name = cfg.dataset.kind
    blocks = [Block("h1", f"ray_lt report: {name}"),
              Block("p", f"Run directory {run_dir}. Test split, {final.get('num_rows')} images. "
                         f"Many: classes with > {ev.many_threshold} training images, Few: "
                         f"< {ev.few_threshold}. Worst-group: minimum accuracy over class x "
                         f"context groups.")]
    blocks += [Block("h2", "Accuracy"),
               Block("table", metrics_table({"baseline (real)": baseline,
                                             "final (real + synthetic)": final}))]
    plot = plot_per_class_accuracy({"baseline": baseline["per_class"],
                                    "final": final["per_class"]}, data.class_counts,
                                   ev.many_threshold, ev.few_threshold,
                                   folder / "per_class_accuracy.png",
                                   title="per-class test accuracy: baseline vs final")
    blocks.append(Block("image", str(plot.relative_to(run_dir)), "per-class accuracy"))
    if final.get("per_group") and any(a is not None for a in final["per_group"]):
        groups = pd.DataFrame({"group": range(len(final["per_group"])),
                               "train images": data.group_counts,
                               "baseline": baseline["per_group"], "final": final["per_group"]})
        worst = groups.dropna(subset=["final"]).nsmallest(5, "final")
        blocks += [Block("p", "The five worst groups of the final model:"),
                   Block("table", worst)]

    shards = planned_shards(run_dir)
    counts = synthetic_counts(run_dir, data.num_classes)
    blocks += [Block("h2", "Synthetic data"),
               Block("p", f"{int(counts.sum())} synthetic samples in {len(shards)} shards from "
                          f"the {cfg.generator.kind} generator, guidance scale "
                          f"{s.guidance_scale:g} every {s.guidance_every} of {s.num_steps} "
                          f"steps, CFG {s.cfg_scale:g}, criteria {json.dumps(s.criteria)}.")]
    trained_on = generator_source(run_dir, data)
    if trained_on:
        blocks.append(Block("p", trained_on))
    per_class = pd.DataFrame({"class": data.class_names, "real": data.class_counts,
                              "synthetic": counts, "total": data.class_counts + counts})
    if len(per_class) > CLASS_TABLE_ROWS:
        per_class.to_csv(folder / "per_class_counts.csv", index=False)
        blocks.append(Block("p", f"The {CLASS_TABLE_ROWS} classes with the fewest real images "
                                 f"(all {len(per_class)}: report/per_class_counts.csv)."))
        per_class = per_class.sort_values("real", kind="stable").head(CLASS_TABLE_ROWS)
    blocks.append(Block("table", per_class))
    shown = synthetic_rows(run_dir, data.image_shape[2],
                           mosaic_shards(shards, data.class_counts,
                                         cfg.report.samples_per_class))
    mosaic = sample_mosaic(shown, data.class_names, cfg.report.samples_per_class,
                           folder / "synthetic_samples.png", cfg.seed)
    if mosaic is not None:
        blocks.append(Block("image", str(mosaic.relative_to(run_dir)), "synthetic samples"))
    blocks += rounds_blocks(cfg, run_dir)
    blocks += mining_blocks(run_dir, data.class_names)
    grids = sorted(run_dir.glob("grid_class*.png"))
    sweep = folder / SWEEP_FILE
    if grids or sweep.is_file():
        blocks.append(Block("h2", "What guidance does"))
    for grid in grids:
        blocks.append(Block("image", grid.name, "one class: criteria (rows) x guidance scales "
                                                "(columns), same seeds in every cell"))
    if sweep.is_file():
        table = pd.read_csv(sweep)
        reference = table.pop("held_out_nearest_train").iloc[0]
        table = table.drop(columns="in_grid")
        if table["judge_in_group"].isna().all():
            table = table.drop(columns="judge_in_group")
        blocks += [Block("p", "The grid's class drawn with the same seeds at every scale, per "
                              "criterion: the guide's criterion on the final sample (what "
                              "guidance raises; mean and standard deviation over the samples), "
                              "the share the guide and an independent judge "
                              "(an SVM on real validation and pool images) put in the class, "
                              "and the RMS pixel distance to the nearest training image of the "
                              f"class (held-out real images of it: {reference:.3f}; far below "
                              f"that, samples are near-copies)."),
                   Block("image", f"{REPORT_DIR}/{SWEEP_PLOT}", "what guidance does, per scale"),
                   Block("table", table.round(3))]
    quality = folder / QUALITY_FILE
    if cfg.report.quality and quality.is_file():
        blocks += [Block("h2", "Synthetic-data quality"),
                   Block("p", "On the baseline classifier's features, against real test "
                              "images drawn to the same class proportions. FID: lower is "
                              "closer; density ~1 and coverage near 1: samples lie where "
                              f"real data lies and cover it (k = {cfg.report.quality_k})."),
                   Block("table", pd.read_csv(quality))]
    report_csv = run_dir / SYNTHETIC_DIR / "filter_report.csv"
    if s.filter.enabled and report_csv.is_file():
        blocks += [Block("p", "Filter: samples dropped per class."),
                   Block("table", pd.read_csv(report_csv))]
    if times:
        blocks += [Block("h2", "Stages"),
                   Block("p", "When each stage started (seconds after the run began), its "
                              "wall time, and the peak resident memory of the driver process "
                              "during it (history in stages.json). Stages whose spans overlap "
                              "ran side by side."),
                   Block("table", pd.DataFrame(
                       [{"stage": k, "started (s)": round(v[2], 1), "seconds": round(v[0], 1),
                         "driver peak RSS (MB)": round(v[1])}
                        for k, v in sorted(times.items(), key=lambda kv: kv[1][2])]))]
    blocks += [Block("h2", "Config"),
               Block("code", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))]
    write_text_atomic(run_dir / "report.html", to_html(blocks, f"ray_lt report: {name}"))
    path = run_dir / "report.md"
    write_text_atomic(path, to_markdown(blocks))
    return path
