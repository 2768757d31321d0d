"""Channel counts other than RGB: default normalisation statistics and first-convolution adaptation.

The default statistics per channel count (:func:`default_normalization`, :data:`LUMA_WEIGHTS`) are defined, with
ImageNet's, in :mod:`byol_wrapper.augmentations.normalize` and re-exported here: ImageNet's RGB statistics for 3
channels, their luminance equivalent (``mean=(0.459,)``, ``std=(0.226,)``) for every channel otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .augmentations.normalize import LUMA_WEIGHTS, default_normalization

__all__ = ["LUMA_WEIGHTS", "adapt_first_conv", "default_normalization"]


def _adapt_weight(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """timm's ``adapt_input_conv`` rule: 1 channel sums the RGB filters; N repeats them, scaled by 3 / N."""
    old = weight.shape[1]
    if channels == old:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = int(math.ceil(channels / old))
    return weight.repeat(1, repeat, 1, 1)[:, :channels] * (old / channels)


def adapt_first_conv(model: nn.Module, channels: int) -> nn.Module:
    """Makes the first ``nn.Conv2d`` of ``model`` take ``channels`` input channels, as timm's ``in_chans`` does.

    The convolution is replaced by one with the same settings and ``channels`` inputs, whose weight is derived
    from the old one by timm's ``adapt_input_conv`` rule (1 channel: the RGB filters summed; N channels: the
    filters repeated and scaled by ``3 / N``), so the output scale at initialisation is kept. Used by
    ``byol-train --channels`` on the built-in (torchvision) backbones; modifies ``model`` in place.

    Args:
        model: The network; its first ``nn.Conv2d`` (in ``named_modules()`` order) is adapted.
        channels: The new number of input channels.

    Returns:
        ``model``.

    Raises:
        ValueError: ``channels`` is not a positive int, or ``model`` has no ``nn.Conv2d``, or a grouped one.
    """
    if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            break
    else:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d whose input channels could be set to {channels}")
    if conv.in_channels == channels:
        return model
    if conv.groups != 1:
        raise ValueError(f"the first convolution {name!r} of {type(model).__name__} is grouped; cannot adapt it to {channels} channels")
    new = nn.Conv2d(
        channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(_adapt_weight(conv.weight, channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    return model
