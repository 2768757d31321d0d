"""Batched per-sample geometry: the random resized crop and the horizontal flip, in one resampling pass.

The crop boxes follow torchvision's ``RandomResizedCrop.get_params`` sampling rule, vectorized over the batch;
crop, resize and flip are one ``affine_grid`` + ``grid_sample`` pass for the whole batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .params import ViewParams

__all__ = ["crop_boxes", "resized_crop"]


def crop_boxes(
    params: ViewParams,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample ``(top, left, h, w)`` crop boxes in pixels, torchvision's ``RandomResizedCrop.get_params``.

    Vectorized over the batch: each sample tries ten (area, log-aspect-ratio) draws and keeps the first that
    fits inside the image; a sample for which none fits falls back to the central crop with the aspect ratio
    clamped into ``ratio``, as torchvision does.

    Args:
        params: The view's draw; ``area``, ``ratio``, ``top`` and ``left`` are used.
        height: Input height in pixels.
        width: Input width in pixels.
        scale: Range of the crop's area as a fraction of the input's.
        ratio: Range of the crop's aspect ratio (width / height).

    Returns:
        float32 tensors of integer values, shape ``(B,)``.
    """
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale[0] + (scale[1] - scale[0]) * params.area)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * params.ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting trial (0 if none)
    found = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    top = torch.minimum(torch.floor(params.top * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(params.left * (width - w + 1)), width - w)
    top = torch.where(found, top, torch.full_like(top, (height - fallback_h) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fallback_w) // 2))
    return top, left, h, w


def resized_crop(
    x: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    flip: torch.Tensor | None,
    size: tuple[int, int],
    interpolation: str,
) -> torch.Tensor:
    """Resample each sample's box ``[top, top + h) x [left, left + w)`` to ``size``, mirrored where ``flip``.

    One ``affine_grid`` + ``grid_sample`` pass does crop, resize and flip for the whole batch: the flip is a
    negated horizontal scale in each sample's affine map, so it costs nothing. Pixel centres are mapped as by
    ``F.interpolate(..., align_corners=False)`` (no antialiasing, like the reference TF implementation's
    bicubic resize). The box is resampled in the whole image, so the interpolation taps of the outermost
    output pixels may read the image pixels just outside the box (as kornia's and TF's crop-and-resize do;
    torchvision instead replicates the cut-out crop's edge); taps outside the image repeat its border pixel.
    """
    height, width = x.shape[-2:]
    scale_x = w / width
    if flip is not None:
        scale_x = torch.where(flip, -scale_x, scale_x)
    zeros = torch.zeros_like(scale_x)
    theta = torch.stack(
        (
            torch.stack((scale_x, zeros, (2.0 * left + w) / width - 1.0), dim=1),
            torch.stack((zeros, h / height, (2.0 * top + h) / height - 1.0), dim=1),
        ),
        dim=1,
    )
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size[0], size[1]], align_corners=False)
    out = F.grid_sample(x, grid, mode=interpolation, padding_mode="border", align_corners=False)
    if interpolation == "bicubic":  # the cubic kernel overshoots; keep the colour ops' input in range
        out = out.clamp_(0.0, 1.0)
    return out
