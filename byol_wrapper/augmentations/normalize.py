"""The normalisation statistics: ImageNet's, and the defaults for every channel count (the one place they are held).

Default statistics (what :class:`~byol_wrapper.BYOL` uses when ``mean``/``std`` are left at their defaults):

* 3 channels: ImageNet's per-channel RGB statistics (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`), the
  normalisation of the paper's ResNets.
* 1 channel: the luminance equivalent of the ImageNet statistics, the ITU-R 601 luma weights
  ``(0.299, 0.587, 0.114)`` applied to the RGB mean and std: ``mean=(0.459,)``, ``std=(0.226,)``. This is what
  an ImageNet image turned grayscale by the augmentation's own grayscale op looks like, so a backbone whose
  first convolution was adapted from RGB (:func:`byol_wrapper.channels.adapt_first_conv`, timm's ``in_chans=1``)
  sees inputs on the scale it was built for.
* N channels (2, 4, 5, ...): the same luminance statistics for every channel. Nothing is known about what an
  arbitrary band holds (spectral band, fluorescence channel, depth), so every channel gets the one
  RGB-derived value rather than a guess; pass your data set's own per-channel ``mean``/``std`` when you know
  them.
"""

from __future__ import annotations

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LUMA_WEIGHTS", "default_normalization"]

#: Per-channel RGB mean of ImageNet, the normalization used by the paper's ResNets.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: Per-channel RGB standard deviation of ImageNet.
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: ITU-R 601 luma weights (R, G, B), the same as ``kornia.color.rgb_to_grayscale``.
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)


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
        return IMAGENET_MEAN, IMAGENET_STD
    mean = round(sum(w * m for w, m in zip(LUMA_WEIGHTS, IMAGENET_MEAN)), 3)
    std = round(sum(w * s for w, s in zip(LUMA_WEIGHTS, IMAGENET_STD)), 3)
    return (mean,) * channels, (std,) * channels
