"""Per-sample augmentations of a training batch, vectorised with one ``grid_sample`` per crop."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop box i (x0, y0, x1, y1 in pixels) of image i and resize it to ``size``, bilinearly.

    Samples like ``roi_align(aligned=True, sampling_ratio=1)`` (one read at the centre of every
    output pixel, edge pixels repeated) at a fraction of its CPU time; x0 > x1 mirrors the crop.
    """
    def axis(lo: torch.Tensor, hi: torch.Tensor, n: int, extent: int) -> torch.Tensor:
        centres = (torch.arange(n, dtype=torch.float32, device=x.device) + 0.5) / n
        return (lo[:, None] + centres * (hi - lo)[:, None]) * (2 / extent) - 1

    boxes = boxes.to(x.device, torch.float32)
    gx = axis(boxes[:, 0], boxes[:, 2], size[1], x.shape[3])
    gy = axis(boxes[:, 1], boxes[:, 3], size[0], x.shape[2])
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border",
                         align_corners=False)


def augment_batch(x: torch.Tensor, crop_padding: int = 0,
                  resized_crop_scale: tuple[float, float] | None = None, flip: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crops (zero padding + shift, or random-resized crop), then random h-flips.

    x is (B, C, H, W) float; each sample draws its own crop and flip. A flip is folded into
    the last crop's sampling grid, so a flipped sample costs nothing extra.
    """
    b, _, h, w = x.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator).to(x.device)  # noqa: E731
    shift_box = crop_box = flipped = None
    if crop_padding:
        shift = torch.floor(rand(b, 2) * (2 * crop_padding + 1)).to(x.dtype)
        shift_box = torch.stack([shift[:, 0], shift[:, 1], shift[:, 0] + w, shift[:, 1] + h], 1)
    if resized_crop_scale is not None:
        lo, hi = resized_crop_scale
        area = (lo + (hi - lo) * rand(b)) * h * w
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand(b)
        ratio = torch.exp(log_ratio)
        cw = torch.sqrt(area * ratio).clamp(1, w)
        ch = torch.sqrt(area / ratio).clamp(1, h)
        x0 = rand(b) * (w - cw)
        y0 = rand(b) * (h - ch)
        crop_box = torch.stack([x0, y0, x0 + cw, y0 + ch], 1)
    if flip:
        flipped = rand(b) < 0.5
        last = crop_box if crop_box is not None else shift_box
        if last is not None:
            last[:] = torch.where(flipped[:, None], last[:, [2, 1, 0, 3]], last)
    if shift_box is not None:
        p = crop_padding
        x = _crop_resize(F.pad(x, (p, p, p, p)), shift_box, (h, w))
    if crop_box is not None:
        x = _crop_resize(x, crop_box, (h, w))
    if flipped is not None and shift_box is None and crop_box is None:
        x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
    return x
