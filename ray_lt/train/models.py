"""Classifiers built by name: a backbone producing an embedding, then a linear head.

Every classifier takes images in [0, 1] (B, C, H, W) and normalises them itself, so the
generators' decoders feed it directly. ``embed`` exposes the penultimate features that the
hardness criterion and the feature-space generator use.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from ray_lt.errors import ConfigError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class Classifier(nn.Module):
    """``head(backbone((x - mean) / std))`` with x in [0, 1]."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int,
                 mean: list[float], std: list[float]):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def small_cnn(in_channels: int, width: int) -> tuple[nn.Module, int]:
    """Four 3x3 conv blocks and global average pooling: enough for digits at 8-32 px."""
    body = nn.Sequential(
        _conv_block(in_channels, width), _conv_block(width, width), nn.MaxPool2d(2),
        _conv_block(width, 2 * width), _conv_block(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return body, 2 * width


def _torchvision(name: str, attr: str) -> Callable[[int, int], tuple[nn.Module, int]]:
    def build(in_channels: int, width: int) -> tuple[nn.Module, int]:
        net = getattr(torchvision.models, name)(weights=None)
        if attr == "fc":
            dim = net.fc.in_features
            net.fc = nn.Identity()
        else:
            dim = net.heads.head.in_features
            net.heads = nn.Identity()
        return net, dim

    build.__doc__ = f"torchvision {name}, its classification layer replaced by our head."
    return build


MODELS: dict[str, Callable[[int, int], tuple[nn.Module, int]]] = {
    "small_cnn": small_cnn,
    "resnet50": _torchvision("resnet50", "fc"),
    "resnext50_32x4d": _torchvision("resnext50_32x4d", "fc"),
    "resnet152": _torchvision("resnet152", "fc"),
    "vit_b_16": _torchvision("vit_b_16", "heads"),
}


def _load_weights(model: Classifier, checkpoint: Path) -> None:
    """Load a local state dict: a ray_lt classifier, or a torchvision backbone (its own
    classification layer is dropped, since the head is sized for this data set)."""
    if not checkpoint.is_file():
        raise ConfigError(f"model.checkpoint: file {checkpoint} does not exist")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    if any(k.startswith("backbone.") for k in state):
        model.load_state_dict(state)
        return
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "heads."))}
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"model.checkpoint: {checkpoint} does not match the backbone: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def build_model(name: str, num_classes: int, in_channels: int, width: int = 32,
                mean: list[float] | None = None, std: list[float] | None = None,
                checkpoint: Path | None = None) -> Classifier:
    """Build a classifier by registry name, optionally from a local checkpoint."""
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {sorted(MODELS)}")
    if name != "small_cnn" and in_channels != 3:
        raise ConfigError(f"model.name: {name} needs 3-channel images (dataset.channels=3)")
    default_mean, default_std = ((IMAGENET_MEAN, IMAGENET_STD) if name != "small_cnn"
                                 else ([0.5] * in_channels, [0.5] * in_channels))
    mean, std = mean or default_mean, std or default_std
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigError(f"model.mean / model.std: need {in_channels} values each")
    backbone, dim = MODELS[name](in_channels, width)
    model = Classifier(backbone, dim, num_classes, mean, std)
    if checkpoint is not None:
        _load_weights(model, Path(checkpoint))
    return model
