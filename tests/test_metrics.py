import numpy as np
import pytest

from ray_lt.evaluate.metrics import accuracy_by, accuracy_report, class_splits


def test_class_splits_use_strict_thresholds():
    splits = class_splits(np.array([150, 100, 50, 20, 19, 1]), 100, 20)
    assert splits["many"].tolist() == [True, False, False, False, False, False]
    assert splits["medium"].tolist() == [False, True, True, True, False, False]
    assert splits["few"].tolist() == [False, False, False, False, True, True]


def test_accuracy_by_marks_empty_keys():
    assert accuracy_by(np.array([0, 0, 2]), np.array([True, False, True]), 4) == \
        [0.5, None, 1.0, None]


def test_hand_computed_report():
    # 3 classes: class 0 many (200 train), 1 medium (50), 2 few (5); 2 contexts -> 6 groups.
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    preds = np.array([0, 0, 0, 1, 1, 0, 2, 0])
    groups = np.array([0, 0, 1, 1, 2, 3, 4, 5])
    report = accuracy_report(labels, preds, groups, np.array([200, 50, 5]), num_groups=6,
                             many_threshold=100, few_threshold=20)
    assert report["overall"] == pytest.approx(5 / 8)
    assert report["many"] == pytest.approx(3 / 4)
    assert report["medium"] == pytest.approx(1 / 2)
    assert report["few"] == pytest.approx(1 / 2)
    assert report["per_class"] == pytest.approx([0.75, 0.5, 0.5])
    assert report["per_group"] == pytest.approx([1.0, 0.5, 1.0, 0.0, 1.0, 0.0])
    assert report["worst_group"] == 0.0
    assert report["worst_class"] == 0.5
    assert report["balanced"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert report["split_sizes"] == {"many": 1, "medium": 1, "few": 1}


def test_report_without_groups_has_no_worst_group():
    report = accuracy_report(np.array([0, 1]), np.array([0, 0]), np.array([-1, -1]),
                             np.array([10, 10]), 0, 100, 20)
    assert report["worst_group"] is None
    assert report["per_group"] == []
    assert report["few"] == 0.5 and report["many"] is None


def test_unseen_groups_pool_the_rows_of_groups_without_training_images():
    labels = np.array([0, 0, 0, 1, 1, 1])
    preds = np.array([0, 1, 0, 1, 1, 0])
    groups = np.array([0, 1, 1, 2, 3, 3])
    # groups 1 and 3 had no training image: rows 1, 2, 4, 5 with 2 of 4 right
    report = accuracy_report(labels, preds, groups, np.array([30, 30]), 4, 100, 20,
                             group_counts=np.array([30, 0, 30, 0]))
    assert report["unseen_groups"] == pytest.approx(0.5)
    assert report["worst_group"] == pytest.approx(0.5)
    seen = accuracy_report(labels, preds, groups, np.array([30, 30]), 4, 100, 20,
                           group_counts=np.array([30, 1, 30, 2]))
    assert seen["unseen_groups"] is None
    assert accuracy_report(labels, preds, groups, np.array([30, 30]), 4, 100, 20
                           )["unseen_groups"] is None
