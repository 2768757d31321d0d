"""The random parameters of one view's forward pass: a named structure drawn from one ``torch.rand`` call.

Every random quantity of :class:`~byol_wrapper.augmentations.BYOLView` is a uniform number in ``[0, 1)`` per
sample, turned into a crop box, a factor or a yes/no decision by the ops (``geometric.py``, ``intensity.py``)
with the view's settings. They are drawn together, as the columns of one ``(B, N)`` uniform tensor on the input's
device (one RNG call, no host synchronization), and :class:`ViewParams` names the columns. Transforming the same
images with the same :class:`ViewParams` gives the same view, so a draw can be replayed, or sliced per sample.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["CROP_TRIALS", "ViewParams"]

#: Crop trials per sample, as torchvision's ``RandomResizedCrop.get_params``.
CROP_TRIALS = 10


class ViewParams(NamedTuple):
    """Per-sample uniform draws in ``[0, 1)`` for one view's forward pass; every field has the batch first.

    Attributes:
        area: ``(B, CROP_TRIALS)`` crop area fraction of each trial, mapped into ``crop_scale``.
        ratio: ``(B, CROP_TRIALS)`` log aspect ratio of each trial, mapped into ``log(crop_ratio)``.
        top: ``(B,)`` vertical position of the crop within the free range.
        left: ``(B,)`` horizontal position of the crop within the free range.
        flip: ``(B,)`` flipped where ``< flip_p``.
        jitter: ``(B,)`` colour-jittered where ``< jitter_p``.
        factors: ``(B, 4)`` jitter factors (brightness, contrast, saturation, hue), mapped into their ranges.
        order: ``(B, 4)`` sort keys of the four jitter ops: their argsort is the sample's order of application.
        gray: ``(B,)`` grayscale where ``< grayscale_p``.
        blur: ``(B,)`` blurred where ``< blur_p``.
        sigma: ``(B,)`` blur sigma, mapped into ``blur_sigma``.
        solarize: ``(B,)`` solarized where ``< solarize_p``.
    """

    area: torch.Tensor
    ratio: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor

    @staticmethod
    def widths() -> tuple[int, ...]:
        """Columns of each field in the uniform draw, in field order (1 for a ``(B,)`` field)."""
        return (CROP_TRIALS, CROP_TRIALS, 1, 1, 1, 1, 4, 4, 1, 1, 1, 1)

    @classmethod
    def columns(cls) -> int:
        """Width of the uniform draw that holds every field."""
        return sum(cls.widths())

    @classmethod
    def from_uniform(cls, uniform: torch.Tensor) -> "ViewParams":
        """Names the columns of a ``(B, columns())`` uniform tensor (views into it, no copy)."""
        fields = uniform.split(cls.widths(), dim=1)
        return cls(*(f if f.shape[1] > 1 else f.squeeze(1) for f in fields))

    @classmethod
    def draw(cls, batch: int, device: torch.device) -> "ViewParams":
        """Fresh parameters for ``batch`` samples on ``device``: one ``torch.rand`` call on the global RNG."""
        return cls.from_uniform(torch.rand(batch, cls.columns(), device=device))

    def narrow(self, start: int, stop: int) -> "ViewParams":
        """The parameters of samples ``start .. stop - 1`` (views, no copy)."""
        return ViewParams(*(field[start:stop] for field in self))
