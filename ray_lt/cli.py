"""``ray-lt`` command line: ``ray-lt <command> CONFIG --out DIR [--set key.path=value ...]``."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ray_lt import commands
from ray_lt.config import Config, load_config
from ray_lt.errors import ConfigError, RayLTError
from ray_lt.log import setup_console

COMMANDS: dict[str, tuple[Callable[[Config, Path], object], str]] = {
    "run": (commands.run, "the whole pipeline: baseline, generator, guided synthesis, "
                          "classifier on real + synthetic, evaluation, report"),
    "tune": (commands.tune, "Ray Tune + Optuna over guidance scale, dropout, criterion "
                            "mixture and loss weights; writes a result table and "
                            "best_config.yaml"),
    "train": (commands.train, "train the classifier on the real data and evaluate it"),
    "train-generator": (commands.train_generator,
                        "train the pixel diffusion model on the long-tailed training set"),
    "synthesize": (commands.synthesize,
                   "sample feedback-guided synthetic images to the quotas (Ray Data actors)"),
    "grid": (commands.grid, "PNG grid of one class's samples: criteria x guidance scales"),
}


def add_run_arguments(parser: argparse.ArgumentParser, config_flag: bool = False) -> None:
    """CONFIG, --out and --set, shared by the console script and the job entry points."""
    if config_flag:
        parser.add_argument("--config", required=True, help="YAML config file")
    else:
        parser.add_argument("config", help="YAML config file")
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                        metavar="KEY.PATH=VALUE", help="override any config key")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's INFO lines, the workers' output and Ray Data's "
                             "progress bars (always in DIR/logs/ and Ray's session logs)")


def check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` folder that cannot be created or written, before Ray starts. It
    creates nothing: a probe file in the nearest existing folder is removed at once."""
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, so the run folder cannot be made "
                          f"there; choose another --out")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".ray-lt-probe-"):
            pass
    except OSError as err:
        raise ConfigError(f"--out {out}: the run folder cannot be created or written: a file "
                          f"cannot be made in {existing} ({err.strerror}); choose a writable "
                          f"--out") from None


def run_command(name: str, args: argparse.Namespace) -> int:
    """Load the config, run the command; bad input ends with a one-paragraph error, exit 2."""
    setup_console(args.verbose)
    try:
        cfg = load_config(args.config, args.overrides)
        check_out_dir(args.out)
        COMMANDS[name][0](cfg, args.out)
    except RayLTError as err:
        print(f"ray-lt {name}: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ray-lt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        add_run_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return run_command(args.command, args)


def job_main(name: str, argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/<name>.py``: the same command with ``--config CONFIG``."""
    parser = argparse.ArgumentParser(prog=f"jobs/{name}.py", description=COMMANDS[name][1])
    add_run_arguments(parser, config_flag=True)
    return run_command(name, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
