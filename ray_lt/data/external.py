"""The generator's external pool (``generator.train_on: external``): real images of the data
set's classes (and contexts) that none of the classifier's splits holds, for the generator to
learn the classes from, as a pretrained model has learnt them from the web.

The digits build it from the digits their splits leave over (``digits_lt_pool``,
``digits_groups_pool``); the file data sets read ``generator.external``, a folder
``<class>/[<context>/]<image>`` or a manifest, checked like the data set's own index and
refused when it shares a file with the data set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ray_lt.config import Config, DigitsGroupsData, DigitsLTData
from ray_lt.data.files import COLUMNS
from ray_lt.data.folders import (
    _codes,
    _files_under,
    _Paths,
    _read_table,
    _subfolders,
    image_extensions,
)
from ray_lt.errors import DataError


@dataclass
class PoolSummary:
    """What the report and ``generator/training.json`` say about the pool."""

    images: int
    per_class: list[int]
    per_group: list[int] | None
    pool: str
    """Where it comes from, in words: the folder or manifest, or the digits left over."""

    def as_dict(self) -> dict:
        return {"images": self.images, "per_class": self.per_class,
                "per_group": self.per_group, "pool": self.pool}


def uses_external(cfg: Config) -> bool:
    return getattr(cfg.generator, "train_on", "long_tail") == "external"


def attach_external(cfg: Config, data) -> None:
    """Read and check the pool of ``cfg`` (when ``generator.train_on: external``) into
    ``data.external`` / ``data.external_root``; before Ray starts."""
    if not uses_external(cfg):
        return
    d, g = cfg.dataset, cfg.generator
    if isinstance(d, DigitsLTData):
        from ray_lt.data.digits import digits_lt_pool

        data.external = digits_lt_pool(cfg.seed, g.external_per_class, d.image_size, d.channels)
        return
    if isinstance(d, DigitsGroupsData):
        from ray_lt.data.digits import digits_groups_pool

        data.external = digits_groups_pool(cfg.seed, d.context_names, g.external_per_class,
                                           d.image_size)
        return
    data.external, data.external_root = read_pool(Path(g.external), data.class_names,
                                                  data.context_names)
    check_disjoint(data.external, data.external_root, data)


def read_pool(path: Path, class_names: list[str], context_names: list[str]
              ) -> tuple[pd.DataFrame, Path]:
    """The pool's rows (``path`` relative to the returned root, label, group, source) from a
    folder ``<class>/[<context>/]...`` or a manifest (.csv / .parquet) beside its images."""
    if path.is_dir():
        return _read_pool_folder(path, class_names, context_names), path
    if not path.is_file():
        raise DataError(f"generator.external: {path} is neither a folder nor a manifest file")
    return _read_pool_manifest(path, class_names, context_names), path.parent


def _read_pool_folder(root: Path, class_names: list[str], context_names: list[str]
                      ) -> pd.DataFrame:
    extensions = image_extensions()
    paths = _Paths(root)
    rows = []
    folders = _subfolders(root)
    if not folders:
        raise DataError(f"generator.external: {root} has no class folders; the pool is "
                        f"{root}/<class>/<image>")
    for name in folders:
        if name not in class_names:
            raise DataError(f"generator.external: {root / name}: {name!r} is not a class of the "
                            f"data set ({', '.join(class_names[:10])}"
                            f"{', ...' if len(class_names) > 10 else ''})")
        label = class_names.index(name)
        if context_names:
            for context in _subfolders(root / name):
                if context not in context_names:
                    raise DataError(f"generator.external: {root / name / context}: {context!r} "
                                    f"is not a context of the data set "
                                    f"({', '.join(context_names)})")
                group = label * len(context_names) + context_names.index(context)
                files, _ = _files_under(root / name / context, extensions)
                rows += [(f, label, group) for f in files]
        else:
            files, _ = _files_under(root / name, extensions)
            rows += [(f, label, -1) for f in files]
    if not rows:
        raise DataError(f"generator.external: {root} holds no image")
    records = [(paths.check(f, f, f), label, group, f) for f, label, group in rows]
    return pd.DataFrame(records, columns=COLUMNS)


def _read_pool_manifest(path: Path, class_names: list[str], context_names: list[str]
                        ) -> pd.DataFrame:
    frame, unit, first = _read_table(path)
    frame.columns = [str(c).strip() for c in frame.columns]
    need = ["path", "label"] + (["context"] if context_names else [])
    missing = [c for c in need if c not in frame.columns]
    if missing:
        raise DataError(f"generator.external: {path} has no column {', '.join(missing)} (found "
                        f"{', '.join(frame.columns)})")
    if frame.empty:
        raise DataError(f"generator.external: {path} has no rows")
    where = [f"{path}:{i + first}" if unit == "line" else f"{path} row {i + first}"
             for i in range(len(frame))]
    labels, _ = _codes(frame["label"].str.strip().to_numpy(), class_names, None, where,
                       "label", "class")
    groups = np.full(len(frame), -1, np.int64)
    if context_names:
        codes, _ = _codes(frame["context"].str.strip().to_numpy(), context_names, None, where,
                          "context", "context")
        groups = labels * len(context_names) + codes
    paths = _Paths(path.parent)
    checked = [paths.check(p, source, p)
               for p, source in zip(frame["path"].str.strip().to_numpy(), where, strict=True)]
    return pd.DataFrame({"path": checked, "label": labels, "group": groups, "source": where})


def check_disjoint(pool: pd.DataFrame, pool_root: Path, data) -> None:
    """Refuse a pool that shares a file (after resolving links) with any split of ``data``."""
    resolved = os.path.realpath(pool_root)
    own = {os.path.join(resolved, p): s for p, s in zip(pool["path"], pool["source"],
                                                       strict=True)}
    root = os.path.realpath(data.root)
    for split, table in data.tables.items():
        for rel in table["path"]:
            full = os.path.join(root, rel)
            if full in own:
                raise DataError(f"generator.external: {own[full]} is the data set's {split} image "
                                f"{full}; the pool holds images the classifier never sees")


def pool_summary(cfg: Config, data) -> PoolSummary | None:
    """Sizes of ``data``'s pool per class (per group), or None without one."""
    if data.external is None:
        return None
    table = data.external
    per_group = None
    if data.group_counts is not None:
        per_group = np.bincount(table["group"], minlength=data.num_groups).tolist()
    source = (f"{cfg.generator.external_per_class} digits per class that no split holds"
              if cfg.generator.external is None else str(cfg.generator.external))
    return PoolSummary(len(table), np.bincount(table["label"],
                                               minlength=data.num_classes).tolist(),
                       per_group, source)
