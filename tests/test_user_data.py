"""The user's own data: ``dataset.kind: folder`` (a folder per class, optionally a context
level) and ``dataset.kind: manifest`` (a CSV or Parquet table), on a data set of drawn shapes
written here, with every check the list files get, each error naming its folder or row."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ray_lt.config import load_config
from ray_lt.data import load_dataset
from ray_lt.data.folders import image_extensions, read_image_folders, stratified_split
from ray_lt.data.shapes import SHAPES, write_shapes
from ray_lt.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
COUNTS = {"train": [30, 12, 5, 2], "val": [3, 3, 3, 3], "test": [4, 4, 4, 4]}
CONTEXTS = ["sand", "sky", "grass"]


def folder_config(root: Path, *extra: str):
    return load_config(ROOT / "configs" / "custom_lt.yaml",
                       [f"dataset.root={root}", "dataset.image_size=24", *extra])


def manifest_config(root: Path, *extra: str):
    return load_config(ROOT / "configs" / "custom_lt.yaml",
                       ["dataset.kind=manifest", f"dataset.root={root}",
                        "dataset.manifest=manifest.csv", "dataset.image_size=24", *extra])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, COUNTS)
    return root


# -- folders -------------------------------------------------------------------------------

def test_class_folders_are_the_classes_in_sorted_order(shapes):
    data = load_dataset(folder_config(shapes).dataset, seed=0)
    names = sorted(SHAPES[:4])  # circle, square, triangle, diamond -> ImageFolder's order
    assert data.class_names == names
    by_shape = dict(zip(SHAPES[:4], COUNTS["train"], strict=True))
    assert data.class_counts.tolist() == [by_shape[n] for n in names]
    assert {k: len(v) for k, v in data.tables.items()} == {"train": 49, "val": 12, "test": 16}
    assert data.num_groups == 0 and (data.tables["train"]["group"] == -1).all()
    first = data.tables["train"].iloc[0]
    assert first["path"].startswith(f"train/{names[first['label']]}/")
    assert data.image_shape == (24, 24, 3) and data.root == shapes


def test_any_extension_pil_reads_and_other_files_are_left_out(tmp_path):
    root = tmp_path / "data"
    write_shapes(root, {"train": [3, 2]}, formats=("png", "JPEG", "bmp", "webp"))
    (root / "train" / "circle" / "notes.txt").write_text("not an image")
    (root / "train" / "circle" / ".hidden.png").write_bytes(b"x")
    assert {".png", ".jpeg", ".bmp", ".webp", ".tif"} <= image_extensions()
    read = read_image_folders(root, False, 0.1, 0.1, seed=0)
    assert read.skipped == 1 and len(read.tables["train"]) == 5 - 0  # all five images kept
    assert {Path(p).suffix for p in read.tables["train"]["path"]} == {".png", ".JPEG", ".bmp",
                                                                      ".webp"}


def test_a_context_level_gives_class_x_context_groups(tmp_path):
    root = tmp_path / "groups"
    write_shapes(root, COUNTS, contexts=CONTEXTS)
    data = load_dataset(folder_config(root, "dataset.contexts=true").dataset, seed=0)
    assert data.context_names == sorted(CONTEXTS)
    assert data.num_groups == 4 * 3
    train = data.tables["train"]
    for row in train.itertuples():
        cls, ctx = row.path.split("/")[1:3]
        assert row.group == data.class_names.index(cls) * 3 + data.context_names.index(ctx)
    # each class has an empty context in training (the rarest, of 2 images, two), present in
    # validation and test
    empty = (data.group_counts.reshape(4, 3) == 0).sum(axis=1)
    rarest = data.class_names.index(SHAPES[3])
    assert empty.tolist() == [2 if c == rarest else 1 for c in range(4)]
    assert set(data.tables["test"]["group"]) == set(range(12))


def test_missing_splits_are_cut_per_class_by_the_seed(tmp_path):
    root = tmp_path / "only_train"
    write_shapes(root, {"train": [40, 20, 3, 1]})
    cfg = folder_config(root, "dataset.val_fraction=0.1", "dataset.test_fraction=0.2")
    data = load_dataset(cfg.dataset, seed=3)
    sizes = {k: np.bincount(v["label"], minlength=4).tolist() for k, v in data.tables.items()}
    names = data.class_names  # circle, diamond, square, triangle: 40, 1, 20, 3
    assert names == ["circle", "diamond", "square", "triangle"]
    assert sizes["val"] == [4, 0, 2, 0] and sizes["test"] == [8, 0, 4, 1]
    assert sizes["train"] == [28, 1, 14, 2]  # the single diamond stays in training
    again = load_dataset(cfg.dataset, seed=3)
    for split in data.tables:
        pd.testing.assert_frame_equal(data.tables[split], again.tables[split])
    other = load_dataset(cfg.dataset, seed=4)
    assert set(other.tables["val"]["path"]) != set(data.tables["val"]["path"])
    held = set(data.tables["val"]["path"]) | set(data.tables["test"]["path"])
    assert not held & set(data.tables["train"]["path"])


def test_stratified_split_keeps_one_training_row_per_stratum():
    table = pd.DataFrame({"path": [f"{i}" for i in range(6)], "label": [0, 0, 1, 1, 1, 1],
                          "group": -1, "source": ""})
    cut = stratified_split(table, ["val", "test"], {"val": 0.5, "test": 0.5}, seed=0)
    assert np.bincount(cut["train"]["label"]).tolist() == [1, 1]
    assert len(cut["val"]) + len(cut["test"]) == 4


@pytest.mark.parametrize("case", ["no_train", "unknown_val_class", "empty_class", "empty_file",
                                  "outside_link", "same_file_twice", "loose_file"])
def test_bad_folders_are_named(tmp_path, case):
    root = tmp_path / "data"
    write_shapes(root, {"train": [3, 2], "val": [1, 1], "test": [1, 1]})
    contexts = False
    if case == "no_train":
        os.rename(root / "train", root / "training")
        expect = f"{root} has no train/ folder"
    elif case == "unknown_val_class":
        (root / "val" / "hexagon").mkdir()
        expect = f"{root / 'val' / 'hexagon'}: class folder 'hexagon' is not in {root / 'train'}"
    elif case == "empty_class":
        (root / "train" / "triangle").mkdir()
        expect = "class folder(s) 'triangle' hold no image"
    elif case == "empty_file":
        (root / "train" / "circle" / "blank.png").write_bytes(b"")
        expect = f"{root / 'train' / 'circle' / 'blank.png'}: image file"
    elif case == "outside_link":
        outside = tmp_path / "elsewhere.png"
        Image.new("RGB", (8, 8)).save(outside)
        (root / "train" / "circle" / "link.png").symlink_to(outside)
        expect = "resolves outside the data root"
    elif case == "same_file_twice":
        target = next((root / "train" / "circle").iterdir())
        (root / "train" / "circle" / "again.png").symlink_to(target)
        expect = "is the same file as"
    else:
        contexts = True
        expect = "is not in a context folder; with dataset.contexts: true"
    with pytest.raises(DataError) as err:
        read_image_folders(root, contexts, 0.1, 0.1, seed=0)
    assert expect in str(err.value), str(err.value)


def test_a_link_inside_the_root_is_read(tmp_path):
    root = tmp_path / "data"
    write_shapes(root, {"train": [3, 2]})
    store = root / "store"
    store.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(store / "kept.png")
    (root / "train" / "square" / "kept.png").symlink_to(store / "kept.png")
    read = read_image_folders(root, False, 0.1, 0.1, seed=0)
    assert "store/kept.png" in set(read.tables["train"]["path"]) | \
        set(read.tables["val"]["path"]) | set(read.tables["test"]["path"])


# -- manifests -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def listed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("listed")
    write_shapes(root, COUNTS, contexts=CONTEXTS, layout="manifest")
    return root


def test_a_manifest_of_names_with_contexts_and_splits(listed):
    data = load_dataset(manifest_config(listed, "dataset.contexts=true").dataset, seed=0)
    table = pd.read_csv(listed / "manifest.csv")
    assert list(table.columns) == ["path", "label", "context", "split"]
    assert data.class_names == sorted(SHAPES[:4]) and data.context_names == sorted(CONTEXTS)
    assert {k: len(v) for k, v in data.tables.items()} == {"train": 49, "val": 12, "test": 16}
    row = data.tables["val"].iloc[0]
    line = int(row["source"].rsplit(":", 1)[1])
    source = table.iloc[line - 2]
    assert row["path"] == source["path"] and source["split"] == "val"
    assert row["group"] == data.class_names.index(source["label"]) * 3 + \
        data.context_names.index(source["context"])


def test_the_same_manifest_as_parquet_with_integer_labels_and_no_split(listed, tmp_path):
    table = pd.read_csv(listed / "manifest.csv")
    names = sorted(SHAPES[:4])
    table["label"] = [names.index(n) for n in table["label"]]
    table = table.drop(columns=["context", "split"])
    table["path"] = [str(listed / p) for p in table["path"]]  # absolute, inside the root
    table.to_parquet(tmp_path / "m.parquet")
    cfg = manifest_config(listed, f"dataset.manifest={tmp_path / 'm.parquet'}",
                          "dataset.num_classes=4")
    data = load_dataset(cfg.dataset, seed=0)
    assert data.class_names == ["class 0", "class 1", "class 2", "class 3"]
    assert sum(len(t) for t in data.tables.values()) == len(table)
    assert not data.tables["val"].empty and not data.tables["test"].empty
    assert data.tables["train"]["path"].str.startswith("images/").all()
    assert data.tables["train"]["source"].str.contains(r"m\.parquet row \d+$").all()


def _manifest(tmp_path: Path, listed: Path, edit) -> Path:
    table = pd.read_csv(listed / "manifest.csv").drop(columns=["context"])
    table = edit(table)
    path = tmp_path / "bad.csv"
    table.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("case", ["missing_column", "unknown_name", "out_of_range", "bad_split",
                                  "duplicate", "outside", "missing_file", "no_training_row",
                                  "context_without_key"])
def test_bad_manifest_rows_are_named_with_their_line(tmp_path, listed, case):
    extra: list[str] = []
    line = None
    if case == "missing_column":
        path = _manifest(tmp_path, listed, lambda t: t.rename(columns={"label": "class"}))
        expect = "no column label"
    elif case == "unknown_name":
        names = tmp_path / "names.txt"
        names.write_text("\n".join(sorted(SHAPES[:3])) + "\nhexagon\n")
        extra = [f"dataset.class_names_file={names}"]
        path = _manifest(tmp_path, listed, lambda t: t)
        line, expect = None, "is not a class name"
    elif case == "out_of_range":
        names = sorted(SHAPES[:4])

        def edit(t):
            t["label"] = [names.index(n) for n in t["label"]]
            t.loc[5, "label"] = 7
            return t
        path = _manifest(tmp_path, listed, edit)
        extra = ["dataset.num_classes=4"]
        line, expect = 7, "label 7 is outside [0, 4)"
    elif case == "bad_split":
        def edit(t):
            t.loc[3, "split"] = "holdout"
            return t
        path = _manifest(tmp_path, listed, edit)
        line, expect = 5, "split 'holdout' is not one of train, val, test"
    elif case == "duplicate":
        def edit(t):
            t.loc[9, "path"] = "./" + t.loc[2, "path"]
            return t
        path = _manifest(tmp_path, listed, edit)
        line, expect = 11, "is the same file as"
    elif case == "outside":
        def edit(t):
            t.loc[4, "path"] = "../elsewhere.png"
            return t
        (listed.parent / "elsewhere.png").write_bytes(b"x")
        path = _manifest(tmp_path, listed, edit)
        line, expect = 6, "resolves outside the data root"
    elif case == "missing_file":
        def edit(t):
            t.loc[0, "path"] = "images/gone.png"
            return t
        path = _manifest(tmp_path, listed, edit)
        line, expect = 2, "does not exist"
    elif case == "no_training_row":
        path = _manifest(tmp_path, listed,
                         lambda t: t[~((t["label"] == "triangle") & (t["split"] == "train"))])
        expect = "have no training image"
    else:
        path = listed / "manifest.csv"
        expect = "has a context column, but dataset.contexts is false"
    cfg = manifest_config(listed, f"dataset.manifest={path}", *extra)
    with pytest.raises(DataError) as err:
        load_dataset(cfg.dataset, seed=0)
    message = str(err.value)
    assert expect in message, message
    assert str(path) in message
    if line is not None:
        assert f"{path}:{line}:" in message, message


def test_config_keys_of_the_user_kinds(tmp_path):
    with pytest.raises(ConfigError, match="val_fraction \\+ test_fraction = 1 leaves no "
                                          "training image"):
        folder_config(tmp_path, "dataset.val_fraction=0.5", "dataset.test_fraction=0.5")
    # group criteria need contexts, which these kinds have only when told
    with pytest.raises(ConfigError, match="has no groups"):
        folder_config(tmp_path, "synthesis.criteria={target_group: 1.0}")
    cfg = folder_config(tmp_path, "dataset.contexts=true",
                        "synthesis.criteria={target_group: 1.0}")
    assert cfg.dataset.contexts
    cfg = manifest_config(tmp_path, "dataset.manifest=/abs/list.parquet")
    assert cfg.dataset.manifest_path() == Path("/abs/list.parquet")
    assert manifest_config(tmp_path).dataset.manifest_path() == tmp_path / "manifest.csv"


# -- ray-lt plan ---------------------------------------------------------------------------

def test_plan_prints_the_profile_quota_disk_and_an_estimate_without_running(tmp_path, capsys):
    from ray_lt.cli import main

    root = tmp_path / "data"
    write_shapes(root, COUNTS)
    out = tmp_path / "plan"
    code = main(["plan", str(ROOT / "configs" / "custom_lt.yaml"), "--out", str(out), "--set",
                 f"dataset.root={root}", "dataset.image_size=24", "evaluate.many_threshold=10",
                 "evaluate.few_threshold=4"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "data: folder, 4 classes, 49 training / 12 validation / 16 test images" in printed
    assert "Many (> 10): 2 classes, 42 images  Medium (4-10): 1 classes, 5 images  " \
           "Few (< 4): 1 classes, 2 images" in printed
    # to the largest class (30): 0 + 18 + 25 + 28
    assert "quota: 71 synthetic images to 30 per class (quota_scale 1), in 3 shards of <= 32; "\
           "many 18, medium 25, few 28" in printed
    assert f"histogram: {out / 'class_counts.png'}" in printed
    assert (out / "class_counts.png").stat().st_size > 5000
    summary = json.loads((out / "plan_summary.json").read_text())
    assert summary["quota"]["total"] == 71 and summary["images"]["train"] == 49
    assert 100 < summary["disk"]["bytes_per_image"] < 24 * 24 * 3 * 2
    assert summary["sampler"]["estimate"] is None
    assert "no GPU cost is measured for generator.kind pixel" in printed
    assert not (out / "stages.json").exists() and not list(out.glob("classifier*"))


def test_plan_estimates_sampler_hours_from_the_cost_table(tmp_path):
    from ray_lt.planning import PEAK_BF16_TFLOPS, SAMPLER_COSTS, render, sampler_estimate

    cfg = load_config(ROOT / "configs" / "imagenet_lt.yaml",
                      ["generator.height=768", "generator.width=768"])
    estimate = sampler_estimate(cfg, total=1_184_154)
    measured = next(r for r in SAMPLER_COSTS if r.size == 768)
    assert estimate["size"] == 768 and estimate["steps"] == cfg.synthesis.num_steps == 30
    h100 = 1_184_154 / measured.images_per_second / 3600
    assert estimate["estimate"]["H100"][1] == pytest.approx(h100, abs=0.01)
    assert estimate["estimate"]["H100"][8] == pytest.approx(h100 / 8, abs=0.01)
    ratio = PEAK_BF16_TFLOPS["H100"] / PEAK_BF16_TFLOPS["A100"]
    assert estimate["estimate"]["A100"][1] == pytest.approx(h100 * ratio, abs=0.05)
    # the shipped config samples at 512 px; half the steps, half the time
    at_512 = load_config(ROOT / "configs" / "imagenet_lt.yaml", ["synthesis.num_steps=15"])
    fast = sampler_estimate(at_512, total=1_184_154)["estimate"]["H100"][1]
    assert fast == pytest.approx(1_184_154 / 6.18 / 2 / 3600, abs=0.01)
    lines = render({"dataset": "x", "load_seconds": 1.0,
                    "images": {"train": 1, "val": 1, "test": 1}, "classes": 2, "contexts": 0,
                    "class_counts": {"max": 1, "median": 1, "min": 1},
                    "profile": {k: {"classes": 1, "images": 1, "quota": 1}
                                for k in ("many", "medium", "few")},
                    "quota": {"total": 1_184_154, "shards": 1, "max_shard_size": 64,
                              "target": 1300, "balance": "class", "quota_scale": 1.0},
                    "disk": {"bytes_per_image": 1000, "total_bytes": 10**9, "how": "x"},
                    "sampler": estimate}, cfg)
    assert any(line.startswith("sampler time, an ESTIMATE at 768 px") for line in lines)
    shown = f"{estimate['estimate']['H100'][1]:,.1f} h"
    assert any(line.startswith("  H100") and shown in line for line in lines), lines


def test_the_performance_page_shows_the_cost_table_plan_uses():
    from ray_lt.planning import PEAK_BF16_TFLOPS, SAMPLER_COSTS

    page = (ROOT / "docs" / "performance.md").read_text()
    for row in SAMPLER_COSTS:
        assert f"| {', '.join(row.models)} | {row.size} | {row.steps} | " \
               f"{row.images_per_second} | {row.setting} |" in page, row
    for card, peak in PEAK_BF16_TFLOPS.items():
        assert f"| {card} | {peak:.1f} |" in page, card


def test_a_corrupt_image_in_a_folder_is_named_before_training(tmp_path, ray_session):
    from ray_lt.data import check_images

    root = tmp_path / "data"
    write_shapes(root, {"train": [3, 2], "val": [1, 1], "test": [1, 1]})
    bad = sorted((root / "train" / "square").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    cfg = folder_config(root)
    data = load_dataset(cfg.dataset, seed=0)  # the index is fine: every file exists
    with pytest.raises(DataError) as err:
        check_images(cfg.dataset, data)
    assert "1 image(s) cannot be read" in str(err.value)
    assert f"{bad}: unreadable image" in str(err.value)
