"""The guidance sweep's measurements, on real digits standing in for samples: the judge, the
distance to the nearest training image, the table, the grid's columns chosen from it, the
plot and the report's section."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from ray_lt.config import load_config
from ray_lt.data import load_dataset
from ray_lt.data.external import attach_external
from ray_lt.errors import ConfigError
from ray_lt.generate.sweep import (
    Judge,
    class_images,
    grid_columns,
    judge_images,
    nearest_distance,
    plot_sweep,
    sweep_table,
)


def data_of(config: str, *overrides: str):
    cfg = load_config(ROOT / "configs" / config, list(overrides))
    data = load_dataset(cfg.dataset, cfg.seed)
    attach_external(cfg, data)
    return cfg, data


def test_the_judge_learns_the_classes_from_validation_and_pool_images():
    _, data = data_of("digits_external.yaml")
    images, labels, groups = judge_images(data)
    assert len(images) == 200 + 400 and (groups == -1).all()
    judge = Judge(images, labels, groups)
    test = data.tables["test"]
    said, group = judge.predict(np.stack(test["image"]), contexts=0)
    assert (said == test["label"].to_numpy()).mean() > 0.9 and (group == -1).all()


def test_the_group_judge_tells_class_and_colour():
    _, data = data_of("digits_groups_external.yaml")
    judge = Judge(*judge_images(data))
    test = data.tables["test"]
    said, group = judge.predict(np.stack(test["image"]), contexts=4)
    assert (said == group // 4).all()
    assert (group == test["group"].to_numpy()).mean() > 0.8


def test_nearest_distance_is_zero_for_a_copy_and_the_rms_otherwise():
    train = np.zeros((2, 4, 4, 1), np.uint8)
    train[1] = 255
    images = np.stack([train[1], np.full((4, 4, 1), 51, np.uint8)])
    assert nearest_distance(images, train) == pytest.approx([0.0, 0.2], abs=1e-6)


def drawn_from(data, label: int, scales: list[float], n: int = 8) -> dict[str, np.ndarray]:
    """Samples standing in for the sweep's: the class's test digits at the first scale, more
    of them replaced by another class's digits at each scale after it."""
    test = data.tables["test"]
    own = np.stack(test[test["label"] == label]["image"])[:n]
    other = np.stack(test[test["label"] == (label + 1) % 10]["image"])[:n]
    cells = [np.concatenate([other[:k], own[k:]]) for k in
             np.linspace(0, n, len(scales)).round().astype(int)]
    images = np.stack([np.stack(cells)] * 2)  # two criteria
    return {"images": images, "criterion": np.ones(images.shape[:3]),
            "guide": np.full(images.shape[:3], label)}


def test_the_table_measures_each_cell_and_the_grid_ends_where_the_judge_falls(tmp_path):
    _, data = data_of("digits_lt.yaml")
    scales = [0.0, 0.01, 0.1, 1.0, 3.0]
    label = 9
    judge = Judge(*judge_images(data))
    train = class_images(data, "train", label)
    assert train.shape == (2, 16, 16, 1)
    table = sweep_table(drawn_from(data, label, scales), ["entropy", "loss"], scales, label,
                        -1, 0, judge, train)
    assert table["criterion"].tolist() == ["entropy"] * 5 + ["loss"] * 5
    assert table["scale"].tolist() == scales * 2 and (table["samples"] == 8).all()
    rates = table["judge_in_class"].to_numpy()[:5]
    assert rates[0] >= 0.875 and rates[-1] == 0.0 and (np.diff(rates) <= 0).all()
    assert (table["guide_in_class"] == 1.0).all() and table["judge_in_group"].isna().all()
    assert (table["nearest_train"] > 0.05).all()  # test digits are not the training ones
    # The first scale where the judge's rate is 0.1 below its first value ends the grid.
    fallen = int(np.flatnonzero(rates <= rates[0] - 0.1)[0])
    assert grid_columns(table, 0.1, 5) == scales[:fallen + 1]
    assert grid_columns(table, 1.0, 5) == scales  # never falls that far: every scale
    assert grid_columns(table, 1.0, 3) == [0.0, 0.1, 3.0]  # at most 3, both ends kept
    path = plot_sweep(table, 0.2, tmp_path / "sweep.png", "nine: what guidance does")
    assert path.stat().st_size > 10000


def test_the_report_shows_the_sweep_beside_the_grid(tmp_path):
    import json

    import pyarrow as pa

    from ray_lt.generate.codec import to_ipc
    from ray_lt.generate.writer import write_shards
    from ray_lt.report import write_report

    cfg, data = data_of("digits_lt.yaml", "report.quality=false")
    out = tmp_path / "synthetic"
    out.mkdir()
    (out / "plan.json").write_text(json.dumps([{"shard_id": 0, "label": 9, "group": -1, "n": 1,
                                                "seed": 5}]))
    table = pa.table({"pixels": pa.array([bytes(256)], type=pa.binary()), "label": [9],
                      "group": [-1], "criterion": ["entropy"], "seed": [1], "shard_id": [0]}
                     ).replace_schema_metadata({"shape": "16,16,1"})
    write_shards(pd.DataFrame([{"shard_id": 0, "payload": to_ipc(table), "seconds": 0.1}]),
                 str(out))
    (tmp_path / "report").mkdir()
    pd.DataFrame([{"criterion": "entropy", "scale": 0.1, "samples": 8, "guide_criterion": 0.5,
                   "guide_criterion_sd": 0.0625, "guide_in_class": 0.25, "judge_in_class": 0.875,
                   "judge_in_group": None,
                   "nearest_train": 0.1234, "in_grid": True, "held_out_nearest_train": 0.2}]
                 ).to_csv(tmp_path / "report" / "guidance_sweep.csv", index=False)
    metrics = {"overall": 0.8, "many": 0.9, "few": 0.4, "per_class": [0.8] * 10,
               "num_rows": 500}
    text = write_report(cfg, tmp_path, data, metrics, metrics).read_text()
    assert "## What guidance does" in text and "(held-out real images of it: 0.200;" in text
    assert "| entropy | 0.100 | 8 | 0.500 | 0.062 | 0.250 | 0.875 | 0.123 |" in text


@pytest.mark.parametrize("overrides, message", [
    (["synthesis.grid_samples=9"], "grid_samples: 9 samples per grid cell, but the sweep "
                                   "draws sweep_samples: 8"),
    (["synthesis.sweep_scales=[0, -1]"], "guidance scales are >= 0"),
])
def test_bad_sweep_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "digits_lt.yaml", overrides)
