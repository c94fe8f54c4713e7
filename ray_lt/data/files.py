"""Index files of the real data sets: ImageNet-LT / Places-LT split lists and NICO++ metadata.

Each parser returns a table with columns ``path`` (relative to the root), ``label``, ``group``
(-1 where there is none) and ``source`` (``file:line``, used in every error message).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from ray_lt.errors import DataError

COLUMNS = ["path", "label", "group", "source"]


def _checked_path(root: Path, rel: str, source: str, resolved_root: Path) -> str:
    """The relative path, after checking it stays inside ``root`` and names an existing file."""
    full = (resolved_root / rel).resolve()
    if not full.is_relative_to(resolved_root):
        raise DataError(f"{source}: path {rel!r} resolves outside the data root {root}")
    if not full.is_file():
        raise DataError(f"{source}: image file {full} does not exist")
    return rel


def _checked_label(text: str, num_classes: int, source: str, what: str = "label") -> int:
    try:
        value = int(text)
    except ValueError:
        raise DataError(f"{source}: {what} {text!r} is not an integer") from None
    if not 0 <= value < num_classes:
        raise DataError(f"{source}: {what} {value} is outside [0, {num_classes})")
    return value


def read_split_list(list_file: Path, root: Path, num_classes: int) -> pd.DataFrame:
    """Parse an ImageNet-LT / Places-LT split file: one ``relative/path label`` per line."""
    if not list_file.is_file():
        raise DataError(f"split list {list_file} does not exist")
    rows = []
    resolved = root.resolve()
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{list_file}:{number}"
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{source}: expected 'relative/path label', got {line.strip()!r}")
        label = _checked_label(parts[1], num_classes, source)
        rows.append((_checked_path(root, parts[0], source, resolved), label, -1, source))
    if not rows:
        raise DataError(f"split list {list_file} has no entries")
    return pd.DataFrame(rows, columns=COLUMNS)


NICO_COLUMNS = ("filename", "split", "y", "a")
NICO_SPLITS = {"train": 0, "val": 1, "test": 2}


def read_nico_metadata(
    metadata: Path, root: Path, num_classes: int, num_contexts: int
) -> dict[str, pd.DataFrame]:
    """Parse NICO++ ``metadata.csv`` (filename,split,y,a) into train/val/test tables.

    ``group = y * num_contexts + a``, the class x context cell used for worst-group accuracy.
    """
    if not metadata.is_file():
        raise DataError(f"metadata file {metadata} does not exist")
    tables: dict[str, list] = {name: [] for name in NICO_SPLITS}
    resolved = root.resolve()
    split_names = {v: k for k, v in NICO_SPLITS.items()}
    with metadata.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:4]] != list(NICO_COLUMNS):
            raise DataError(f"{metadata}:1: header must start with {','.join(NICO_COLUMNS)}")
        for number, record in enumerate(reader, start=2):
            if not record or not any(field.strip() for field in record):
                continue
            source = f"{metadata}:{number}"
            if len(record) < 4:
                raise DataError(f"{source}: expected 4 fields filename,split,y,a, got {record}")
            rel, split_text, y_text, a_text = (field.strip() for field in record[:4])
            split = _checked_label(split_text, 3, source, what="split")
            y = _checked_label(y_text, num_classes, source, what="class y")
            a = _checked_label(a_text, num_contexts, source, what="context a")
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
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != num_classes:
        raise DataError(f"{path}: has {len(names)} class names, expected {num_classes}")
    return names
