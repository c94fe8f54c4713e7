"""Exceptions shared by every stage: each message names the file, line or config key at fault."""

from __future__ import annotations

from pathlib import Path


class RayLTError(Exception):
    """Base class of the errors ray_lt raises on bad input."""


class ConfigError(RayLTError):
    """A config file or override is invalid; the message names the key path."""


class DataError(RayLTError):
    """A data set on disk is missing, malformed or inconsistent; the message names file and line."""


class StageError(RayLTError):
    """A stage needs the output of an earlier stage that is not in the run directory."""


def require_stage(path: str | Path, stage: str, command: str) -> Path:
    """``path`` when it exists, else a StageError naming the stage and the command that makes
    it."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} is missing: the {stage} stage has not run in this run "
                         f"directory; run `{command}` with the same --out first")
    return path
