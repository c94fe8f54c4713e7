"""Data sets as Ray Datasets of rows ``{image, label, group, path}`` plus training counts.

``image`` is a uint8 (H, W, C) array, ``group`` the class x context cell (-1 where there is
none). Every index file is parsed and checked on the driver, and with ``verify_images`` every
image decoded once on Ray, before anything trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from ray_lt.config import DatasetConfig, DigitsGroupsData, DigitsLTData, ListFileData, NicoData
from ray_lt.data.digits import DIGIT_NAMES, digits_groups_tables, digits_lt_tables
from ray_lt.data.files import read_class_names, read_nico_metadata, read_split_list
from ray_lt.data.images import DECODE_BLOCK_ROWS, decode_batch, row_blocks, verify_images
from ray_lt.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class LongTailData:
    """The three splits of one data set and what the later stages need to know about them.

    ``train_index`` is the training split's table (label, group and the file ``path`` under
    ``root``, or the ``image`` itself for the embedded data sets), read by stages that pick
    rows by index instead of streaming the split.
    """

    train: ray.data.Dataset
    val: ray.data.Dataset
    test: ray.data.Dataset
    class_counts: np.ndarray
    class_names: list[str]
    image_shape: tuple[int, int, int]
    context_names: list[str] = field(default_factory=list)
    group_counts: np.ndarray | None = None
    train_index: pd.DataFrame | None = None
    root: Path | None = None

    def __post_init__(self) -> None:
        if self.train_index is None:
            raise ValueError("LongTailData needs train_index: the training split's label and "
                             "group per row, with its path (file data sets) or image")

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    @property
    def num_groups(self) -> int:
        """Number of class x context groups, 0 for a data set without groups."""
        return 0 if self.group_counts is None else len(self.group_counts)


def _require_every_class(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    counts = np.bincount(labels, minlength=num_classes)
    missing = np.flatnonzero(counts == 0)
    if len(missing):
        shown = ", ".join(str(c) for c in missing[:20])
        raise DataError(f"{where}: class(es) {shown} have no training image; every class needs "
                        f"at least one (fix the list or num_classes)")
    return counts


def _from_memory(tables: dict[str, pd.DataFrame], seed: int) -> dict[str, ray.data.Dataset]:
    out = {}
    for split, table in tables.items():
        if split == "train":
            table = table.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        blocks = max(1, min(8, len(table) // 512))
        out[split] = ray.data.from_items(table.to_dict("records"), override_num_blocks=blocks)
    return out


def _from_files(tables: dict[str, pd.DataFrame], cfg: ListFileData | NicoData, seed: int
                ) -> dict[str, ray.data.Dataset]:
    if cfg.verify_images:
        verify_images(pd.concat(tables.values(), ignore_index=True), cfg.root)
    out = {}
    for split, table in tables.items():
        if split == "train":
            table = table.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        blocks = row_blocks(table[["path", "label", "group"]], DECODE_BLOCK_ROWS)
        out[split] = ray.data.from_pandas(blocks).map_batches(
            decode_batch, batch_format="pandas", batch_size=DECODE_BLOCK_ROWS,
            fn_kwargs={"root": str(cfg.root), "size": cfg.image_size, "channels": cfg.channels})
    return out


def _index(table: pd.DataFrame, column: str) -> pd.DataFrame:
    return table[["label", "group", column]].reset_index(drop=True)


def digits_tables(cfg: DigitsLTData | DigitsGroupsData, seed: int) -> dict[str, pd.DataFrame]:
    """The in-memory train / val / test tables of an embedded digits data set."""
    if isinstance(cfg, DigitsLTData):
        return digits_lt_tables(seed, cfg.imbalance_factor, cfg.max_per_class,
                                cfg.val_per_class, cfg.test_per_class, cfg.image_size,
                                cfg.channels)
    return digits_groups_tables(seed, cfg.context_names, cfg.train_per_class,
                                cfg.majority_fraction, cfg.empty_groups_per_class,
                                cfg.val_per_group, cfg.test_per_group, cfg.image_size)


def load_dataset(cfg: DatasetConfig, seed: int) -> LongTailData:
    """Build the Ray Datasets of any configured data set; raises DataError on bad input."""
    if isinstance(cfg, DigitsLTData):
        tables = digits_tables(cfg, seed)
        counts = np.bincount(tables["train"]["label"], minlength=10)
        ds = _from_memory(tables, seed)
        return LongTailData(ds["train"], ds["val"], ds["test"], counts, list(DIGIT_NAMES),
                            (cfg.image_size, cfg.image_size, cfg.channels),
                            train_index=_index(tables["train"], "image"))
    if isinstance(cfg, DigitsGroupsData):
        tables = digits_tables(cfg, seed)
        n_groups = 10 * len(cfg.context_names)
        ds = _from_memory(tables, seed)
        return LongTailData(
            ds["train"], ds["val"], ds["test"],
            np.bincount(tables["train"]["label"], minlength=10), list(DIGIT_NAMES),
            (cfg.image_size, cfg.image_size, 3), list(cfg.context_names),
            np.bincount(tables["train"]["group"], minlength=n_groups),
            train_index=_index(tables["train"], "image"))
    if not cfg.root.is_dir():
        raise DataError(f"dataset.root: data folder {cfg.root} does not exist")
    class_names = read_class_names(cfg.class_names_file, cfg.num_classes)
    shape = (cfg.image_size, cfg.image_size, cfg.channels)
    if isinstance(cfg, ListFileData):
        tables = {split: read_split_list(cfg.root / cfg.list_name(split), cfg.root,
                                         cfg.num_classes) for split in SPLITS}
        counts = _require_every_class(tables["train"]["label"].to_numpy(), cfg.num_classes,
                                      str(cfg.root / cfg.list_name("train")))
        ds = _from_files(tables, cfg, seed)
        return LongTailData(ds["train"], ds["val"], ds["test"], counts, class_names, shape,
                            train_index=_index(tables["train"], "path"), root=cfg.root)
    n_ctx = len(cfg.context_names)
    tables = read_nico_metadata(cfg.root / cfg.metadata, cfg.root, cfg.num_classes, n_ctx)
    counts = _require_every_class(tables["train"]["label"].to_numpy(), cfg.num_classes,
                                  f"{cfg.root / cfg.metadata} (split=0)")
    group_counts = np.bincount(tables["train"]["group"], minlength=cfg.num_classes * n_ctx)
    ds = _from_files(tables, cfg, seed)
    return LongTailData(ds["train"], ds["val"], ds["test"], counts, class_names, shape,
                        list(cfg.context_names), group_counts,
                        train_index=_index(tables["train"], "path"), root=cfg.root)
