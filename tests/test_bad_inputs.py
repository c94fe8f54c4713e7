"""Bad inputs: each is refused with a message naming the file:line or config key, before any
expensive work, or (images in unusual modes) read correctly. The data-list and config cases
that have their own module (test_data.py, test_config.py) are not repeated here."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, imagenet_lt_folder, nico_folder, run_cli, write_image
from PIL import Image

from ray_lt.cli import main
from ray_lt.cluster import check_cluster_resources
from ray_lt.config import load_config
from ray_lt.data.files import read_nico_metadata, read_split_list
from ray_lt.data.images import load_image
from ray_lt.errors import ConfigError, DataError

CONFIG = ROOT / "configs" / "digits_lt.yaml"


def _with_line(listing: Path, line: str, at: int) -> None:
    lines = listing.read_text().splitlines()
    lines.insert(at, line)
    listing.write_text("\n".join(lines) + "\n")


def _line_of(listing: Path, line: str) -> int:
    return listing.read_text().splitlines().index(line) + 1


# -- data files ------------------------------------------------------------------------------

def test_zero_byte_image_is_named_with_its_list_line(tmp_path):
    root = imagenet_lt_folder(tmp_path / "d")
    (root / "train/n0001/img_1.JPEG").write_bytes(b"")
    listing = root / "ImageNet_LT_train.txt"
    with pytest.raises(DataError) as err:
        read_split_list(listing, root, 3)
    number = _line_of(listing, "train/n0001/img_1.JPEG 1")
    assert str(err.value) == (f"{listing}:{number}: image file {root / 'train/n0001/img_1.JPEG'}"
                              f" is empty (0 bytes); replace it or remove the line")


def _png16_rgb(path: Path, rgb: tuple[int, int, int], size=(6, 4)) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one), chunk by chunk."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    w, h = size
    rows = b"".join(b"\0" + struct.pack(">3H", *rgb) * w for _ in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0,
                                                                       0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _save(image: Image.Image, fmt: str):
    return lambda path: image.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


GREY16 = np.full((4, 6), 20000, np.uint16)  # 20000 / 65535 * 255 = 77.8
NON_RGB = {  # name: (mode Pillow opens it in, how to write it, suffix, RGB expected, tolerance)
    "grey": ("L", _save(Image.new("L", (6, 4), 90), "PNG"), "png", (90, 90, 90), 0),
    "palette": ("P", _save(Image.new("RGB", (6, 4), (10, 200, 60)).convert(
        "P", palette=Image.Palette.ADAPTIVE), "PNG"), "png", (10, 200, 60), 0),
    "rgba": ("RGBA", _save(Image.new("RGBA", (6, 4), (200, 40, 10, 128)), "PNG"), "png",
             (200, 40, 10), 0),
    "cmyk-jpeg": ("CMYK", _save(Image.new("RGB", (6, 4), (200, 100, 50)).convert("CMYK"),
                                "JPEG"), "jpg", (200, 100, 50), 4),
    "grey-16-bit-png": ("I;16", _save(Image.fromarray(GREY16), "PNG"), "png", (78, 78, 78), 0),
    "grey-32-bit-tiff": ("I", _save(Image.fromarray(GREY16.astype(np.int32)), "TIFF"), "tif",
                         (78, 78, 78), 0),
    "rgb-16-bit-png": ("RGB", lambda path: _png16_rgb(path, (51400, 25700, 12850)), "png",
                       (200, 100, 50), 0),
}


@pytest.mark.parametrize("name", list(NON_RGB))
def test_images_in_other_modes_load_as_rgb_with_their_colours(tmp_path, name):
    mode, write, suffix, expected, tolerance = NON_RGB[name]
    path = tmp_path / f"image.{suffix}"
    write(path)
    with Image.open(path) as img:
        assert img.mode == mode  # the file really is in the mode under test
    rgb = load_image(path, 4, channels=3)
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - expected).max() <= tolerance, rgb[0, 0]
    grey = load_image(path, 4, channels=1)
    assert grey.shape == (4, 4, 1)
    if len(set(expected)) == 1:  # 16-bit grey is scaled to 8 bit, not clipped to white
        assert np.abs(grey.astype(int) - expected[0]).max() <= tolerance


def test_duplicated_list_line_names_both_lines(tmp_path):
    root = imagenet_lt_folder(tmp_path / "d")
    listing = root / "ImageNet_LT_train.txt"
    first = _line_of(listing, "train/n0000/img_1.JPEG 0")
    _with_line(listing, "./train/n0000/img_1.JPEG 0", 5)  # the same file, spelt differently
    with pytest.raises(DataError) as err:
        read_split_list(listing, root, 3)
    assert str(err.value).startswith(f"{listing}:6: './train/n0000/img_1.JPEG' is listed twice, "
                                     f"first at {listing}:{first}")
    nico = nico_folder(tmp_path / "nico")
    meta = nico / "metadata.csv"
    _with_line(meta, "class0/ctx0/0_0.png,2,0,0", 9)  # a training image again, as a test image
    with pytest.raises(DataError) as err:
        read_nico_metadata(meta, nico, 2, 3)
    assert f"{meta}:10: 'class0/ctx0/0_0.png' is listed twice, first at {meta}:2" in str(err.value)


def test_symlink_inside_the_root_to_a_file_outside_is_refused(tmp_path):
    root = imagenet_lt_folder(tmp_path / "d")
    write_image(tmp_path / "elsewhere" / "secret.JPEG", 7)
    (root / "train/n0000/link.JPEG").symlink_to(tmp_path / "elsewhere" / "secret.JPEG")
    (root / "train/n0002/linked_dir").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    listing = root / "ImageNet_LT_train.txt"
    for line in ("train/n0000/link.JPEG 0", "train/n0002/linked_dir/secret.JPEG 2"):
        listing.write_text(f"train/n0000/img_0.JPEG 0\n{line}\n")
        with pytest.raises(DataError) as err:
            read_split_list(listing, root, 3)
        assert str(err.value) == (f"{listing}:2: path {line.split()[0]!r} resolves outside the "
                                  f"data root {root}")


def test_nico_header_without_a_column_names_it(tmp_path):
    root = nico_folder(tmp_path / "nico")
    meta = root / "metadata.csv"
    rows = meta.read_text().splitlines()
    meta.write_text("\n".join(["filename,split,y"] + [r.rpartition(",")[0] for r in rows[1:]]))
    with pytest.raises(DataError) as err:
        read_nico_metadata(meta, root, 2, 3)
    assert str(err.value).startswith(f"{meta}:1: the header lacks the column(s) a; it needs "
                                     f"filename,split,y,a")


def test_nico_columns_are_found_by_name_in_any_order(tmp_path):
    root = nico_folder(tmp_path / "nico")
    meta = root / "metadata.csv"
    expected = read_nico_metadata(meta, root, 2, 3)
    rows = [r.split(",") for r in meta.read_text().splitlines()]
    reordered = [",".join([a, y, "extra", name, split]) for name, split, y, a in rows]
    meta.write_text("\ufeff" + "\n".join(reordered) + "\n")  # with a byte-order mark, as Excel
    tables = read_nico_metadata(meta, root, 2, 3)
    for split in expected:
        columns = ["path", "label", "group"]
        assert tables[split][columns].equals(expected[split][columns])


# -- the run folder --------------------------------------------------------------------------

def test_unwritable_out_folder_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("kept\n")
    cases = {
        Path("/proc/forbidden"): "the run folder cannot be created or written: a file cannot be "
                                 "made in /proc (No such file or directory)",
        a_file / "run": f"{a_file} is a file, so the run folder cannot be made there",
        a_file: f"{a_file} is a file, so the run folder cannot be made there",
    }
    for out, message in cases.items():
        started = time.perf_counter()
        code = main(["run", "configs/digits_lt.yaml", "--out", str(out)])
        stderr = capsys.readouterr().err
        assert code == 2, stderr
        assert stderr.startswith(f"ray-lt run: error: --out {out}: {message}"), stderr
        assert "Traceback" not in stderr
        assert time.perf_counter() - started < 10  # refused before Ray or the data
    assert a_file.read_text() == "kept\n"
    assert not (tmp_path / "notes.txt" / "run").exists()


# -- weights ---------------------------------------------------------------------------------

def _state_file(path: Path, model: torch.nn.Module) -> Path:
    torch.save(model.state_dict(), path)
    return path


def test_classifier_checkpoint_of_another_model_is_refused(tmp_path):
    import torchvision

    from ray_lt.train.models import build_model

    five = _state_file(tmp_path / "five.pt", build_model("small_cnn", 5, 1, width=8))
    with pytest.raises(ConfigError) as err:
        build_model("small_cnn", 3, 1, width=8, checkpoint=five)
    assert str(err.value).startswith(f"model.checkpoint: {five} is a classifier of 5 classes, "
                                     f"but the data set has 3 (dataset.num_classes)")
    with pytest.raises(ConfigError) as err:  # same classes, other width
        build_model("small_cnn", 5, 1, width=16, checkpoint=five)
    assert str(err.value).startswith(
        f"model.checkpoint: {five} does not match model.name 'small_cnn' with these settings: "
        f"other shapes: backbone.0.0.weight (8, 1, 3, 3) in the file, (16, 1, 3, 3) here")
    small = _state_file(tmp_path / "small.pt", build_model("small_cnn", 3, 3, width=8))
    with pytest.raises(ConfigError) as err:  # another architecture
        build_model("resnet50", 3, 3, checkpoint=small)
    assert f"{small} does not match model.name 'resnet50'" in str(err.value)
    assert "missing: backbone.conv1.weight" in str(err.value)
    assert "unexpected: backbone.0.0.weight" in str(err.value)
    resnet18 = _state_file(tmp_path / "resnet18.pth", torchvision.models.resnet18(weights=None))
    with pytest.raises(ConfigError) as err:  # a torchvision backbone of another depth
        build_model("resnet50", 3, 3, checkpoint=resnet18)
    assert "other shapes: layer1.0.conv1.weight (64, 64, 3, 3) in the file, (64, 64, 1, 1) here" \
        in str(err.value)
    text = tmp_path / "notes.pt"
    text.write_text("not weights")
    with pytest.raises(ConfigError, match=f"model.checkpoint: {text} is not a PyTorch state dict"):
        build_model("small_cnn", 3, 1, width=8, checkpoint=text)
    loaded = build_model("small_cnn", 5, 1, width=8, checkpoint=five)  # the right one loads
    assert loaded.head.out_features == 5


def test_generator_folder_of_another_kind_is_refused(tmp_path):
    from test_sampler import pixel_parts

    from ray_lt.generate.factory import check_generator
    from ray_lt.generate.feature import train_feature_generator
    from ray_lt.generate.unclip import save_components
    from ray_lt.testing import tiny_unclip_components

    pixel = tmp_path / "pixel"
    pixel_parts()[0].save_pretrained(pixel)
    cfg = load_config(CONFIG, ["generator.kind=unclip", f"generator.pretrained={pixel}",
                               "dataset.channels=3"])
    with pytest.raises(ConfigError) as err:
        check_generator(cfg, tmp_path / "run")
    assert str(err.value).startswith(f"generator.pretrained: {pixel} holds a 'pixel' generator "
                                     f"trained by ray-lt (generator.json), not a "
                                     f"StableUnCLIPImg2ImgPipeline")

    run = tmp_path / "run"
    train_feature_generator(np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32),
                            np.arange(20) % 2, 2, steps=1, batch_size=4, lr=1e-3,
                            label_dropout=0.1, seed=0, folder=run / "generator")
    with pytest.raises(ConfigError) as err:
        check_generator(load_config(CONFIG), run)
    assert str(err.value).startswith(f"generator.kind: 'pixel', but {run / 'generator'} holds a "
                                     f"trained 'feature' generator (generator.json)")

    copied = tmp_path / "copied"
    save_components(tiny_unclip_components(), copied / "generator")
    with pytest.raises(ConfigError) as err:
        check_generator(load_config(CONFIG), copied)
    assert str(err.value).startswith(
        f"generator.kind: 'pixel', but {copied / 'generator'} holds pretrained weights of a "
        f"StableUnCLIPImg2ImgPipeline (model_index.json)")

    with pytest.raises(ConfigError) as err:  # unCLIP weights given to a generator trained here
        load_config(CONFIG, [f"generator.pretrained={copied / 'generator'}"])
    assert ("generator.pretrained: Extra inputs are not permitted (it is a key of generator.kind "
            "unclip, sd, sdxl, not pixel") in str(err.value)


# -- the config against the Ray cluster ------------------------------------------------------

TWO_CPUS = {"CPU": 2.0, "memory": 8e9}
CLUSTER_CASES = {  # name: (overrides, resources, what the command needs, message or None)
    "defaults fit two CPUs": ([], TWO_CPUS, ("train", "synthesis", "tune"), None),
    "a worker holding every CPU": (
        ["scaling.cpus_per_worker=2"], TWO_CPUS, ("train",),
        "scaling.cpus_per_worker: 1 worker(s) x 2 CPU = 2 CPUs leave Ray Data 0 of the "
        "cluster's CPUs, and each of its tasks needs 1: training would wait forever; the Ray "
        "cluster has 2 CPU(s) and 0 GPU(s)"),
    "workers and a trial driver": (
        ["scaling.num_workers=2", "scaling.cpus_per_worker=1.5", "tune.trial_cpus=1"],
        {"CPU": 4.0}, ("train", "tune"),
        "scaling.cpus_per_worker: 2 worker(s) x 1.5 CPU + tune.trial_cpus 1 = 4 CPUs leave Ray "
        "Data 0"),
    "a GPU the cluster lacks": (
        ["scaling.use_gpu=true"], TWO_CPUS, ("train",),
        "scaling.use_gpu: true asks for 1 worker(s) x 1 GPU (scaling.gpus_per_worker), but the "
        "Ray cluster has 2 CPU(s) and 0 GPU(s)"),
    "more GPU workers than GPUs": (
        ["scaling.use_gpu=true", "scaling.num_workers=4"], {"CPU": 16.0, "GPU": 2.0},
        ("train",), "scaling.use_gpu: true asks for 4 worker(s) x 1 GPU"),
    "a sampler actor larger than the cluster": (
        ["synthesis.num_actors=3", "synthesis.cpus_per_actor=2"], TWO_CPUS, ("synthesis",),
        "synthesis.cpus_per_actor: one sampler actor (2 CPU) beside the shard writer "
        "(synthesis.writer_cpus 0.25) needs 2.25 CPUs, but the Ray cluster has 2 CPU(s) and 0 "
        "GPU(s); lower synthesis.cpus_per_actor"),
    "fewer sampler actors fit than asked: the pool runs with those": (
        ["synthesis.num_actors=3", "synthesis.cpus_per_actor=1"], TWO_CPUS, ("synthesis",),
        None),
    "sampler GPUs the cluster lacks": (
        ["synthesis.gpus_per_actor=1"], TWO_CPUS, ("synthesis",),
        "synthesis.gpus_per_actor: one sampler actor needs 1 GPU, but the Ray cluster has 2 "
        "CPU(s) and 0 GPU(s)"),
    "too many evaluation CPUs": (
        ["evaluate.num_actors=8"], TWO_CPUS, ("train",),
        "evaluate.cpus_per_actor: 8 actor(s) x 0.5 CPU = 4 CPUs"),
    "synthesis settings do not matter to train": (
        ["synthesis.gpus_per_actor=1"], TWO_CPUS, ("train",), None),
}


@pytest.mark.parametrize("case", list(CLUSTER_CASES))
def test_settings_the_cluster_cannot_schedule_are_refused(case):
    overrides, resources, needs, message = CLUSTER_CASES[case]
    cfg = load_config(CONFIG, overrides)
    if message is None:
        check_cluster_resources(cfg, resources, needs)
        return
    with pytest.raises(ConfigError) as err:
        check_cluster_resources(cfg, resources, needs)
    assert message in str(err.value), str(err.value)


def test_cpus_per_worker_that_starves_ray_data_exits_2_at_once(tmp_path, ray_session):
    started = time.perf_counter()
    done = run_cli("run", str(CONFIG), "--out", str(tmp_path / "run"), "--set",
                   "scaling.cpus_per_worker=2", f"ray.address={ray_session['address']}",
                   timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "scaling.cpus_per_worker: 1 worker(s) x 2 CPU = 2 CPUs leave Ray Data 0" in done.stderr
    assert "the Ray cluster has 2 CPU(s)" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "run" / "classifier").exists()


# -- config keys -----------------------------------------------------------------------------

@pytest.mark.parametrize("override, shown", [
    ("train.epoch=3", "train.epoch: Extra inputs are not permitted; did you mean train.epochs?"),
    ("trian.epochs=3", "trian: Extra inputs are not permitted; did you mean train?"),
    ("train.augment.flipp=true", "train.augment.flipp: Extra inputs are not permitted; did you "
                                 "mean train.augment.flip?"),
    ("dataset.imbalance_factr=10", "dataset.imbalance_factr: Extra inputs are not permitted; "
                                   "did you mean dataset.imbalance_factor?"),
    ("tune.space.guidance_scal=[0.01, 0.1]", "tune.space.guidance_scal: Extra inputs are not "
                                             "permitted; did you mean tune.space.guidance_scale?"),
    ("synthesis.filter.enable=true", "synthesis.filter.enable: Extra inputs are not permitted; "
                                     "did you mean synthesis.filter.enabled?"),
])
def test_misspelled_key_suggests_the_nearest_key(override, shown):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [override])
    assert f"{CONFIG}: {shown}" in str(err.value)


def test_unknown_key_without_a_near_one_gets_no_suggestion():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, ["train.colour=red"])
    assert str(err.value).endswith("train.colour: Extra inputs are not permitted")


INVERTED = "the range must be [low, high] with low < high"


@pytest.mark.parametrize("override, message", [
    ("tune.space.guidance_scale=[0.3, 0.003]", INVERTED),
    ("tune.space.synthetic_weight=[0.5, 0.5]", INVERTED),
    ("tune.space.balanced_softmax_weight=[1.0, 0.0]", INVERTED),
    ("tune.space.embedding_dropout=[0.7, 0.2]", INVERTED),
    ("tune.space.synthetic_weight=[-1.0, 1.0]", "a loss weight cannot be negative"),
    ("tune.space.criteria=[]", "0 distinct criteria leave no mixture to search"),
    ("tune.space.criteria=[entropy, entropy]", "1 distinct criteria leave no mixture to search"),
    ("tune.space.criteria=[entropy, sharpness]", "unknown criteria ['sharpness']"),
])
def test_empty_or_inverted_search_range_names_the_key(override, message):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [override])
    assert f"{CONFIG}: {key}: Value error, {message}" in str(err.value)
