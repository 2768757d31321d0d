"""The image input contract: which tensors are images, and their conversion to float32 in ``[0, 1]``.

A batch of images is a 4-D ``(B, C, H, W)`` tensor, of an integer dtype scaled by its range (``uint8``,
``uint16``, ``int16``) or floating point with values in ``[0, 1]``. :func:`check_images` validates that once;
:func:`float32_image` converts without checking, for callers that have checked already (the learner checks
its input once per forward, and the views it runs take that batch as it is).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["INTEGER_IMAGE_DTYPES", "check_image_dtype", "check_images", "float32_image", "to_float_image"]

#: Integer image dtypes accepted like uint8 and scaled by their range (torch.uint16 exists from torch 2.3).
INTEGER_IMAGE_DTYPES: tuple[torch.dtype, ...] = tuple(
    d for d in (torch.uint8, getattr(torch, "uint16", None), torch.int16) if d is not None
)


def check_image_dtype(x: torch.Tensor) -> None:
    """Raise ``TypeError`` unless the tensor ``x`` is of an integer image dtype or floating point."""
    if x.dtype not in INTEGER_IMAGE_DTYPES and not x.dtype.is_floating_point:
        raise TypeError(
            f"x must be uint8, uint16 or int16 (scaled by the dtype's range) or floating point (values in [0, 1]); "
            f"got dtype {x.dtype}. Convert it first, e.g. x.float() / x.max() or x.to(torch.uint8)"
        )


def check_images(x: Any) -> None:
    """Raise unless ``x`` is a 4-D tensor of an integer image dtype or floating point (see :func:`to_float_image`).

    Raises:
        TypeError: ``x`` is not a tensor, or its dtype is neither one of those integers nor floating point.
        ValueError: ``x`` is not 4-D.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of images of shape (B, C, H, W); got {type(x).__name__}")
    if x.ndim != 4:
        hint = "; add a batch dimension with x.unsqueeze(0)" if x.ndim == 3 else ""
        raise ValueError(f"x must be a 4-D tensor of shape (B, C, H, W); got shape {tuple(x.shape)}{hint}")
    check_image_dtype(x)


def float32_image(x: torch.Tensor) -> torch.Tensor:
    """:func:`to_float_image` without the checks, for a batch :func:`check_images` (or the caller) has validated."""
    if x.dtype in INTEGER_IMAGE_DTYPES:
        # Scaled by the dtype's range: uint8 / 255, uint16 / 65535, int16 (x + 32768) / 65535.
        info = torch.iinfo(x.dtype)
        x = x.to(torch.float32)
        if info.min:
            x = x.sub_(info.min)
        return x.div_(float(info.max - info.min))
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def to_float_image(x: torch.Tensor) -> torch.Tensor:
    """Convert a batch of images to float32 in ``[0, 1]``.

    Integer images are scaled by their dtype's range: ``uint8`` divided by 255, ``uint16`` (16-bit PNG/TIFF)
    divided by 65535, ``int16`` mapped from ``[-32768, 32767]`` to ``[0, 1]``. Floating-point images of any
    precision are cast to float32 and are assumed to hold values in ``[0, 1]`` already (they are not rescaled
    or clamped). A float32 input is returned as is, without a copy.

    Args:
        x: Images of shape ``(B, C, H, W)``, ``uint8``, ``uint16``, ``int16`` or floating point.

    Returns:
        The images as float32, same shape and device.

    Raises:
        TypeError: If ``x`` is not a tensor, or its dtype is neither one of those integers nor floating point.
        ValueError: If ``x`` is not 4-D.
    """
    check_images(x)
    return float32_image(x)
