import pytest
import torch
import torchvision

from ray_lt.errors import ConfigError
from ray_lt.train.augment import augment_batch
from ray_lt.train.models import build_model


def test_small_cnn_shapes_and_embedding():
    model = build_model("small_cnn", num_classes=7, in_channels=1, width=8).eval()
    x = torch.rand(5, 1, 16, 16)
    assert model(x).shape == (5, 7)
    assert model.embed(x).shape == (5, 16)
    assert torch.allclose(model.head(model.embed(x)), model(x))


def test_unknown_model_and_channel_mismatch():
    with pytest.raises(ConfigError, match="model.name: unknown model 'resnet9'"):
        build_model("resnet9", 10, 3)
    with pytest.raises(ConfigError, match="needs 3-channel images"):
        build_model("resnet50", 10, 1)


def test_torchvision_checkpoint_loads_into_backbone(tmp_path):
    source = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet50", num_classes=4, in_channels=3, checkpoint=path)
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)
    assert model.head.out_features == 4
    with pytest.raises(ConfigError, match="does not exist"):
        build_model("resnet50", 4, 3, checkpoint=tmp_path / "missing.pth")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(Exception, match="size mismatch|does not match"):
        build_model("resnet50", 4, 3, checkpoint=tmp_path / "bad.pth")


def test_flip_flips_some_samples_exactly():
    x = torch.rand(64, 1, 6, 6)
    out = augment_batch(x, flip=True, generator=torch.Generator().manual_seed(0))
    same = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    assert all(s or f for s, f in zip(same, flipped, strict=True))
    assert 10 < sum(flipped) < 54


def test_padded_crop_is_an_integer_shift():
    x = torch.arange(2 * 36, dtype=torch.float32).view(2, 1, 6, 6) + 1
    out = augment_batch(x, crop_padding=2, generator=torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    for o, i in zip(out, x, strict=True):
        padded = torch.nn.functional.pad(i, (2, 2, 2, 2))
        shifts = [(dy, dx) for dy in range(5) for dx in range(5)
                  if torch.allclose(padded[:, dy:dy + 6, dx:dx + 6], o, atol=1e-5)]
        assert len(shifts) == 1


def test_resized_crop_keeps_shape_and_range():
    x = torch.rand(8, 3, 12, 12)
    out = augment_batch(x, resized_crop_scale=(0.3, 1.0), generator=torch.Generator())
    assert out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)
