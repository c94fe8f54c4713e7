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

from ray_lt.config import (
    DatasetConfig,
    DigitsGroupsData,
    DigitsLTData,
    FolderData,
    ListFileData,
    ManifestData,
)
from ray_lt.data.digits import DIGIT_NAMES, digits_groups_tables, digits_lt_tables
from ray_lt.data.files import read_class_names, read_nico_metadata, read_split_list
from ray_lt.data.folders import UserTables, read_image_folders, read_manifest
from ray_lt.data.images import DECODE_BLOCK_ROWS, decode_batch, row_blocks, verify_images
from ray_lt.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class LongTailData:
    """The three splits of one data set and what the later stages need to know about them.

    ``tables`` holds each split's rows as read on the driver (label, group and the file
    ``path`` under ``root``, or the ``image`` itself for the embedded data sets); ``train``,
    ``val`` and ``test`` are the Ray Datasets made from them on first use, so that the index
    files are read and checked before Ray starts. ``train_index`` is the training split's
    table, read by stages that pick rows by index instead of streaming the split.
    """

    tables: dict[str, pd.DataFrame]
    class_counts: np.ndarray
    class_names: list[str]
    image_shape: tuple[int, int, int]
    context_names: list[str] = field(default_factory=list)
    group_counts: np.ndarray | None = None
    root: Path | None = None
    seed: int = 0
    external: pd.DataFrame | None = None
    """The generator's external pool (``generator.train_on: external``; ``ray_lt.data.external``):
    rows like the splits', paths under ``external_root`` (or images, for the digits)."""
    external_root: Path | None = None
    _datasets: dict[str, ray.data.Dataset] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if set(self.tables) != set(SPLITS):
            raise ValueError(f"LongTailData needs the tables of {SPLITS}, got "
                             f"{sorted(self.tables)}")

    @property
    def train_index(self) -> pd.DataFrame:
        table = self.tables["train"]
        column = "path" if self.root is not None else "image"
        return table[["label", "group", column]].reset_index(drop=True)

    def split(self, name: str) -> ray.data.Dataset:
        """The Ray Dataset of split ``name`` (the training split and the external pool shuffled
        by the seed)."""
        if name not in self._datasets:
            if name == "external":
                if self.external is None:
                    raise ValueError("this data set has no external pool")
                table, root = self.external, self.external_root
            else:
                table, root = self.tables[name], self.root
            if name in ("train", "external"):
                table = table.sample(frac=1.0, random_state=self.seed).reset_index(drop=True)
            self._datasets[name] = (_from_files(table, root, self.image_shape)
                                    if root is not None else _from_memory(table))
        return self._datasets[name]

    @property
    def train(self) -> ray.data.Dataset:
        return self.split("train")

    @property
    def val(self) -> ray.data.Dataset:
        return self.split("val")

    @property
    def test(self) -> ray.data.Dataset:
        return self.split("test")

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


def _from_memory(table: pd.DataFrame) -> ray.data.Dataset:
    blocks = max(1, min(8, len(table) // 512))
    return ray.data.from_items(table.to_dict("records"), override_num_blocks=blocks)


def _from_files(table: pd.DataFrame, root: Path, shape: tuple[int, int, int]
                ) -> ray.data.Dataset:
    size, _, channels = shape
    blocks = row_blocks(table[["path", "label", "group", "source"]], DECODE_BLOCK_ROWS)
    return ray.data.from_pandas(blocks).map_batches(
        decode_batch, batch_format="pandas", batch_size=DECODE_BLOCK_ROWS,
        fn_kwargs={"root": str(root), "size": size, "channels": channels})


def check_images(cfg: DatasetConfig, data: LongTailData) -> None:
    """With ``dataset.verify_images``, decode every listed image once on Ray (the file data
    sets), failing naming each bad file:line: after Ray starts, before anything trains."""
    if data.root is not None and getattr(cfg, "verify_images", False):
        verify_images(pd.concat(data.tables.values(), ignore_index=True), data.root)


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
    """Read and check any configured data set's index (no Ray needed: the Ray Datasets are
    made on first use, ``check_images`` decodes the files); raises DataError on bad input."""
    if isinstance(cfg, DigitsLTData):
        tables = digits_tables(cfg, seed)
        counts = np.bincount(tables["train"]["label"], minlength=10)
        return LongTailData(tables, counts, list(DIGIT_NAMES),
                            (cfg.image_size, cfg.image_size, cfg.channels), seed=seed)
    if isinstance(cfg, DigitsGroupsData):
        tables = digits_tables(cfg, seed)
        n_groups = 10 * len(cfg.context_names)
        return LongTailData(
            tables, np.bincount(tables["train"]["label"], minlength=10), list(DIGIT_NAMES),
            (cfg.image_size, cfg.image_size, 3), list(cfg.context_names),
            np.bincount(tables["train"]["group"], minlength=n_groups), seed=seed)
    if not cfg.root.is_dir():
        raise DataError(f"dataset.root: data folder {cfg.root} does not exist")
    shape = (cfg.image_size, cfg.image_size, cfg.channels)
    if isinstance(cfg, FolderData | ManifestData):
        return _user_data(cfg, seed, shape)
    class_names = read_class_names(cfg.class_names_file, cfg.num_classes)
    if isinstance(cfg, ListFileData):
        tables = {split: read_split_list(cfg.root / cfg.list_name(split), cfg.root,
                                         cfg.num_classes) for split in SPLITS}
        counts = _require_every_class(tables["train"]["label"].to_numpy(), cfg.num_classes,
                                      str(cfg.root / cfg.list_name("train")))
        return LongTailData(tables, counts, class_names, shape, root=cfg.root, seed=seed)
    n_ctx = len(cfg.context_names)
    tables = read_nico_metadata(cfg.root / cfg.metadata, cfg.root, cfg.num_classes, n_ctx)
    counts = _require_every_class(tables["train"]["label"].to_numpy(), cfg.num_classes,
                                  f"{cfg.root / cfg.metadata} (split=0)")
    group_counts = np.bincount(tables["train"]["group"], minlength=cfg.num_classes * n_ctx)
    return LongTailData(tables, counts, class_names, shape, list(cfg.context_names),
                        group_counts, root=cfg.root, seed=seed)


def _user_data(cfg: FolderData | ManifestData, seed: int, shape: tuple[int, int, int]
               ) -> LongTailData:
    """The user's class folders or manifest, read and checked (``ray_lt.data.folders``)."""
    if isinstance(cfg, FolderData):
        read = read_image_folders(cfg.root, cfg.contexts, cfg.val_fraction, cfg.test_fraction,
                                  seed)
        where = str(cfg.root / "train")
    else:
        names = (read_class_names(cfg.class_names_file, cfg.num_classes or
                                  _line_count(cfg.class_names_file))
                 if cfg.class_names_file is not None else None)
        read = read_manifest(cfg.manifest_path(), cfg.root, cfg.num_classes, names,
                             cfg.contexts, cfg.context_names, cfg.val_fraction,
                             cfg.test_fraction, seed)
        where = f"{cfg.manifest_path()} (split train)"
    return user_data(read, seed, shape, cfg.root, where)


def user_data(read: UserTables, seed: int, shape: tuple[int, int, int], root: Path,
              where: str) -> LongTailData:
    """``LongTailData`` of what a folder or manifest reader returned."""
    num_classes = len(read.class_names)
    counts = _require_every_class(read.tables["train"]["label"].to_numpy(), num_classes, where)
    group_counts = None
    if read.context_names:
        group_counts = np.bincount(read.tables["train"]["group"],
                                   minlength=num_classes * len(read.context_names))
    return LongTailData(read.tables, counts, read.class_names, shape, read.context_names,
                        group_counts, root=root, seed=seed)


def _line_count(path: Path) -> int:
    """Class names in a names file, for a manifest that gives no ``num_classes``."""
    if not path.is_file():
        raise DataError(f"class names file {path} does not exist")
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
