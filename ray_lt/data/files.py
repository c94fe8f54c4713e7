"""Index files of the real data sets: ImageNet-LT / Places-LT split lists and NICO++ metadata.

Each parser returns a table with columns ``path`` (relative to the root), ``label``, ``group``
(-1 where there is none) and ``source`` (``file:line``, used in every error message).
"""

from __future__ import annotations

import csv
import io
import os
import stat
from pathlib import Path

import pandas as pd

from ray_lt.errors import DataError, read_utf8

COLUMNS = ["path", "label", "group", "source"]


def _checked_path(root: Path, rel: str, source: str, resolved_root: Path) -> str:
    """The relative path, after checking it stays inside ``root`` (symbolic links followed) and
    names an existing, non-empty file (one ``stat`` per line: lists run to a million lines)."""
    full = (resolved_root / rel).resolve()
    if not full.is_relative_to(resolved_root):
        raise DataError(f"{source}: path {rel!r} resolves outside the data root {root}")
    try:
        info = full.stat()
    except OSError:
        info = None
    if info is None or not stat.S_ISREG(info.st_mode):
        raise DataError(f"{source}: image file {full} does not exist")
    if info.st_size == 0:
        raise DataError(f"{source}: image file {full} is empty (0 bytes); replace it or remove "
                        f"the line")
    return rel


def _check_unique(listed: dict[str, str], rel: str, source: str) -> None:
    """Refuse a path listed a second time: the image would count twice in its class."""
    key = os.path.normpath(rel)
    first = listed.setdefault(key, source)
    if first != source:
        raise DataError(f"{source}: {rel!r} is listed twice, first at {first}; remove one of "
                        f"the two lines")


def _checked_label(text: str, num_classes: int, source: str, what: str = "label") -> int:
    try:
        value = int(text)
    except ValueError:
        raise DataError(f"{source}: {what} {text!r} is not an integer") from None
    if not 0 <= value < num_classes:
        raise DataError(f"{source}: {what} {value} is outside [0, {num_classes})")
    return value


def read_split_list(list_file: Path, root: Path, num_classes: int) -> pd.DataFrame:
    """Parse an ImageNet-LT / Places-LT split file: one ``relative/path label`` per line (the
    label is the last field, so a path may contain spaces; a UTF-8 byte-order mark is dropped)."""
    if not list_file.is_file():
        raise DataError(f"split list {list_file} does not exist")
    rows = []
    listed: dict[str, str] = {}
    resolved = root.resolve()
    for number, line in enumerate(read_utf8(list_file, "split list").splitlines(),
                                  start=1):
        if not line.strip():
            continue
        source = f"{list_file}:{number}"
        parts = line.strip().rsplit(maxsplit=1)  # the label is last: a path may hold spaces
        if len(parts) != 2:
            raise DataError(f"{source}: expected 'relative/path label', got {line.strip()!r}")
        label = _checked_label(parts[1], num_classes, source)
        _check_unique(listed, parts[0], source)
        rows.append((_checked_path(root, parts[0], source, resolved), label, -1, source))
    if not rows:
        raise DataError(f"split list {list_file} has no entries")
    return pd.DataFrame(rows, columns=COLUMNS)


NICO_COLUMNS = ("filename", "split", "y", "a")
NICO_SPLITS = {"train": 0, "val": 1, "test": 2}


def read_nico_metadata(
    metadata: Path, root: Path, num_classes: int, num_contexts: int
) -> dict[str, pd.DataFrame]:
    """Parse NICO++ ``metadata.csv`` (columns filename,split,y,a, found by name in the header)
    into train/val/test tables.

    ``group = y * num_contexts + a``, the class x context cell used for worst-group accuracy.
    """
    if not metadata.is_file():
        raise DataError(f"metadata file {metadata} does not exist")
    tables: dict[str, list] = {name: [] for name in NICO_SPLITS}
    listed: dict[str, str] = {}
    resolved = root.resolve()
    split_names = {v: k for k, v in NICO_SPLITS.items()}
    text = read_utf8(metadata, "metadata file")
    with io.StringIO(text, newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in NICO_COLUMNS if name not in header]
        if missing:
            raise DataError(f"{metadata}:1: the header lacks the column(s) {', '.join(missing)}; "
                            f"it needs {','.join(NICO_COLUMNS)} (found {','.join(header)!r})")
        twice = [f"{name} (columns "
                 f"{', '.join(str(i + 1) for i, h in enumerate(header) if h == name)})"
                 for name in NICO_COLUMNS if header.count(name) > 1]
        if twice:
            raise DataError(f"{metadata}:1: the header names {'; '.join(twice)} more than once; "
                            f"keep one column of each name")
        at = [header.index(name) for name in NICO_COLUMNS]
        for number, record in enumerate(reader, start=2):
            if not record or not any(field.strip() for field in record):
                continue
            source = f"{metadata}:{number}"
            if len(record) <= max(at):
                raise DataError(f"{source}: expected {len(header)} fields "
                                f"{','.join(header)}, got {record}")
            rel, split_text, y_text, a_text = (record[i].strip() for i in at)
            split = _checked_label(split_text, 3, source, what="split")
            y = _checked_label(y_text, num_classes, source, what="class y")
            a = _checked_label(a_text, num_contexts, source, what="context a")
            _check_unique(listed, rel, source)
            path = _checked_path(root, rel, source, resolved)
            tables[split_names[split]].append((path, y, y * num_contexts + a, source))
    for name, rows in tables.items():
        if not rows:
            raise DataError(f"{metadata}: no rows with split={NICO_SPLITS[name]} ({name})")
    return {name: pd.DataFrame(rows, columns=COLUMNS) for name, rows in tables.items()}


def read_class_names(path: Path | None, num_classes: int) -> list[str]:
    """One class name per line (line i names class i-1); generic names when no file is given."""
    if path is None:
        return [f"class {i}" for i in range(num_classes)]
    if not path.is_file():
        raise DataError(f"class names file {path} does not exist")
    names = [line.strip() for line in read_utf8(path, "class names file").splitlines()
             if line.strip()]
    if len(names) != num_classes:
        raise DataError(f"{path}: has {len(names)} class names, expected {num_classes}")
    return names
