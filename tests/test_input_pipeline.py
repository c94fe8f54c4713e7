"""The training input pipeline without Ray: image decoding, row blocks, the grid_sample crops
(checked against the roi_align sampling they replace) and the input-pipeline bench's parts."""

import importlib.util
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT
from PIL import Image
from torchvision.ops import roi_align

from ray_lt.data.images import decode_batch, load_image, row_blocks
from ray_lt.train.augment import _crop_resize, augment_batch

spec = importlib.util.spec_from_file_location("input_pipeline",
                                              ROOT / "bench" / "input_pipeline.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _jpeg(path, size=(300, 200), seed=0):
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
    pixels = np.clip(ramp + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def _resize_then_crop(path, size):
    """The reference: resize the whole image (shorter side to ``size``), then centre-crop."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                         Image.Resampling.BILINEAR)
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        return np.asarray(img.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (64, 64), (500, 375)])
def test_load_image_matches_resize_then_crop(tmp_path, size):
    path = _jpeg(tmp_path / "a.jpg", size)
    out = load_image(path, 48)
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - _resize_then_crop(path, 48).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.2
    grey = load_image(path, 32, channels=1)
    assert grey.shape == (32, 32, 1) and grey.dtype == np.uint8


def test_row_blocks_cover_the_table_in_order():
    table = pd.DataFrame({"path": [f"{i}.jpg" for i in range(10)], "label": range(10)})
    blocks = row_blocks(table, 4)
    assert [len(b) for b in blocks] == [4, 4, 2]
    pd.testing.assert_frame_equal(pd.concat(blocks), table)
    assert len(row_blocks(table.iloc[:0], 4)) == 1


def test_decode_batch_returns_one_image_array(tmp_path):
    for i in range(3):
        _jpeg(tmp_path / f"{i}.jpg", (120 + 10 * i, 90), seed=i)
    batch = pd.DataFrame({"path": ["0.jpg", "1.jpg", "2.jpg"], "label": [2, 0, 1],
                          "group": [-1, -1, 5]})
    out = decode_batch(batch, str(tmp_path), 16, 3)
    assert set(out) == {"image", "label", "group", "path"}
    assert out["image"].shape == (3, 16, 16, 3) and out["image"].dtype == np.uint8
    assert out["label"].tolist() == [2, 0, 1] and out["group"].tolist() == [-1, -1, 5]
    assert out["path"].tolist() == ["0.jpg", "1.jpg", "2.jpg"]
    for i in range(3):
        assert np.array_equal(out["image"][i], load_image(tmp_path / f"{i}.jpg", 16))


def _roi_crop(x, boxes, size):
    index = torch.arange(len(x), dtype=x.dtype)[:, None]
    return roi_align(x, torch.cat([index, boxes], 1), size, 1.0, sampling_ratio=1, aligned=True)


def test_crop_resize_samples_like_roi_align_and_mirrors():
    x = torch.rand(4, 3, 20, 30).contiguous(memory_format=torch.channels_last)
    boxes = torch.tensor([[0.0, 0.0, 30.0, 20.0], [3.2, 1.7, 9.9, 8.1],
                          [25.0, 10.0, 30.0, 20.0], [0.0, 4.5, 1.0, 5.5]])
    expected = _roi_crop(x, boxes, (12, 14))
    assert torch.allclose(_crop_resize(x, boxes, (12, 14)), expected, atol=1e-5)
    mirrored = _crop_resize(x, boxes[:, [2, 1, 0, 3]], (12, 14))
    assert torch.allclose(mirrored, expected.flip(-1), atol=1e-5)


def _roi_align_augment(x, scale, generator):
    """augment_batch's random-resized crop + flip as roi_align then torch.where computed it."""
    b, _, h, w = x.shape
    area = (scale[0] + (scale[1] - scale[0]) * torch.rand(b, generator=generator)) * h * w
    ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4))
                      * torch.rand(b, generator=generator))
    cw = torch.sqrt(area * ratio).clamp(1, w)
    ch = torch.sqrt(area / ratio).clamp(1, h)
    x0 = torch.rand(b, generator=generator) * (w - cw)
    y0 = torch.rand(b, generator=generator) * (h - ch)
    out = _roi_crop(x, torch.stack([x0, y0, x0 + cw, y0 + ch], 1), (h, w))
    flipped = (torch.rand(b, generator=generator) < 0.5)[:, None, None, None]
    return torch.where(flipped, out.flip(-1), out)


def test_resized_crop_and_flip_draw_and_sample_as_before():
    x = torch.rand(16, 3, 24, 24)
    out = augment_batch(x, resized_crop_scale=(0.08, 1.0), flip=True,
                        generator=torch.Generator().manual_seed(1))
    reference = _roi_align_augment(x, (0.08, 1.0), torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    assert torch.allclose(out, reference, atol=1e-5)


def test_bench_jpegs_and_dataloader_batches(tmp_path):
    table = bench.file_table(tmp_path, 3)
    assert len(table) == 3 and (table["group"] == -1).all()
    with Image.open(tmp_path / table["path"][0]) as img:
        assert img.format == "JPEG" and 250 <= min(img.size) and max(img.size) <= 640
    assert bench.file_table(tmp_path, 99)["path"].tolist() == table["path"].tolist()
    transform = bench.dataloader(tmp_path, table, 1, 2).dataset.transform
    image, label = bench.FileImages(tmp_path, table, transform)[1]
    assert image.shape == (3, bench.SIZE, bench.SIZE) and image.dtype == torch.uint8
    assert label == table["label"][1]


def test_bench_summary_ratios():
    lines = list(bench.summary({"ray": [(300.0, 4.0), (100.0, 6.0), (200.0, 5.0)],
                                "dataloader": [(400.0, 2.5), (400.0, 2.5), (100.0, 2.5)]}, 2))
    assert lines[1].split()[:5] == ["ray", "2", "200.0", "100.0", "5.00"]
    assert lines[-1] == ("ray / dataloader: images/s per core 0.50 (median of the passes' "
                         "pairwise ratios 0.75), CPU per image 2.00")
    three = list(bench.summary({"ray": [(100.0, 5.0)], "ray-gpu-crop": [(500.0, 2.0)],
                                "dataloader": [(250.0, 4.0)]}, 2))
    assert len(three) == 6
    assert three[-1].startswith("ray-gpu-crop / dataloader: images/s per core 2.00 ")
    assert three[-1].endswith("CPU per image 0.50")
