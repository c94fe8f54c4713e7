"""The user's own data: a folder per class (torchvision's ``ImageFolder`` layout, optionally a
context level below it) or a manifest table of paths and labels (CSV or Parquet).

Both return the tables that the list-file readers return (``path`` relative to the root,
``label``, ``group``, ``source``) plus the class and context names, after the same checks:
every file inside the root (symbolic links followed), existing, non-empty and listed once,
every label a class, every class with a training image. Errors name the folder, or the file
and row.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ray_lt.data.files import COLUMNS
from ray_lt.errors import DataError

SPLITS = ("train", "val", "test")
SPLIT_CODES = {"train": "train", "val": "val", "test": "test", "0": "train", "1": "val",
               "2": "test", "validation": "val"}


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) that an installed PIL plugin opens."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN)


@dataclass
class UserTables:
    """What reading a folder tree or a manifest gives: the split tables and the names."""

    tables: dict[str, pd.DataFrame]
    class_names: list[str]
    context_names: list[str]
    split_from_train: tuple[str, ...] = ()
    """The splits cut from the training data by ``stratified_split`` (none were given)."""
    skipped: int = 0
    """Files in the folders that are not images by their extension (left out)."""


class _Paths:
    """Checks of one data root, shared by every row: inside the root, a regular non-empty file,
    not seen before. Directory resolutions are cached, so a path costs about one ``lstat``."""

    def __init__(self, root: Path):
        self.root = root
        self.resolved = Path(os.path.realpath(root))
        self._prefix = str(self.resolved) + os.sep
        self._dirs: dict[str, str] = {}
        self._seen: dict[str, str] = {}

    def _real(self, path: str) -> str:
        head, name = os.path.split(path)
        real_dir = self._dirs.get(head)
        if real_dir is None:
            real_dir = self._dirs[head] = os.path.realpath(head)
        full = os.path.join(real_dir, name)
        try:
            if stat.S_ISLNK(os.lstat(full).st_mode):
                full = os.path.realpath(full)
        except OSError:
            pass
        return full

    def check(self, path: str, source: str, shown: str) -> str:
        """``path`` (absolute or relative to the root) as a path relative to the resolved root,
        after every check; ``source`` names the row or folder in errors."""
        full = path if os.path.isabs(path) else os.path.join(self.resolved, path)
        real = self._real(full)
        if not real.startswith(self._prefix):
            raise DataError(f"{source}: path {shown!r} resolves outside the data root "
                            f"{self.root} (to {real})")
        try:
            info = os.stat(real)
        except OSError:
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):
            raise DataError(f"{source}: image file {full} does not exist")
        if info.st_size == 0:
            raise DataError(f"{source}: image file {full} is empty (0 bytes); replace or remove "
                            f"it")
        first = self._seen.setdefault(real, source)
        if first != source:
            raise DataError(f"{source}: {shown!r} is the same file as {first} ({real}); an image "
                            f"may appear once")
        return real[len(self._prefix):]


# -- folders -------------------------------------------------------------------------------

def _subfolders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder)
                  if not e.name.startswith(".") and e.is_dir(follow_symlinks=True))


def _files_under(folder: Path, extensions: frozenset[str]) -> tuple[list[str], int]:
    """Image files below ``folder`` (any depth, symbolic links followed, hidden names left out),
    sorted; and how many other files were left out."""
    found, skipped = [], 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in extensions:
                found.append(os.path.join(dirpath, name))
            else:
                skipped += 1
    return sorted(found), skipped


def read_image_folders(root: Path, contexts: bool, val_fraction: float, test_fraction: float,
                       seed: int) -> UserTables:
    """``root/train/<class>/...`` (and ``root/val``, ``root/test`` in the same layout, or a
    seeded stratified split of the training folder for each one absent). With ``contexts``
    the level below a class names its context: ``root/train/<class>/<context>/...``.

    Class names are the training folder's subfolders, sorted (``ImageFolder``'s order); the
    context names are the sorted union of the context folders of every split.
    """
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"dataset.root: {root} has no train/ folder; dataset.kind: folder reads "
                        f"{root}/train/<class>/<image> (and val/, test/ in the same layout)")
    classes = _subfolders(train)
    if not classes:
        raise DataError(f"{train}: no class folders; put each class's images in "
                        f"{train}/<class>/")
    extensions = image_extensions()
    paths = _Paths(root)
    present = [s for s in SPLITS if (root / s).is_dir()]
    found: dict[str, list[tuple[str, int, str]]] = {}
    context_set: set[str] = set()
    skipped = 0
    for split in present:
        rows: list[tuple[str, int, str]] = []
        for name in _subfolders(root / split):
            if name not in classes:
                raise DataError(f"{root / split / name}: class folder {name!r} is not in "
                                f"{train} (the classes are the folders of train/)")
            label = classes.index(name)
            class_dir = root / split / name
            if contexts:
                loose = [e.name for e in os.scandir(class_dir)
                         if not e.name.startswith(".") and e.is_file(follow_symlinks=True)]
                if loose:
                    raise DataError(f"{class_dir}: file {loose[0]!r} is not in a context folder; "
                                    f"with dataset.contexts: true images are in "
                                    f"{split}/<class>/<context>/")
                for context in _subfolders(class_dir):
                    context_set.add(context)
                    files, other = _files_under(class_dir / context, extensions)
                    skipped += other
                    rows += [(f, label, context) for f in files]
            else:
                files, other = _files_under(class_dir, extensions)
                skipped += other
                rows += [(f, label, "") for f in files]
        found[split] = rows
    context_names = sorted(context_set)
    tables = {}
    for split, rows in found.items():
        records = [(paths.check(path, path, path), label,
                    label * len(context_names) + context_names.index(context) if contexts
                    else -1, path) for path, label, context in rows]
        tables[split] = pd.DataFrame(records, columns=COLUMNS)
    counts = np.bincount(tables["train"]["label"], minlength=len(classes))
    empty = [classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"{train}: class folder(s) {', '.join(repr(e) for e in empty[:20])} hold "
                        f"no image; every class needs at least one training image (image "
                        f"extensions: {', '.join(sorted(extensions)[:12])}, ...)")
    missing = [s for s in SPLITS if s not in tables]
    if missing:
        tables.update(stratified_split(tables["train"], missing, {"val": val_fraction,
                                                                  "test": test_fraction}, seed))
    return UserTables(tables, classes, context_names, tuple(missing), skipped)


def stratified_split(table: pd.DataFrame, splits: list[str], fractions: dict[str, float],
                     seed: int) -> dict[str, pd.DataFrame]:
    """Cut ``splits`` (of val, test) out of ``table`` (which becomes ``train``), per class (per
    group where there are groups): ``round(n * fraction)`` rows each, chosen by ``seed``, and
    at least one row left for training. The same table and seed give the same cut."""
    rng = np.random.default_rng(seed)
    key = np.where(table["group"].to_numpy() >= 0, table["group"].to_numpy(),
                   table["label"].to_numpy())
    picked = {name: [] for name in splits}
    for stratum in np.unique(key):
        rows = np.flatnonzero(key == stratum)
        rows = rows[rng.permutation(len(rows))]
        start = 0
        for name in splits:
            take = min(int(round(len(rows) * fractions[name])), len(rows) - 1 - start)
            picked[name].extend(rows[start:start + max(take, 0)].tolist())
            start += max(take, 0)
    held = {name: table.iloc[sorted(index)].reset_index(drop=True)
            for name, index in picked.items()}
    taken = np.zeros(len(table), bool)
    for index in picked.values():
        taken[index] = True
    return {"train": table[~taken].reset_index(drop=True), **held}


# -- manifests -----------------------------------------------------------------------------

MANIFEST_COLUMNS = ("path", "label")


def _read_table(path: Path) -> tuple[pd.DataFrame, str, int]:
    """The manifest as strings, how its rows are named in errors, and the first row's number."""
    if not path.is_file():
        raise DataError(f"dataset.manifest: {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True,
                                encoding="utf-8-sig")
            return frame, "line", 2
        if suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
            return frame.astype({c: str for c in frame.columns}), "row", 1
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise DataError(f"{path}: cannot be read as {suffix[1:]}: {err}") from None
    raise DataError(f"dataset.manifest: {path} is neither .csv nor .parquet")


def read_manifest(path: Path, root: Path, num_classes: int | None,
                  class_names: list[str] | None, contexts: bool,
                  context_names: list[str] | None, val_fraction: float, test_fraction: float,
                  seed: int) -> UserTables:
    """A table of ``path``, ``label`` and optionally ``context`` (or ``group``) and ``split``.

    Labels are integers in ``[0, num_classes)`` or class names (those of ``class_names`` when
    given, else every name in the table, sorted). Contexts are names (of ``context_names``
    when given, else every name, sorted) or integer indices into ``context_names``. Without a
    split column the rows are split per class by ``stratified_split``.
    """
    frame, unit, first = _read_table(path)
    header = [str(c).strip() for c in frame.columns]
    frame.columns = header
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}: no column {', '.join(missing)}; a manifest has the columns "
                        f"path, label and optionally context (or group) and split (found "
                        f"{', '.join(header)})")
    context_column = [c for c in ("context", "group") if c in header]
    if len(context_column) > 1:
        raise DataError(f"{path}: has both a context and a group column; keep one")
    if context_column and not contexts:
        raise DataError(f"{path}: has a {context_column[0]} column, but dataset.contexts is "
                        f"false; set it true to use the class x context groups")
    if contexts and not context_column:
        raise DataError(f"dataset.contexts: true, but {path} has no context (or group) column")
    if frame.empty:
        raise DataError(f"{path}: has no rows")
    where = [f"{path}:{i + first}" if unit == "line" else f"{path} row {i + first}"
             for i in range(len(frame))]

    labels, class_names = _codes(frame["label"].str.strip().to_numpy(), class_names,
                                 num_classes, where, "label", "class")
    groups = np.full(len(frame), -1, np.int64)
    context_names = list(context_names or [])
    if contexts:
        codes, context_names = _codes(frame[context_column[0]].str.strip().to_numpy(),
                                      context_names or None, None, where,
                                      context_column[0], "context")
        groups = labels * len(context_names) + codes
    paths = _Paths(root)
    checked = [paths.check(p, source, p)
               for p, source in zip(frame["path"].str.strip().to_numpy(), where, strict=True)]
    table = pd.DataFrame({"path": checked, "label": labels, "group": groups, "source": where})
    if "split" not in header:
        tables = stratified_split(table, ["val", "test"], {"val": val_fraction,
                                                          "test": test_fraction}, seed)
        return UserTables(tables, class_names, context_names, ("val", "test"))
    splits = frame["split"].str.strip().str.lower().map(SPLIT_CODES)
    bad = np.flatnonzero(splits.isna().to_numpy())
    if len(bad):
        i = bad[0]
        raise DataError(f"{where[i]}: split {frame['split'].iloc[i]!r} is not one of train, val, "
                        f"test (or 0, 1, 2)")
    tables = {s: table[(splits == s).to_numpy()].reset_index(drop=True) for s in SPLITS}
    for s, part in tables.items():
        if part.empty:
            raise DataError(f"{path}: no rows with split {s}")
    return UserTables(tables, class_names, context_names)


def _codes(values: np.ndarray, names: list[str] | None, count: int | None,
           where: list[str], column: str, what: str) -> tuple[np.ndarray, list[str]]:
    """Integer codes of a label or context column and the names they index.

    All-integer values are indices (checked against ``count`` or ``names``); otherwise every
    value is a name, looked up in ``names`` or, without them, in the sorted names found."""
    empty = np.flatnonzero(values == "")
    if len(empty):
        raise DataError(f"{where[empty[0]]}: the {column} is empty")
    numeric = pd.to_numeric(pd.Series(values), errors="coerce")
    integral = numeric.notna().all() and (numeric == numeric.round()).all()
    if integral:
        codes = numeric.to_numpy().astype(np.int64)
        limit = count if count is not None else (len(names) if names else None)
        if limit is None:
            if what == "class":
                raise DataError(f"{where[0]}: integer labels need dataset.num_classes (or "
                                f"dataset.class_names_file)")
            raise DataError(f"{where[0]}: integer contexts need dataset.context_names")
        bad = np.flatnonzero((codes < 0) | (codes >= limit))
        if len(bad):
            raise DataError(f"{where[bad[0]]}: {column} {codes[bad[0]]} is outside [0, {limit})")
        return codes, list(names) if names else [f"{what} {i}" for i in range(limit)]
    known = list(names) if names else sorted(set(values.tolist()))
    if count is not None and len(known) != count:
        raise DataError(f"{where[0]}: the {column} column names {len(known)} classes, but "
                        f"dataset.num_classes is {count}")
    index = {name: i for i, name in enumerate(known)}
    codes = np.fromiter((index.get(v, -1) for v in values), np.int64, len(values))
    bad = np.flatnonzero(codes < 0)
    if len(bad):
        raise DataError(f"{where[bad[0]]}: {column} {values[bad[0]]!r} is not a {what} name "
                        f"({', '.join(known[:10])}{', ...' if len(known) > 10 else ''})")
    return codes, known
