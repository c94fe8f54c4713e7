"""Per-sample augmentations of a training batch, vectorised with ``roi_align``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


def _crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop box i (x0, y0, x1, y1 in pixels) of image i and resize it to ``size``, bilinearly."""
    index = torch.arange(len(x), dtype=x.dtype, device=x.device)[:, None]
    return roi_align(x, torch.cat([index, boxes], dim=1), size, spatial_scale=1.0,
                     sampling_ratio=1, aligned=True)


def augment_batch(x: torch.Tensor, crop_padding: int = 0,
                  resized_crop_scale: tuple[float, float] | None = None, flip: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crops (zero padding + shift, or random-resized crop), then random h-flips.

    x is (B, C, H, W) float; each sample draws its own crop and flip.
    """
    b, _, h, w = x.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator).to(x.device)  # noqa: E731
    if crop_padding:
        p = crop_padding
        padded = F.pad(x, (p, p, p, p))
        shift = torch.floor(rand(b, 2) * (2 * p + 1)).to(x.dtype)
        boxes = torch.stack([shift[:, 0], shift[:, 1], shift[:, 0] + w, shift[:, 1] + h], 1)
        x = _crop_resize(padded, boxes, (h, w))
    if resized_crop_scale is not None:
        lo, hi = resized_crop_scale
        area = (lo + (hi - lo) * rand(b)) * h * w
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand(b)
        ratio = torch.exp(log_ratio)
        cw = torch.sqrt(area * ratio).clamp(1, w)
        ch = torch.sqrt(area / ratio).clamp(1, h)
        x0 = rand(b) * (w - cw)
        y0 = rand(b) * (h - ch)
        x = _crop_resize(x, torch.stack([x0, y0, x0 + cw, y0 + ch], 1).to(x.dtype), (h, w))
    if flip:
        mask = (rand(b) < 0.5)[:, None, None, None]
        x = torch.where(mask, x.flip(-1), x)
    return x
