"""Synthetic-data quality: FID, density and coverage against their definitions."""

import numpy as np
import pytest

from ray_lt.evaluate.quality import (
    density_coverage,
    frechet_distance,
    matched_reference,
    quality_table,
)


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(4000, 3))
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    shifted = real + np.array([1.0, 2.0, 0.0])
    assert frechet_distance(real, shifted) == pytest.approx(5.0, rel=1e-6)


def test_frechet_distance_counts_a_change_of_spread():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(20000, 2))
    wide = real * 2.0  # covariance 4 I: tr(I + 4I - 2*2I) = 2 * (1 + 4 - 4) = 2
    assert frechet_distance(real, wide) == pytest.approx(2.0, rel=0.02)


def test_density_and_coverage_on_a_hand_made_case():
    real = np.array([[0.0], [1.0], [2.0], [10.0]])
    # k = 1: radii are the distance to the nearest other real point: 1, 1, 1, 8.
    fake = np.array([[0.5], [20.0]])
    density, coverage = density_coverage(real, fake, k=1)
    # 0.5 lies within the balls of 0 and 1 (radius 1) only; 20 in none.
    assert density == pytest.approx(2 / (1 * 2))
    assert coverage == pytest.approx(2 / 4)


def test_density_and_coverage_of_the_real_set_itself():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 4))
    fake = rng.normal(size=(300, 4))
    density, coverage = density_coverage(real, fake, k=5)
    assert 0.7 < density < 1.3 and coverage > 0.9
    far_density, far_coverage = density_coverage(real, fake + 10.0, k=5)
    assert far_density == 0.0 and far_coverage == 0.0


def test_density_needs_more_real_samples_than_k():
    with pytest.raises(ValueError, match="more than 5 real samples"):
        density_coverage(np.zeros((5, 2)), np.zeros((3, 2)), k=5)


def test_matched_reference_follows_the_fake_class_mix():
    real_labels = np.repeat(np.arange(3), 10)
    picked = matched_reference(real_labels, np.array([2] * 4 + [1] * 12), seed=0)
    assert np.bincount(real_labels[picked], minlength=3).tolist() == [0, 10, 4]


def test_quality_table_rows_per_criterion():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(200, 3))
    real_labels = np.repeat(np.arange(4), 50)
    fake = np.concatenate([rng.normal(size=(40, 3)), rng.normal(size=(40, 3)) + 5.0])
    fake_labels = np.tile(np.arange(4), 20)
    criteria = np.array(["entropy"] * 40 + ["loss"] * 40)
    table = quality_table(real, real_labels, fake, fake_labels, criteria, k=3)
    assert table["criterion"].tolist() == ["all", "entropy", "loss"]
    assert table["samples"].tolist() == [80, 40, 40]
    by = table.set_index("criterion")
    assert by.loc["entropy", "fid"] < 1.0 < 20.0 < by.loc["loss", "fid"]
    assert by.loc["entropy", "coverage"] > by.loc["loss", "coverage"] == 0.0
