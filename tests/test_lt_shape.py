"""The ImageNet-LT / Places-LT shape bench: class profiles, the written tree, the tiny unCLIP."""

import hashlib

import numpy as np
import pytest
import torch
from conftest import load_bench
from PIL import Image

from ray_lt.data.files import read_class_names, read_split_list
from ray_lt.generate.unclip import load_components
from ray_lt.testing import tiny_unclip_components

lt_shape = load_bench("lt_shape")


def _tree_hash(root) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_imagenet_lt_profile():
    counts = lt_shape.imagenet_lt_counts()
    assert counts.shape == (1000,) and counts.dtype.kind == "i"
    assert counts.max() == counts[0] == 1280 and counts.min() == counts[-1] == 5
    assert counts.sum() == 115_846
    assert np.all(np.diff(counts) <= 0)
    assert lt_shape._bands(counts) == (385, 479, 136)
    assert np.array_equal(counts, lt_shape.imagenet_lt_counts())


def test_places_lt_profile():
    counts = lt_shape.places_lt_counts()
    assert counts.shape == (365,)
    assert counts.max() == counts[0] == 4980 and counts.min() == counts[-1] == 5
    assert counts.sum() == 62_500
    assert np.all(np.diff(counts) <= 0)
    assert sum(lt_shape._bands(counts)) == 365


@pytest.mark.parametrize("n, most, least, total", [(10, 50, 5, 120), (200, 100, 10, 4321),
                                                   (30, 300, 3, 1500)])
def test_any_reachable_total_is_hit(n, most, least, total):
    counts = lt_shape.long_tail_counts(n, most, least, total)
    assert (len(counts), counts[0], counts[-1], counts.sum()) == (n, most, least, total)
    assert np.all(np.diff(counts) <= 0)
    with pytest.raises(ValueError, match="sums to"):
        lt_shape.long_tail_counts(n, most, least, n * most + 1)


def test_rounding_remainder_goes_to_the_largest_residual():
    exact = np.array([10.0, 7.4, 7.4, 5.6, 3.0])
    up = np.array([10, 7, 7, 6, 3])
    lt_shape._fix_remainder(up, exact, 34)
    assert up.tolist() == [10, 8, 7, 6, 3]
    down = np.array([10, 7, 7, 6, 3])
    lt_shape._fix_remainder(down, exact, 32)
    assert down.tolist() == [10, 7, 7, 5, 3]
    with pytest.raises(ValueError, match="cannot place"):
        lt_shape._fix_remainder(np.array([5, 5, 5]), np.full(3, 5.0), 16)


def test_small_write_parses_and_is_deterministic(tmp_path):
    profile = lt_shape.imagenet_lt_counts()
    classes = lt_shape.class_subset(profile, 12)
    assert len(classes) == 12 and classes[0] == 0 and classes[-1] == 999
    root = tmp_path / "a"
    summary = lt_shape.write_lt_shape(root, "imagenet_lt", num_classes=12, workers=2)
    assert summary["files"] == {"train": int(profile[classes].sum()), "val": 24, "test": 48}
    assert summary["bytes_on_disk"] >= summary["bytes_written"] > 0

    tables = {split: read_split_list(root / f"ImageNet_LT_{split}.txt", root, 12)
              for split in ("train", "val", "test")}
    assert np.array_equal(np.bincount(tables["train"]["label"], minlength=12), profile[classes])
    assert np.bincount(tables["val"]["label"], minlength=12).tolist() == [2] * 12
    assert np.bincount(tables["test"]["label"], minlength=12).tolist() == [4] * 12
    first = tables["train"]["path"].iloc[0]
    assert first == "train/n00000000/n00000000_00000.JPEG"
    assert read_class_names(root / "class_names.txt", 12)[-1] == "n00000999"
    for rel in tables["test"]["path"].iloc[::7]:
        with Image.open(root / rel) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (16, 16)

    again = tmp_path / "b"
    lt_shape.write_lt_shape(again, "imagenet_lt", num_classes=12, workers=1)
    assert _tree_hash(again) == _tree_hash(root)
    other = tmp_path / "c"
    lt_shape.main(["imagenet_lt", "--out", str(other), "--classes", "12", "--seed", "1"])
    assert (other / "ImageNet_LT_train.txt").read_text() == (
        root / "ImageNet_LT_train.txt").read_text()
    assert _tree_hash(other) != _tree_hash(root)


def test_places_layout():
    layout = lt_shape.LAYOUTS["places_lt"]
    classes = lt_shape.class_subset(lt_shape.places_lt_counts(), 3)
    plan = lt_shape._plan(layout, classes, np.array([3, 2, 1]), 1, 2)
    assert classes.tolist() == [0, 182, 364]
    assert [rel for rel, *_ in plan["train"]][:2] == ["train/c000/c000_00000.jpg",
                                                      "train/c000/c000_00001.jpg"]
    assert plan["val"][1] == ("train/c182/c182_00002.jpg", 182, 1, 2)
    assert plan["test"][-1] == ("val/c364/Places365_val_00000006.jpg", 364, 2, 6)


def test_images_separate_classes():
    a = [lt_shape.render(0, 3, 0, i, 16).astype(float) for i in range(2)]
    b = lt_shape.render(0, 4, 0, 0, 16).astype(float)
    assert np.abs(a[0] - a[1]).mean() < np.abs(a[0] - b).mean()


def test_tiny_unclip_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = lt_shape.save_tiny_unclip(tmp_path / "unclip")
    loaded = load_components(path)
    reference = tiny_unclip_components()
    assert set(loaded) == set(reference)
    for name in ("unet", "vae", "text_encoder", "image_encoder", "image_normalizer"):
        saved, fresh = loaded[name].state_dict(), reference[name].state_dict()
        assert saved.keys() == fresh.keys()
        assert all(torch.equal(saved[key], fresh[key]) for key in fresh), name
