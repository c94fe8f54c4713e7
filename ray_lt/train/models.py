"""Classifiers built by name: a backbone producing an embedding, then a linear head.

Every classifier takes images in [0, 1] (B, C, H, W) and normalises them itself, so the
generators' decoders feed it directly. ``embed`` exposes the penultimate features that the
hardness criterion and the feature-space generator use.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
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
        import torchvision.models  # imported by the models that need it: 2 s in every worker

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


def _mismatch(own: dict[str, torch.Tensor], state: dict[str, Any]) -> str:
    """What keeps ``state`` from loading into a module whose state dict is ``own`` ('' if
    nothing): keys on one side only, tensors of other shapes. BatchNorm's step counters may be
    absent (older torchvision weights): loading fills them in."""
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} here"
              for k, v in own.items()
              if k in state and tuple(getattr(state[k], "shape", ())) != tuple(v.shape)]
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected),
                       ("other shapes", shapes)):
        if keys:
            more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
            parts.append(f"{what}: {', '.join(keys[:4])}{more}")
    return "; ".join(parts)


def _load_weights(model: Classifier, name: str, checkpoint: Path) -> None:
    """Load a local state dict: a ray_lt classifier, or a torchvision backbone (its own
    classification layer is dropped, since the head is sized for this data set). A file of
    another architecture or class count is refused, naming what differs."""
    if not checkpoint.is_file():
        raise ConfigError(f"model.checkpoint: file {checkpoint} does not exist")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise ConfigError(f"model.checkpoint: {checkpoint} is not a PyTorch state dict "
                          f"({type(err).__name__}: {err})") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ConfigError(f"model.checkpoint: {checkpoint} holds a {type(state).__name__}, not "
                          f"a state dict")
    if any(k.startswith("backbone.") for k in state):
        target = model
        head = state.get("head.weight")
        classes = model.head.out_features
        if head is not None and head.shape[0] != classes:
            raise ConfigError(f"model.checkpoint: {checkpoint} is a classifier of "
                              f"{head.shape[0]} classes, but the data set has {classes} "
                              f"(dataset.num_classes); give a checkpoint of this data set or a "
                              f"backbone without its head")
    else:
        target = model.backbone
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "heads."))}
    problem = _mismatch(target.state_dict(), state)
    if problem:
        raise ConfigError(f"model.checkpoint: {checkpoint} does not match model.name {name!r} "
                          f"with these settings: {problem}")
    target.load_state_dict(state, strict=False)  # checked above; BatchNorm fills its counters


def feature_dim(name: str, in_channels: int, width: int = 32) -> int:
    """The width of ``name``'s penultimate features (``Classifier.embed``), from a copy built
    on the meta device: no memory, no weights."""
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {sorted(MODELS)}")
    with torch.device("meta"):
        return MODELS[name](in_channels, width)[1]


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
        _load_weights(model, name, Path(checkpoint))
    return model
