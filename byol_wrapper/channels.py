"""Channel counts other than RGB: default normalisation statistics and first-convolution adaptation.

Default statistics (what :class:`~byol_wrapper.BYOL` uses when ``mean``/``std`` are left at their defaults):

* 3 channels: ImageNet's per-channel RGB statistics (:data:`~byol_wrapper.augmentations.IMAGENET_MEAN`,
  :data:`~byol_wrapper.augmentations.IMAGENET_STD`).
* 1 channel: the luminance equivalent of the ImageNet statistics, the ITU-R 601 luma weights
  ``(0.299, 0.587, 0.114)`` applied to the RGB mean and std: ``mean=(0.459,)``, ``std=(0.226,)``. This is what
  an ImageNet image turned grayscale by the augmentation's own grayscale op looks like, so a backbone whose
  first convolution was adapted from RGB (:func:`adapt_first_conv`, timm's ``in_chans=1``) sees inputs on the
  scale it was built for.
* N channels (2, 4, 5, ...): the same luminance statistics for every channel. Nothing is known about what an
  arbitrary band holds (spectral band, fluorescence channel, depth), so every channel gets the one
  RGB-derived value rather than a guess; pass your data set's own per-channel ``mean``/``std`` when you know
  them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LUMA_WEIGHTS", "adapt_first_conv", "default_normalization"]

#: ITU-R 601 luma weights (R, G, B), the same as ``kornia.color.rgb_to_grayscale``.
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def default_normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The default ``(mean, std)`` for images of ``channels`` channels (see the module docstring).

    Args:
        channels: Number of input channels, a positive int.

    Returns:
        ``(mean, std)``, one value per channel.

    Raises:
        ValueError: ``channels`` is not a positive int.
    """
    if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    if channels == 3:
        return _IMAGENET_MEAN, _IMAGENET_STD
    mean = round(sum(w * m for w, m in zip(LUMA_WEIGHTS, _IMAGENET_MEAN)), 3)
    std = round(sum(w * s for w, s in zip(LUMA_WEIGHTS, _IMAGENET_STD)), 3)
    return (mean,) * channels, (std,) * channels


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
