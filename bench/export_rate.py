"""Rows per second of ``ray-lt export`` in each format, side by side in one Ray session.

    python bench/export_rate.py RUN [--with-real] [--repeats 2]

Exports the finished run directory RUN into a fresh temporary folder per format and pass
(formats alternated, so that a slow moment of the machine does not land on one format), and
prints the rows written, the seconds of the export itself (Ray already started) and rows per
second.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray_lt.cluster import init_ray  # noqa: E402
from ray_lt.config import load_config  # noqa: E402
from ray_lt.data import load_dataset  # noqa: E402
from ray_lt.export import FORMATS, export_run  # noqa: E402
from ray_lt.log import setup_console  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--with-real", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    setup_console()
    cfg = load_config(args.run / "config.yaml")
    data = load_dataset(cfg.dataset, cfg.seed)
    init_ray(cfg.ray)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for fmt in FORMATS:
                to = Path(scratch) / f"{fmt}_{repeat}"
                done = export_run(cfg, args.run, to, fmt, args.with_real, data=data)
                results.append({"format": fmt, "pass": repeat, "rows": done["written"],
                                "seconds": done["seconds"]})
    print(f"{'format':12s} {'pass':>4s} {'rows':>7s} {'seconds':>8s} {'rows/s':>8s}")
    for r in results:
        print(f"{r['format']:12s} {r['pass']:4d} {r['rows']:7d} {r['seconds']:8.2f} "
              f"{r['rows'] / r['seconds']:8.0f}")
    return results


if __name__ == "__main__":
    main()
