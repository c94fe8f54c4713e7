"""A run directory's own files: the lock that keeps one command at a time in it, and its
``config.yaml``, written only once the checks have passed and never over a file that another
program (or the user) wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from ray_lt.atomic import write_text_atomic
from ray_lt.config import Config
from ray_lt.errors import ConfigError
from ray_lt.stages import STAGES_FILE  # a folder that has one is a run's

LOCK_FILE = ".ray-lt.lock"
CONFIG_FILE = "config.yaml"
CONFIG_HEADER = "# ray-lt run config"


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


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is a config ray-lt wrote for its run (its header line), or sits in a
    folder that already holds a run (``stages.json``: a run made before the header)."""
    if (path.parent / STAGES_FILE).is_file():
        return True
    try:
        with path.open("rb") as handle:
            return handle.readline().startswith(CONFIG_HEADER.encode())
    except OSError:
        return False


def check_run_config_file(out_dir: Path) -> None:
    """Refuse a run directory whose ``config.yaml`` is not a run's own (say ``--out .`` beside
    the user's config): writing the run's config would overwrite it."""
    path = Path(out_dir) / CONFIG_FILE
    if path.exists() and not _is_run_config(path):
        raise ConfigError(f"--out {out_dir}: {path} is not a config that ray-lt wrote for a run "
                          f"(it lacks the '{CONFIG_HEADER}' header line), and the run would "
                          f"overwrite it with its own; choose another --out, such as a new "
                          f"folder")


def write_run_config(cfg: Config, out_dir: Path, command: str) -> Path:
    """``out_dir/config.yaml``: the config of the command that last ran in the folder, which
    ``ray-lt`` reads back to an equal config."""
    path = Path(out_dir) / CONFIG_FILE
    check_run_config_file(out_dir)
    header = (f"{CONFIG_HEADER}, written by `ray-lt {command}` on "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}.\n"
              f"# Run again with: ray-lt {command} {path} --out {Path(out_dir)}\n")
    write_text_atomic(path, header + yaml.safe_dump(cfg.model_dump(mode="json"),
                                                   sort_keys=False))
    return path


# -- one command per run directory ------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(path: Path) -> dict | None:
    """The lock's record, None when the file is gone or unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(holder: dict) -> str:
    return (f"PID {holder.get('pid')} on host {holder.get('host')} "
            f"(`ray-lt {holder.get('command')}`, since {holder.get('started')})")


# lock files this process holds: [nesting depth, whether taking it created the folder]
_HELD: dict[Path, list] = {}


def acquire_lock(out_dir: Path, command: str) -> Path:
    """Take ``out_dir``'s lock for this process, or refuse at once naming the PID and host of
    the process that holds it. A lock left by a process that is no longer alive on this host
    is taken over. Returns the lock file (``release_lock`` frees it)."""
    out_dir = Path(out_dir).resolve()
    path = out_dir / LOCK_FILE
    if path in _HELD:  # a command called from within another one in this process
        _HELD[path][0] += 1
        return path
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    record = {"pid": os.getpid(), "host": host, "command": command,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        fd, staged = tempfile.mkstemp(dir=out_dir, prefix=".ray-lt.lock.")
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        try:
            os.link(staged, path)  # atomic: fails when the lock exists, and never half-written
        except FileExistsError:
            holder = _holder(path)
        else:
            _HELD[path] = [1, created]
            return path
        finally:
            os.unlink(staged)
        if holder is None:
            if path.exists() and time.time() - path.stat().st_mtime < 5:
                time.sleep(0.5)  # another process is writing it
                continue
        elif holder.get("host") != host or _alive(int(holder.get("pid", -1))):
            raise ConfigError(f"--out {out_dir}: another ray-lt command is running in this run "
                              f"directory: {_describe(holder)}. Wait for it to end or choose "
                              f"another --out; if that process is gone, delete {path}")
        with contextlib.suppress(FileNotFoundError):  # its holder is dead: take it over
            path.unlink()
    raise ConfigError(f"--out {out_dir}: could not take the run directory's lock {path}; "
                      f"delete it if no ray-lt command is running there")


def release_lock(path: Path) -> None:
    """Free a lock ``acquire_lock`` took (the outermost of nested takes removes the file, and
    the folder when taking the lock made it and the command left nothing in it)."""
    depth, created = _HELD.get(path, [1, False])
    if depth > 1:
        _HELD[path][0] = depth - 1
        return
    _HELD.pop(path, None)
    holder = _holder(path)
    if holder is not None and holder.get("pid") == os.getpid() and \
            holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):  # not empty: the command wrote something
            path.parent.rmdir()


@contextlib.contextmanager
def run_lock(out_dir: Path, command: str) -> Iterator[Path]:
    """``out_dir``'s lock held over a ``with`` block (``acquire_lock``)."""
    path = acquire_lock(out_dir, command)
    try:
        yield path
    finally:
        release_lock(path)
