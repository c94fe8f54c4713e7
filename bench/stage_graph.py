"""The stage graph against one stage at a time, on the same config in one bench run:

    python bench/stage_graph.py [--config configs/digits_lt.yaml] [--repeats 1] [--out DIR]

Runs ``ray-lt run CONFIG`` as a user does (a fresh local Ray per run), alternating the
default graph, where every stage starts once its inputs are ready, with ``--sequential``,
each into its own folder under ``--out`` (default ``runs/stage_graph``). Prints, per stage,
when it started and how long it took in each mode (from ``stages.json``), the wall time of
each whole command and their ratio, and whether the two runs wrote the same bits: the
classifiers, the generator, the samples and the metrics.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
MODES = {"graph": [], "sequential": ["--sequential"]}
SAME_BITS = ("classifier/model.pt", "generator/unet/diffusion_pytorch_model.safetensors",
             "final/classifier/model.pt", "metrics.json", "final/metrics.json")


def run(config: Path, out: Path, extra: list[str], overrides: list[str]) -> float:
    """One ``ray-lt run`` into ``out``; its wall seconds. Its terminal output goes to
    ``out.log``."""
    exe = str(Path(sys.executable).with_name("ray-lt"))
    command = [exe, "run", str(config), "--out", str(out), *extra]
    if overrides:
        command += ["--set", *overrides]
    started = time.perf_counter()
    with open(f"{out}.log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}; see {out}.log")
    return seconds


def stage_table(out: Path) -> dict[str, tuple[float, float]]:
    """Stage -> (started after, seconds) of the run's last attempt at it."""
    timings = json.loads((out / "stages.json").read_text())["timings"]
    return {name: (entries[-1].get("started_after", float("nan")), entries[-1]["seconds"])
            for name, entries in timings.items()}


def samples(out: Path) -> pd.DataFrame:
    frame = pd.concat(pd.read_parquet(p, columns=["shard_id", "seed", "image"])
                      for p in (out / "synthetic").glob("shard_*"))
    return frame.sort_values(["shard_id", "seed"]).reset_index(drop=True)


def same_bits(a: Path, b: Path) -> list[str]:
    """The outputs that differ between two finished runs (none: the same bits)."""
    differ = [name for name in SAME_BITS
              if (a / name).is_file() and (a / name).read_bytes() != (b / name).read_bytes()]
    if not samples(a).equals(samples(b)):
        differ.append("synthetic samples")
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "digits_lt.yaml")
    parser.add_argument("--repeats", type=int, default=1, help="graph / sequential pairs")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "stage_graph")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[],
                        help="config overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    walls: dict[str, list[float]] = {mode: [] for mode in MODES}
    tables: dict[str, list[dict]] = {mode: [] for mode in MODES}
    folders: dict[str, list[Path]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode, extra in MODES.items():
            out = args.out / f"{mode}_{repeat}"
            if out.exists():
                raise SystemExit(f"{out} exists: name a new --out or remove it")
            print(f"{mode} run {repeat + 1}/{args.repeats} -> {out}", flush=True)
            walls[mode].append(run(args.config, out, extra, args.overrides))
            tables[mode].append(stage_table(out))
            folders[mode].append(out)
            print(f"  {walls[mode][-1]:.0f} s", flush=True)

    last = {mode: tables[mode][-1] for mode in MODES}
    order = sorted(last["graph"], key=lambda name: last["graph"][name][0])
    print(f"\n{args.config.name}, last pair (seconds):\n")
    print("| stage | graph: start, seconds | sequential: start, seconds |")
    print("|---|---|---|")
    for name in order:
        cells = [f"{last[m][name][0]:.0f}, {last[m][name][1]:.1f}" if name in last[m] else "-"
                 for m in MODES]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    graph, sequential = (sum(walls[m]) / len(walls[m]) for m in MODES)
    print(f"\nwhole command, mean of {args.repeats}: graph {graph:.0f} s, sequential "
          f"{sequential:.0f} s (each: {', '.join(f'{s:.0f}' for s in walls['graph'])} / "
          f"{', '.join(f'{s:.0f}' for s in walls['sequential'])}); sequential / graph "
          f"{sequential / graph:.2f}x")
    for repeat in range(args.repeats):
        differ = same_bits(folders["graph"][repeat], folders["sequential"][repeat])
        print(f"pair {repeat + 1}: " + ("the same bits (models, samples, metrics)" if not differ
                                        else f"differ in {', '.join(differ)}"))


if __name__ == "__main__":
    main()
