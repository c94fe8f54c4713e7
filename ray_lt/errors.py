"""Exceptions shared by every stage: each message names the file, line or config key at fault."""

from __future__ import annotations

from pathlib import Path


class RayLTError(Exception):
    """Base class of the errors ray_lt raises on bad input."""


class ConfigError(RayLTError):
    """A config file or override is invalid; the message names the key path."""


class DataError(RayLTError):
    """A data set on disk is missing, malformed or inconsistent; the message names file and line."""


class ClusterError(RayLTError):
    """Ray could not be started here, or the configured cluster could not be reached."""


class TrainingError(RayLTError):
    """Training cannot go on with these settings (a loss that is no longer finite)."""


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


def read_utf8(path: str | Path, what: str = "file", error: type[RayLTError] = DataError) -> str:
    """A UTF-8 text file's contents (a byte-order mark dropped); a byte that is not UTF-8 is
    an ``error`` naming the file, its line and the byte."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise error(f"{path}:{line}: the {what} is not UTF-8 text (byte 0x{raw[err.start]:02x} "
                    f"at column {column}); save it as UTF-8") from None
