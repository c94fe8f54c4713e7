"""Writes that are complete or absent: a file or folder is made under a temporary name beside
its destination and renamed into place only when whole, so a process killed mid-write never
leaves a half file that a rerun would trust."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` (unique to this process) to write; on success it
    replaces ``path``, on an exception it is removed. A process killed mid-write leaves only
    the hidden temporary ``.NAME.PID.tmp``, which no reader globs."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def staged_folder(folder: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields an empty staging path beside ``folder`` (a stale one is cleared; the caller or
    its writer creates it); on success the staged folder replaces ``folder``, on failure it
    is removed."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + suffix)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
