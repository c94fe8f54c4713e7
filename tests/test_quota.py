"""Quotas, shard plans, filtering and sample grids of the synthesis stage (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ray_lt.generate.filtering import (
    class_distance_quantiles,
    class_means,
    drop_report,
    filter_mask,
)
from ray_lt.generate.grid import save_grid
from ray_lt.generate.quota import (
    PAPER_TARGETS,
    class_quotas,
    group_quotas,
    per_sample_seeds,
    plan_shards,
)


def _imagenet_lt_like_counts() -> np.ndarray:
    """1000 Pareto-ish class counts between 5 and 1280, as in ImageNet-LT."""
    return np.round(1280 * np.arange(1, 1001, dtype=float) ** -0.8).astype(int).clip(5, 1280)


def test_imagenet_lt_quota_tops_every_class_up_to_1300_with_at_least_one():
    counts = _imagenet_lt_like_counts()
    counts[0] = 1300
    quotas = class_quotas(counts, PAPER_TARGETS["imagenet_lt"], minimum=1)
    np.testing.assert_array_equal(quotas, np.maximum(1300 - counts, 1))
    assert quotas.dtype == np.int64 and quotas[0] == 1
    np.testing.assert_array_equal(counts[1:] + quotas[1:], 1300)


def test_quota_target_none_is_largest_class_and_minimum_zero():
    np.testing.assert_array_equal(class_quotas(np.array([10, 4, 0]), None), [0, 6, 10])
    np.testing.assert_array_equal(class_quotas(np.array([10, 4]), 8), [0, 4])


def test_scale_rounds_half_up_and_keeps_minimum():
    counts = np.array([1300 - 25, 1300 - 15, 1300 - 14, 1300 - 4, 1300, 0])
    np.testing.assert_array_equal(class_quotas(counts, 1300, scale=0.1), [3, 2, 1, 0, 0, 130])
    np.testing.assert_array_equal(class_quotas(counts, 1300, scale=0.1, minimum=1),
                                  [3, 2, 1, 1, 1, 130])
    # 45 * 0.7 is 31.499999999999996 in floating point; the quota still rounds half up to 32.
    assert class_quotas(np.array([0]), 45, scale=0.7)[0] == 32


def test_group_quotas_on_a_two_by_three_toy():
    counts = np.array([[5, 1, 0], [3, 3, 2]]).ravel()
    np.testing.assert_array_equal(group_quotas(counts, None), [0, 4, 5, 2, 2, 3])
    np.testing.assert_array_equal(group_quotas(counts, 4, scale=0.5, minimum=1),
                                  [1, 2, 2, 1, 1, 1])


@pytest.mark.parametrize("kwargs, match", [
    ({"class_counts": np.array([3, -1]), "target": 5}, "index 1"),
    ({"class_counts": np.array([[3, 1]]), "target": 5}, "1-D"),
    ({"class_counts": np.array([3.5, 1]), "target": 5}, "whole numbers"),
    ({"class_counts": np.array([3, 1]), "target": 0}, "target"),
    ({"class_counts": np.array([3, 1]), "target": 5, "scale": 0.0}, "scale"),
    ({"class_counts": np.array([3, 1]), "target": 5, "scale": 1.5}, "scale"),
    ({"class_counts": np.array([3, 1]), "target": 5, "minimum": -1}, "minimum"),
])
def test_quota_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        class_quotas(**kwargs)


def test_shards_cover_quotas_exactly_in_bounded_consecutive_pieces():
    quotas = np.array([0, 7, 3, 10, 1])
    shards = plan_shards(quotas, max_shard_size=3, seed=0, by_group=False)
    assert [s["shard_id"] for s in shards] == list(range(len(shards)))
    assert all(1 <= s["n"] <= 3 and s["group"] == -1 for s in shards)
    sums = np.bincount([s["label"] for s in shards], [s["n"] for s in shards], minlength=5)
    np.testing.assert_array_equal(sums, quotas)
    assert [(s["label"], s["n"]) for s in shards[:4]] == [(1, 3), (1, 3), (1, 1), (2, 3)]
    seeds = [s["seed"] for s in shards]
    assert len(set(seeds)) == len(seeds)
    assert all(isinstance(x, int) and 0 <= x < 2**63 for x in seeds)
    torch.Generator().manual_seed(max(seeds))


def test_shards_are_deterministic_and_follow_the_seed():
    quotas = class_quotas(_imagenet_lt_like_counts()[:50], 1300, minimum=1)
    first = plan_shards(quotas, 64, seed=7, by_group=False)
    assert first == plan_shards(quotas, 64, seed=7, by_group=False)
    other = plan_shards(quotas, 64, seed=8, by_group=False)
    assert [s["n"] for s in other] == [s["n"] for s in first]
    assert not {s["seed"] for s in first} & {s["seed"] for s in other}
    # The i-th shard of a class keeps its seed when only the shard size changes.
    resized = plan_shards(quotas, 100, seed=7, by_group=False)
    first_of_class = {s["label"]: s["seed"] for s in reversed(first)}
    assert first_of_class == {s["label"]: s["seed"] for s in reversed(resized)}


def test_group_shards_carry_label_and_group():
    quotas = group_quotas(np.array([5, 1, 0, 3, 3, 2]), 4)
    shards = plan_shards(quotas, 2, seed=1, by_group=True, num_contexts=3)
    assert [(s["label"], s["group"], s["n"]) for s in shards] == [
        (0, 1, 2), (0, 1, 1), (0, 2, 2), (0, 2, 2), (1, 3, 1), (1, 4, 1), (1, 5, 2)]
    class_seeds = {s["seed"] for s in plan_shards(quotas, 2, seed=1, by_group=False)}
    assert not class_seeds & {s["seed"] for s in shards}


@pytest.mark.parametrize("kwargs, match", [
    ({"max_shard_size": 0}, "max_shard_size"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"by_group": True}, "num_contexts"),
    ({"by_group": True, "num_contexts": 4}, "multiple"),
])
def test_plan_shards_rejects_bad_input(kwargs, match):
    args = {"quotas": np.array([1, 2, 3]), "max_shard_size": 2, "seed": 0, "by_group": False}
    with pytest.raises(ValueError, match=match):
        plan_shards(**{**args, **kwargs})


def test_per_sample_seeds_are_deterministic_distinct_and_torch_usable():
    seeds = per_sample_seeds(123, 1000)
    assert seeds == per_sample_seeds(123, 1000)
    assert seeds[:10] == per_sample_seeds(123, 10)
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert not set(seeds) & set(per_sample_seeds(124, 1000))
    assert per_sample_seeds(5, 0) == []
    torch.Generator().manual_seed(max(seeds))
    with pytest.raises(ValueError, match="n must"):
        per_sample_seeds(1, -1)


def test_filter_mask_drops_confidently_wrong_and_far_rows():
    labels = np.array([0, 0, 1, 1, 1])
    pred = np.array([0, 1, 0, 1, 1])
    confidence = np.array([0.99, 0.95, 0.40, 0.80, 0.70])
    features = np.array([[0.1, 0.0], [0.0, 0.0], [10.0, 10.0], [10.0, 10.5], [30.0, 10.0]])
    means = np.array([[0.0, 0.0], [10.0, 10.0]])
    radius = np.array([1.0, 2.0])
    keep, reason = filter_mask(pred, confidence, labels, features, means, radius, 0.9)
    np.testing.assert_array_equal(keep, [True, False, True, True, False])
    assert reason.tolist() == ["", "confidently_other_class", "", "", "far_from_class"]
    _, both = filter_mask(np.array([1]), np.array([0.99]), np.array([0]), np.array([[50.0, 0]]),
                          means, radius, 0.9)
    assert both.tolist() == ["confidently_other_class"]
    keep, reason = filter_mask(pred, confidence, labels, None, None, None, 0.9)
    np.testing.assert_array_equal(keep, [True, False, True, True, True])
    keep, _ = filter_mask(pred, confidence, labels, None, None, None, 0.3)
    np.testing.assert_array_equal(keep, [True, False, False, True, True])


def test_filter_mask_rejects_inconsistent_input():
    with pytest.raises(ValueError, match="same length"):
        filter_mask(np.array([0, 1]), np.array([0.5]), np.array([0, 1]), None, None, None, 0.9)
    with pytest.raises(ValueError, match="class_means"):
        filter_mask(np.array([0]), np.array([0.5]), np.array([0]), np.zeros((1, 2)), None, None,
                    0.9)
    with pytest.raises(ValueError, match="confidence_threshold"):
        filter_mask(np.array([0]), np.array([0.5]), np.array([0]), None, None, None, 0.0)


def test_distance_quantiles_per_class_and_pooled_fallback():
    features = np.array([[0.0], [2.0], [4.0], [6.0], [100.0], [104.0]])
    labels = np.array([0, 0, 0, 0, 1, 1])
    np.testing.assert_allclose(class_means(features, labels, 3)[:2], [[3.0], [102.0]])
    assert np.isnan(class_means(features, labels, 3)[2]).all()
    quantiles = class_distance_quantiles(features, labels, 3, q=1.0, min_samples=3)
    # class 0 distances 3, 1, 1, 3; class 1 (2 samples) and class 2 (none) use the pooled max.
    np.testing.assert_allclose(quantiles, [3.0, 3.0, 3.0])
    np.testing.assert_allclose(class_distance_quantiles(features, labels, 3, q=0.5)[0], 2.0)


def test_drop_report_counts_add_up():
    labels = np.array([0, 0, 1, 1, 1, 2])
    keep, reason = filter_mask(np.array([0, 1, 1, 0, 1, 2]), np.array([0.9, 0.9, 0.5, 0.99, 0.2,
                                                                        0.5]),
                               labels, np.array([[0.0], [0.0], [1.0], [1.0], [9.0], [2.0]]),
                               np.array([[0.0], [1.0], [2.0]]), np.array([1.0, 1.0, 1.0]), 0.8)
    report = drop_report(labels, keep, reason, num_classes=4)
    assert report.columns.tolist() == ["label", "generated", "kept", "dropped",
                                       "confidently_other_class", "far_from_class"]
    assert report["label"].tolist() == [0, 1, 2, 3]
    assert report["generated"].tolist() == [2, 3, 1, 0]
    assert report["kept"].tolist() == [1, 1, 1, 0]
    assert report["confidently_other_class"].tolist() == [1, 1, 0, 0]
    assert report["far_from_class"].tolist() == [0, 1, 0, 0]
    assert (report["kept"] + report["dropped"] == report["generated"]).all()
    assert (report["dropped"] == report["confidently_other_class"]
            + report["far_from_class"]).all()
    with pytest.raises(ValueError, match="disagree"):
        drop_report(labels, ~keep, reason, num_classes=4)


def test_save_grid_writes_png_that_widens_with_columns(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (2, 3, 8, 8, 1), dtype=np.uint8)
    colour = rng.integers(0, 256, (2, 5, 8, 8, 3), dtype=np.uint8)
    rows = ["classifier", "entropy"]
    small = save_grid(grey, rows, ["0", "0.03", "0.1"], tmp_path / "a" / "small.png", "digits")
    large = save_grid(colour, rows, ["0", "0.01", "0.03", "0.1", "0.3"], tmp_path / "large.png")
    with Image.open(small) as a, Image.open(large) as b:
        assert a.format == b.format == "PNG"
        assert b.size[0] > a.size[0]
    with pytest.raises(ValueError, match="col_labels"):
        save_grid(grey, rows, ["0", "0.1"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="row_labels"):
        save_grid(grey, rows[:1], ["0", "0.03", "0.1"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="uint8"):
        save_grid(grey.astype(float), rows, ["0", "0.03", "0.1"], tmp_path / "bad.png")


def test_count_scales_move_guidance_to_rare_classes_and_keep_the_mean():
    from ray_lt.generate.plan import count_scales

    counts, quotas = np.array([100, 20, 4, 0]), np.array([0, 80, 96, 100])
    assert count_scales(counts, quotas, 0.03, 0.0) == [0.03] * 4
    scales = np.array(count_scales(counts, quotas, 0.03, 1.0))
    assert (np.diff(scales) > 0).all()  # fewer training images, stronger guidance
    assert (scales * quotas).sum() / quotas.sum() == pytest.approx(0.03)
    # (n + 1)^-1 weights: the empty group 0's scale is 5 times that of the class with 4.
    assert scales[3] / scales[2] == pytest.approx(5.0)


def test_the_plan_carries_a_scale_per_class_only_when_asked():
    from types import SimpleNamespace

    from ray_lt.config import load_config
    from ray_lt.generate.plan import plan

    data = SimpleNamespace(class_counts=np.array([100, 64, 41, 27, 17, 11, 7, 4, 3, 2]),
                           group_counts=None, context_names=[])
    config = "configs/digits_lt.yaml"
    plain = plan(load_config(config), data)
    assert all("scale" not in shard for shard in plain)  # stored plans stay as they were
    shards = plan(load_config(config, ["synthesis.scale_by=count",
                                       "synthesis.scale_slope=0.5"]), data)
    by_label = {}
    for shard in shards:
        by_label.setdefault(shard["label"], set()).add(shard["scale"])
    assert all(len(v) == 1 for v in by_label.values())
    scale = {label: v.pop() for label, v in by_label.items()}
    assert scale[9] > scale[5] > scale[1] and 0 not in scale  # class 0 has no quota
    drawn = sum(shard["scale"] * shard["n"] for shard in shards)
    assert drawn / sum(shard["n"] for shard in shards) == pytest.approx(0.03, rel=1e-6)


def test_error_scales_guide_hardest_where_the_guide_is_wrong():
    from types import SimpleNamespace

    from ray_lt.config import load_config
    from ray_lt.generate.plan import error_scales, plan

    quotas = np.array([10, 10, 10])
    scales = np.array(error_scales(np.array([0.0, 0.2, 0.6]), quotas, 0.03, 1.0))
    assert scales.mean() == pytest.approx(0.03) and (np.diff(scales) > 0).all()
    assert scales[2] / scales[1] == pytest.approx(0.61 / 0.21)
    data = SimpleNamespace(class_counts=np.array([100, 64, 41, 27, 17, 11, 7, 4, 3, 2]),
                           group_counts=None, context_names=[])
    cfg = load_config("configs/digits_lt.yaml", ["synthesis.scale_by=val_error"])
    assert all("scale" not in s for s in plan(cfg, data))  # no errors yet: no scales
    errors = np.linspace(0.0, 0.9, 10)
    shards = plan(cfg, data, errors)
    first = {s["label"]: s["scale"] for s in shards}
    assert first[9] > first[1]


def test_round_shares_sum_to_each_quota_and_the_plan_numbers_its_rounds():
    from types import SimpleNamespace

    from ray_lt.config import load_config
    from ray_lt.generate.plan import plan, round_of
    from ray_lt.generate.quota import round_shares

    shares = round_shares(np.array([0, 1, 5, 9]), 3)
    assert [s.tolist() for s in shares] == [[0, 1, 2, 3], [0, 0, 2, 3], [0, 0, 1, 3]]
    with pytest.raises(ValueError, match="count must be an integer >= 1"):
        round_shares(np.array([3]), 0)
    data = SimpleNamespace(class_counts=np.array([100, 64, 41, 27, 17, 11, 7, 4, 3, 2]),
                           group_counts=None, context_names=[])
    one = plan(load_config("configs/digits_lt.yaml"), data)
    three = plan(load_config("configs/digits_lt.yaml", ["rounds.count=3"]), data)
    assert all("round" not in s for s in one)  # one-shot plans stay as they were
    assert [s["shard_id"] for s in three] == list(range(len(three)))
    for label in range(10):
        assert sum(s["n"] for s in three if s["label"] == label) == \
            sum(s["n"] for s in one if s["label"] == label)
    by_round = [round_of(three, r) for r in (1, 2, 3)]
    assert sum(map(len, by_round)) == len(three) and round_of(three, None) == three
    assert all(s["round"] == r for r, part in enumerate(by_round, 1) for s in part)
    seeds = [s["seed"] for s in three]
    assert len(set(seeds)) == len(seeds)
    # round 1 keeps one-shot's seeds for the same (class, shard index)
    assert {s["seed"] for s in by_round[0]} <= {s["seed"] for s in one}
    assert not {s["seed"] for s in by_round[1] + by_round[2]} & {s["seed"] for s in one}
