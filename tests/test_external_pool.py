"""The generator's external pool (``generator.train_on: external``): the digits' pools hold
only digits no split holds, every class (every class x colour group, the empty ones
included); a file pool is read as a folder or a manifest and refused when it names another
class or shares a file with the data set; the report says what the generator learnt from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from ray_lt.config import load_config
from ray_lt.data import load_dataset
from ray_lt.data.external import attach_external, pool_summary
from ray_lt.data.shapes import write_shapes
from ray_lt.errors import ConfigError, DataError
from ray_lt.report import generator_source

CONTEXTS = ["sand", "sky", "grass"]


def pooled(config: str, *overrides: str):
    cfg = load_config(ROOT / "configs" / config, list(overrides))
    data = load_dataset(cfg.dataset, cfg.seed)
    attach_external(cfg, data)
    return cfg, data


def digit_index(paths: pd.Series) -> set[int]:
    return {int(p.split("/")[1]) for p in paths}


def test_the_digits_pool_is_balanced_and_shares_no_digit_with_a_split():
    cfg, data = pooled("digits_external.yaml")
    pool = data.external
    assert data.class_counts.tolist() == [60, 38, 25, 16, 10, 6, 4, 2, 1, 1]
    assert np.bincount(pool["label"], minlength=10).tolist() == [40] * 10
    assert pool["image"].iloc[0].shape == (16, 16, 1) and (pool["group"] == -1).all()
    used = set().union(*(digit_index(t["path"]) for t in data.tables.values()))
    assert len(used) == 10 * (20 + 50) + data.class_counts.sum()
    assert not digit_index(pool["path"]) & used
    # The same seed gives the same pool (a rerun trains on the same images); another seed
    # another one, its splits shuffled with it.
    assert pooled("digits_external.yaml")[1].external["path"].tolist() == pool["path"].tolist()
    other = pooled("digits_external.yaml", "seed=1")[1].external
    assert other["path"].tolist() != pool["path"].tolist()
    summary = pool_summary(cfg, data)
    assert summary.images == 400 and summary.per_group is None
    assert summary.pool == "40 digits per class that no split holds"


def test_the_groups_pool_holds_every_group_the_empty_ones_too():
    cfg, data = pooled("digits_groups_external.yaml")
    per_group = np.bincount(data.external["group"], minlength=40)
    assert per_group.tolist() == [40] * 40
    empty = np.flatnonzero(data.group_counts == 0)
    assert len(empty) == 10 and (per_group[empty] == 40).all()
    assert (data.external["group"] // 4 == data.external["label"]).all()
    used = set().union(*(digit_index(t["path"]) for t in data.tables.values()))
    assert not digit_index(data.external["path"]) & used
    # The background is the group's colour: mean red of the red-context pool images is high.
    red = data.external[data.external["group"] % 4 == 0]["image"]
    assert np.stack(red.to_numpy())[:, 0, 0, 0].mean() > 200
    assert pool_summary(cfg, data).per_group == [40] * 40


def test_the_long_tail_setting_reads_no_pool():
    _, data = pooled("digits_lt.yaml")
    assert data.external is None
    _, data = pooled("digits_external.yaml", "generator.train_on=long_tail")
    assert data.external is None


@pytest.mark.parametrize("overrides, message", [
    (["generator.external_per_class=50"],
     "generator.external_per_class: 50, but dataset.max_per_class + val_per_class + "
     "test_per_class = 130 leave 44"),
    (["generator.external=/tmp/pool"], "generator.external: dataset.kind 'digits_lt' builds "
                                       "its pool from the digits its splits leave over"),
    (["generator.train_on=long_tail", "generator.external=/tmp/pool"],
     "a pool is named, but generator.train_on is 'long_tail'"),
])
def test_bad_pool_settings_name_their_keys(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("+", r"\+").replace("*", r"\*")):
        load_config(ROOT / "configs" / "digits_external.yaml", overrides)


def test_the_groups_pool_size_is_checked_against_the_groups_splits():
    with pytest.raises(ConfigError, match=r"dataset.train_per_class \+ \(val_per_group \+ "
                                          r"test_per_group\) \* contexts = 120 leave 54"):
        load_config(ROOT / "configs" / "digits_groups_external.yaml",
                    ["generator.external_per_class=60"])


def test_a_file_data_set_needs_its_pool_named(tmp_path):
    with pytest.raises(ConfigError, match="generator.external: generator.train_on: external on "
                                          "dataset.kind 'folder' needs the pool's folder"):
        load_config(ROOT / "configs" / "custom_lt.yaml",
                    [f"dataset.root={tmp_path}", "generator.train_on=external"])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, Path]:
    """A folder data set of shapes with contexts, and a pool of other shape files spread over
    every class x context (written as a split of another root, read as <class>/<context>)."""
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, {"train": [6, 4, 2, 1], "val": [2] * 4, "test": [2] * 4},
                 contexts=CONTEXTS, size=12)
    pool = tmp_path_factory.mktemp("pool")
    write_shapes(pool, {"pool": [6] * 4}, contexts=CONTEXTS, size=12, seed=5)
    return root, pool / "pool"


def folder(root: Path, *extra: str):
    return pooled("custom_lt.yaml", f"dataset.root={root}", "dataset.contexts=true",
                  "generator.train_on=external", *extra)


def test_a_pool_folder_with_contexts_is_read_under_its_own_root(shapes):
    root, pool = shapes
    cfg, data = folder(root, f"generator.external={pool}")
    assert data.external_root == pool and len(data.external) == 24
    assert (data.external["group"] // 3 == data.external["label"]).all()
    assert set(data.external["group"]) == set(range(12))
    assert all((pool / p).is_file() for p in data.external["path"])
    summary = pool_summary(cfg, data)
    assert summary.per_class == [6] * 4 and summary.pool == str(pool)


def test_a_pool_manifest_beside_its_images(shapes, tmp_path):
    root, pool = shapes
    rows = [{"path": str(p.relative_to(pool)), "label": p.parts[-3], "context": p.parts[-2]}
            for p in sorted(pool.rglob("*.*"))]
    manifest = pool / "pool.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    _, data = folder(root, f"generator.external={manifest}")
    assert data.external_root == pool and len(data.external) == 24
    assert data.external["source"].iloc[0] == f"{manifest}:2"
    frame = pd.DataFrame(rows)
    frame.loc[3, "label"] = "hexagon"
    bad = tmp_path / "bad.csv"
    frame.to_csv(bad, index=False)
    with pytest.raises(DataError, match=f"{bad}:5: label 'hexagon' is not a class name"):
        folder(root, f"generator.external={bad}")
    manifest.unlink()


def test_a_pool_that_shares_a_file_or_names_another_class_is_refused(shapes, tmp_path):
    root, _ = shapes
    with pytest.raises(DataError, match="is the data set's train image"):
        folder(root, f"generator.external={root / 'train'}")
    odd = tmp_path / "odd"
    (odd / "hexagon" / "sand").mkdir(parents=True)
    with pytest.raises(DataError, match=r"odd/hexagon: 'hexagon' is not a class of the data set"):
        folder(root, f"generator.external={odd}")
    with pytest.raises(DataError, match="is neither a folder nor a manifest file"):
        folder(root, f"generator.external={tmp_path / 'absent'}")


def test_the_report_says_what_the_generator_learnt_from(tmp_path):
    cfg, data = pooled("digits_groups_external.yaml")
    summary = pool_summary(cfg, data)
    (tmp_path / "generator").mkdir()
    record = tmp_path / "generator" / "training.json"
    record.write_text(json.dumps({"steps": 10, "starts": [0],
                                  "trained_on": {"source": "external", **summary.as_dict()}}))
    text = generator_source(tmp_path, data)
    assert text == ("The generator learnt from an external pool of 1600 real images that none "
                    "of the classifier's splits holds (40 digits per class that no split holds): "
                    "160 to 160 per class, 40 of 40 class x context groups, 10 of the 10 empty in "
                    "training among them.")
    record.write_text(json.dumps({"trained_on": {"source": "long_tail", "images": 600}}))
    assert generator_source(tmp_path, data) == ("The generator learnt from the classifier's own "
                                                "long-tailed training split (600 images).")
    record.write_text(json.dumps({"steps": 10}))  # trained before this was recorded
    assert generator_source(tmp_path, data) == ""
