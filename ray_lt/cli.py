"""``ray-lt`` command line: ``ray-lt <command> CONFIG --out DIR [--set key.path=value ...]``."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from ray_lt import commands
from ray_lt.config import load_config
from ray_lt.errors import RayLTError
from ray_lt.log import setup_console
from ray_lt.rundir import check_out_dir

COMMANDS: dict[str, tuple[Callable[..., object], str]] = {
    "run": (commands.run, "the whole pipeline: baseline, generator, guided synthesis, "
                          "classifier on real + synthetic, evaluation, report"),
    "tune": (commands.tune, "Ray Tune + Optuna over guidance scale, dropout, criterion "
                            "mixture and loss weights; writes a result table and "
                            "best_config.yaml"),
    "train": (commands.train, "train the classifier on the real data and evaluate it"),
    "train-generator": (commands.train_generator,
                        "train the pixel diffusion model on the long-tailed training set or an "
                        "external pool (generator.train_on)"),
    "synthesize": (commands.synthesize,
                   "sample feedback-guided synthetic images to the quotas (Ray Data actors)"),
    "grid": (commands.grid, "one class at every guidance scale: the guidance sweep's plot and "
                            "the sample grid"),
    "mine": (commands.mine, "describe the hardest and easiest samples of the mined classes "
                            "with a local vision-language model, score the keywords that set "
                            "them apart and write prompts from them (mining/round<r>/)"),
    "plan": (commands.plan_run, "read and check the data, then print the class-count profile, "
                                "the synthetic quota, its disk size and an estimate of the "
                                "sampler's GPU time; trains and samples nothing (--out: where "
                                "the histogram goes, default plan/<config name>)"),
}


def out_dir(text: str) -> Path:
    """``--out``: a folder path; an empty one is refused (it would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the run directory is empty; give a folder, e.g. "
                                         "--out runs/first")
    return Path(text)


def add_run_arguments(parser: argparse.ArgumentParser, config_flag: bool = False,
                      run: bool = False, out_required: bool = True) -> None:
    """CONFIG, --out and --set, shared by the console script and the job entry points
    (``run``: also --sequential)."""
    if config_flag:
        parser.add_argument("--config", required=True, help="YAML config file")
    else:
        parser.add_argument("config", help="YAML config file")
    parser.add_argument("--out", required=out_required, type=out_dir, help="run directory")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                        metavar="KEY.PATH=VALUE", help="override any config key")
    if run:
        parser.add_argument("--sequential", action="store_true",
                            help="run the stages one at a time in their listed order, none "
                                 "side by side (for debugging)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's INFO lines, the workers' output, Ray Data's "
                             "progress bars and the traceback of an error (always in "
                             "DIR/logs/ and Ray's session logs)")


# How a RayLTError ends the traceback text of a Ray error that kept no exception object: its
# message runs to a blank line or the end
RAY_LT_ERROR_TEXT = re.compile(r"^ray_lt\.[\w.]*Error: (.+?)(?:\n\s*\n|\Z)",
                               re.MULTILINE | re.DOTALL)


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and everything it wraps: causes, contexts, a Ray error's ``cause`` and a Ray
    Train worker group's failures, outermost first."""
    found: list[BaseException] = []
    stack: list[object] = [err]
    while stack:
        e = stack.pop(0)
        if not isinstance(e, BaseException) or any(e is f for f in found):
            continue
        found.append(e)
        failures = getattr(e, "worker_failures", None)
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__,
                      *(failures.values() if isinstance(failures, dict) else ())])
    return found


def user_error(err: BaseException) -> str | None:
    """The one-paragraph message of an error the user can fix, found in ``err`` or in what
    it wraps (a Ray task's, actor's or training worker's error around a RayLTError); None for
    anything else, which is a fault of ray_lt and keeps its traceback."""
    chain = _chain(err)
    for e in chain:
        if isinstance(e, RayLTError):
            cause = getattr(e, "cause", None)  # a RayTaskError made an instance of its cause
            return str(cause if isinstance(cause, RayLTError) else e).strip()
    for e in chain:
        if isinstance(e, UnicodeDecodeError):
            return (f"a file is not UTF-8 text ({e.reason} at byte {e.start}, 0x"
                    f"{e.object[e.start]:02x}); save it as UTF-8")
        if isinstance(e, json.JSONDecodeError):
            return f"a JSON file is not valid JSON: {e}"
    for e in chain:  # an actor's creation failed: Ray keeps only the text of its error
        wrapped = RAY_LT_ERROR_TEXT.search(str(e)) if type(e).__module__.startswith("ray.") \
            else None
        if wrapped:
            return wrapped.group(1).strip()
    return None


def _stop_local_ray() -> None:
    """After Ctrl-C: stop the Ray processes this command started on this machine (a cluster
    it only connected to is left running)."""
    import ray

    with contextlib.suppress(Exception):
        ray.shutdown()


def guarded(name: str, args: argparse.Namespace, body: Callable[[], object], kept: Path) -> int:
    """Run ``body`` as command ``name``: bad input, a cluster that cannot be reached and Ctrl-C
    end in one line (exit 2, 130 for Ctrl-C; ``--verbose`` adds the traceback); what is
    finished stays in ``kept``."""
    setup_console(args.verbose)
    try:
        body()
    except KeyboardInterrupt:
        _stop_local_ray()
        if args.verbose:
            traceback.print_exc()
        print(f"ray-lt {name}: interrupted; what has finished is kept in {kept}, and the "
              f"same command resumes from there", file=sys.stderr)
        return 130
    except Exception as err:
        message = user_error(err)
        if message is None:
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"ray-lt {name}: error: {message}", file=sys.stderr)
        return 2
    return 0


def run_command(name: str, args: argparse.Namespace) -> int:
    """Load the config and run the command (``guarded``)."""
    if name == "plan" and args.out is None:
        args.out = Path("plan") / Path(args.config).stem

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        check_out_dir(args.out)
        options = {"sequential": True} if getattr(args, "sequential", False) else {}
        COMMANDS[name][0](cfg, args.out, **options)

    return guarded(name, args, body, args.out)


EXPORT_HELP = ("write a run's synthetic set (and with --with-real its real training set) for "
               "other training code: an ImageFolder tree, WebDataset tar shards or Parquet, "
               "with manifest.csv; a rerun skips what is written")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="the run directory to export from")
    parser.add_argument("--to", required=True, type=out_dir, help="where to write")
    parser.add_argument("--format", required=True, choices=("imagefolder", "webdataset",
                                                            "parquet"))
    parser.add_argument("--with-real", action="store_true",
                        help="also the real training images: a balanced copy")
    parser.add_argument("--include-filtered", action="store_true",
                        help="also the samples the filter dropped (their reason in the "
                             "manifest)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                        metavar="KEY.PATH=VALUE", help="override a key of the run's config "
                                                       "(e.g. ray.address)")
    parser.add_argument("--verbose", action="store_true", help="Ray's INFO lines and tracebacks")


def export_command(args: argparse.Namespace) -> int:
    """``ray-lt export`` (``guarded``)."""
    def body() -> None:
        check_out_dir(args.to)
        commands.export(args.run_dir, args.to, args.format, args.with_real,
                        args.include_filtered, args.overrides)

    return guarded("export", args, body, args.to)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ray-lt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        add_run_arguments(sub.add_parser(name, help=help_text, description=help_text),
                          run=name == "run", out_required=name != "plan")
    add_export_arguments(sub.add_parser("export", help=EXPORT_HELP, description=EXPORT_HELP))
    args = parser.parse_args(argv)
    if args.command == "export":
        return export_command(args)
    return run_command(args.command, args)


def job_main(name: str, argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/<name>.py``: the same command with ``--config CONFIG``."""
    parser = argparse.ArgumentParser(prog=f"jobs/{name}.py", description=COMMANDS[name][1])
    add_run_arguments(parser, config_flag=True, run=name == "run")
    return run_command(name, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
