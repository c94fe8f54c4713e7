"""Loaders on files written in each real format, every bad-input case, the embedded digits."""

import numpy as np
import pytest
from conftest import imagenet_lt_folder, nico_folder, write_image

from ray_lt.config import DigitsGroupsData, DigitsLTData, ListFileData, NicoData
from ray_lt.data import check_images, load_dataset
from ray_lt.data.digits import digits_groups_tables, digits_lt_tables, long_tail_counts
from ray_lt.data.files import read_nico_metadata, read_split_list
from ray_lt.errors import ConfigError, DataError


def test_imagenet_lt_format_loads(tmp_path, ray_session):
    root = imagenet_lt_folder(tmp_path / "ImageNet_LT")
    data = load_dataset(ListFileData(kind="imagenet_lt", root=root, num_classes=3,
                                     image_size=8), seed=0)
    assert data.class_counts.tolist() == [3, 2, 1]
    assert data.group_counts is None and data.num_groups == 0
    rows = data.train.take_all()
    assert len(rows) == 6
    assert {r["path"] for r in rows} == {f"train/n{c:04d}/img_{i}.JPEG"
                                         for c, n in enumerate([3, 2, 1]) for i in range(n)}
    assert all(r["image"].shape == (8, 8, 3) and r["image"].dtype == np.uint8 for r in rows)
    assert all(r["group"] == -1 for r in rows)
    assert data.test.count() == 6


def test_places_lt_uses_its_own_list_names(tmp_path, ray_session):
    root = imagenet_lt_folder(tmp_path / "places", prefix="Places_LT")
    data = load_dataset(ListFileData(kind="places_lt", root=root, num_classes=3,
                                     image_size=8, verify_images=False), seed=0)
    assert data.class_counts.tolist() == [3, 2, 1]


def test_nico_metadata_groups(tmp_path, ray_session):
    root = nico_folder(tmp_path / "nico")
    cfg = NicoData(kind="nico_pp", root=root, num_classes=2,
                   context_names=["autumn", "dim", "grass"], image_size=8)
    data = load_dataset(cfg, seed=0)
    assert data.num_groups == 6
    assert data.group_counts.tolist() == [2, 2, 2, 2, 2, 0]
    assert data.class_counts.tolist() == [6, 4]
    groups = sorted(r["group"] for r in data.test.take_all())
    assert groups == [0, 1, 2, 3, 4, 5]  # group = y * 3 + a


@pytest.mark.parametrize("line, message", [
    ("train/n0000/img_0.JPEG", "expected 'relative/path label'"),
    ("train/n0000/img_0.JPEG 7", "label 7 is outside [0, 3)"),
    ("train/n0000/img_0.JPEG x", "label 'x' is not an integer"),
    ("train/n0000/missing.JPEG 0", "does not exist"),
    ("../outside.JPEG 0", "resolves outside the data root"),
])
def test_bad_list_lines_name_file_and_line(tmp_path, line, message):
    root = imagenet_lt_folder(tmp_path / "d")
    write_image(tmp_path / "outside.JPEG", 1)
    listing = root / "ImageNet_LT_train.txt"
    lines = listing.read_text().splitlines()
    lines.insert(2, line)
    listing.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_split_list(listing, root, 3)
    assert f"{listing}:3:" in str(err.value)
    assert message in str(err.value)


def test_missing_list_and_root(tmp_path):
    with pytest.raises(DataError, match="split list .*ImageNet_LT_val.txt does not exist"):
        root = imagenet_lt_folder(tmp_path / "d")
        (root / "ImageNet_LT_val.txt").unlink()
        load_dataset(ListFileData(kind="imagenet_lt", root=root, num_classes=3), 0)
    with pytest.raises(DataError, match="dataset.root: data folder .* does not exist"):
        load_dataset(ListFileData(kind="imagenet_lt", root=tmp_path / "nope", num_classes=3), 0)


def test_class_without_training_image_is_an_error(tmp_path):
    root = imagenet_lt_folder(tmp_path / "d", counts=(2, 0, 1))
    with pytest.raises(DataError, match=r"ImageNet_LT_train.txt: class\(es\) 1 have no training"):
        load_dataset(ListFileData(kind="imagenet_lt", root=root, num_classes=3), 0)


def test_corrupt_image_named_with_its_list_line(tmp_path, ray_session):
    root = imagenet_lt_folder(tmp_path / "d")
    bad = root / "train/n0001/img_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    cfg = ListFileData(kind="imagenet_lt", root=root, num_classes=3)
    data = load_dataset(cfg, 0)  # the lists are fine: read before Ray starts
    with pytest.raises(DataError) as err:
        check_images(cfg, data)  # on Ray, before anything trains
    listing = root / "ImageNet_LT_train.txt"
    number = listing.read_text().splitlines().index("train/n0001/img_1.JPEG 1") + 1
    assert f"{listing}:{number}: unreadable image" in str(err.value)


@pytest.mark.parametrize("row, message", [
    ("class0/ctx0/0_0.png,5,0,0", "split 5 is outside [0, 3)"),
    ("class0/ctx0/0_0.png,0,0,3", "context a 3 is outside [0, 3)"),
    ("class0/ctx0/0_0.png,0,9,0", "class y 9 is outside [0, 2)"),
    ("class0/ctx0/0_0.png,0", "expected 4 fields"),
])
def test_bad_nico_rows(tmp_path, row, message):
    root = nico_folder(tmp_path / "nico")
    meta = root / "metadata.csv"
    lines = meta.read_text().splitlines()
    lines.insert(3, row)
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_nico_metadata(meta, root, 2, 3)
    assert f"{meta}:4:" in str(err.value) and message in str(err.value)


def test_nico_bad_header(tmp_path):
    root = nico_folder(tmp_path / "nico")
    meta = root / "metadata.csv"
    meta.write_text("file,s,y,a\n")
    with pytest.raises(DataError, match=r"metadata.csv:1: the header lacks the column\(s\) "
                                        r"filename, split;"):
        read_nico_metadata(meta, root, 2, 3)


def test_digits_lt_profile_and_determinism():
    tables = digits_lt_tables(0, 50, 100, 20, 50, 16, 1)
    counts = np.bincount(tables["train"]["label"], minlength=10)
    assert counts.tolist() == long_tail_counts(100, 50, 10).tolist() == \
        [100, 64, 41, 27, 17, 11, 7, 4, 3, 2]
    assert np.bincount(tables["test"]["label"]).tolist() == [50] * 10
    assert np.bincount(tables["val"]["label"]).tolist() == [20] * 10
    paths = [set(t["path"]) for t in tables.values()]
    assert not (paths[0] & paths[1]) and not (paths[0] & paths[2]) and not (paths[1] & paths[2])
    assert tables["train"]["image"][0].shape == (16, 16, 1)
    again = digits_lt_tables(0, 50, 100, 20, 50, 16, 1)
    assert list(again["train"]["path"]) == list(tables["train"]["path"])
    other = digits_lt_tables(1, 50, 100, 20, 50, 16, 1)
    assert list(other["train"]["path"]) != list(tables["train"]["path"])
    # the test split does not depend on the imbalance factor
    assert list(digits_lt_tables(0, 10, 100, 20, 50, 16, 1)["test"]["path"]) == \
        list(tables["test"]["path"])


def test_digits_groups_imbalance():
    tables = digits_groups_tables(0, ["red", "green", "blue", "yellow"], 100, 0.85, 1, 5, 10, 16)
    train_groups = np.bincount(tables["train"]["group"], minlength=40).reshape(10, 4)
    assert (train_groups.sum(1) == 100).all()
    for c in range(10):
        assert train_groups[c, c % 4] == 85
        assert (train_groups[c] == 0).sum() == 1
    assert np.bincount(tables["test"]["group"], minlength=40).tolist() == [10] * 40
    image = tables["test"]["image"][0]
    assert image.shape == (16, 16, 3)
    corner = image[0, 0].astype(int)  # the background shows the context colour (test row 0: red)
    assert corner[0] > 180 and corner[1] < 80 and corner[2] < 80


def test_bad_context_colour():
    with pytest.raises(ConfigError, match=r"dataset.context_names\[1\]: 'sky-ish'"):
        digits_groups_tables(0, ["red", "sky-ish"], 50, 0.8, 0, 2, 2, 8)


def test_digits_datasets_on_ray(ray_session):
    data = load_dataset(DigitsLTData(kind="digits_lt"), seed=0)
    assert data.train.count() == int(data.class_counts.sum()) == 276
    groups = load_dataset(DigitsGroupsData(kind="digits_groups"), seed=0)
    assert groups.num_groups == 40 and groups.group_counts.sum() == 1000
    row = groups.train.take(1)[0]
    assert set(row) == {"image", "label", "group", "path"}
    assert row["group"] // 4 == row["label"]
