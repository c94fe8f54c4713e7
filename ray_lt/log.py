"""What ray_lt prints, and where the rest goes.

Every module logs to its own ``logging.getLogger(__name__)`` under ``ray_lt``. The console
shows ray_lt's INFO lines as ``[ray-lt] ...`` (stage banners, results, where the report is),
and warnings and errors from anything. Ray's own INFO lines, Ray Data's per-dataset progress
bars and the workers' output stay off the terminal unless ``verbose``; a run's complete log,
with timestamps and Ray's driver-side lines, is ``DIR/logs/ray-lt.log`` and Ray's session logs
(every worker's output) are where that file says.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

LOG_DIR = "logs"
LOG_FILE = "ray-lt.log"
_CONSOLE = "ray_lt.console"
_FILE = "ray_lt.file:"
log = logging.getLogger(__name__)
_state = {"verbose": False}
# Ray's driver-side loggers kept below WARNING on the console unless verbose.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")
# "ray" and "ray.data" pass nothing on to their parents: the run's log file is on both.


def verbose() -> bool:
    return _state["verbose"]


class _NoCpuSnapshot(logging.Filter):
    """Ray Data's warning that the cluster "does not have any available CPUs" and "the
    Dataset job will hang": a snapshot, true for a moment while stages run side by side or
    an autoscaling cluster adds its nodes, after ``check_cluster_resources`` has refused any
    config the cluster can never run. Turned into a DEBUG line: the log file keeps it, the
    terminal does not show it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and "Dataset job will hang" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def setup_console(verbose: bool = False) -> None:
    """ray_lt's INFO lines to stdout; Ray's loggers to WARNING unless ``verbose``."""
    _state["verbose"] = bool(verbose)
    root = logging.getLogger("ray_lt")
    root.setLevel(logging.DEBUG)
    if not any(h.get_name() == _CONSOLE for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.set_name(_CONSOLE)
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("[ray-lt] %(message)s"))
        root.addHandler(handler)
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    # Ray Data's one warning that its progress bars are off: they are off on purpose here.
    logging.getLogger("ray.data._internal.progress").setLevel(
        logging.INFO if verbose else logging.ERROR)
    dataset = logging.getLogger("ray.data.dataset")
    for existing in [f for f in dataset.filters if isinstance(f, _NoCpuSnapshot)]:
        dataset.removeFilter(existing)
    if not verbose:
        dataset.addFilter(_NoCpuSnapshot())


def log_to_file(run_dir: Path) -> Path:
    """Write ray_lt's and Ray's driver-side log lines, at every level, to
    ``run_dir/logs/ray-lt.log`` (appended: a rerun continues the file). The file handlers of
    any other run directory are closed first: a process's log lines go to one run at a
    time (``close_log_files`` closes this one)."""
    path = Path(run_dir).resolve() / LOG_DIR / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    name = f"{_FILE}{path}"
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    close_log_files(keep=name)
    for logger_name in ("ray_lt", *RAY_LOGGERS[:2]):
        logger = logging.getLogger(logger_name)
        if any(h.get_name() == name for h in logger.handlers):
            continue
        handler = logging.FileHandler(path)
        handler.set_name(name)
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return path


def close_log_files(keep: str | None = None) -> None:
    """Remove and close every run directory's file handler (but ``keep``'s)."""
    for logger_name in ("ray_lt", *RAY_LOGGERS[:2]):
        logger = logging.getLogger(logger_name)
        for handler in list(logger.handlers):
            name = handler.get_name() or ""
            if name.startswith(_FILE) and name != keep:
                logger.removeHandler(handler)
                handler.close()


def format_summary(metrics: dict[str, Any], keys: tuple[str, ...]) -> str:
    """``overall 0.912  few 0.874 ...``: the headline ``keys`` a metrics dict has."""
    return "  ".join(f"{k} {metrics[k]:.3f}" for k in keys if metrics.get(k) is not None)


def banner(step: int, total: int, name: str, note: str = "", since: float | None = None
           ) -> None:
    """``stage 3/9 generator: pixel [41 s]``: one line per stage on the console."""
    elapsed = f" [{time.perf_counter() - since:.0f} s]" if since is not None else ""
    log.info(f"stage {step}/{total} {name}{': ' + note if note else ''}{elapsed}")
