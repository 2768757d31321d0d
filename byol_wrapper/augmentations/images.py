"""The image input contract: which tensors are images, and their conversion to float32 in ``[0, 1]``.

A batch of images is a 4-D ``(B, C, H, W)`` tensor, of an integer dtype scaled by its range (``uint8``,
``uint16``, ``int16``) or floating point with values in ``[0, 1]``. :func:`check_images` validates that once;
:func:`float32_image` converts without checking, for callers that have checked already (the learner checks
its input once per forward, and the views it runs take that batch as it is).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

__all__ = [
    "INTEGER_IMAGE_DTYPES", "check_image_dtype", "check_images", "float32_image", "not_a_tensor_error", "to_float_image",
]

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


def _is_pil_image(x: Any) -> bool:
    image = sys.modules.get("PIL.Image")  # not imported here: a PIL image means PIL is loaded already
    return image is not None and isinstance(x, image.Image)


def _is_ndarray(x: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(x, np.ndarray)


def _pil_conversion(img: Any, channels: int | None, many: bool) -> str:
    bands = len(img.getbands())
    convert = ""
    if channels is not None and bands != channels and channels in (1, 3):
        convert = '.convert("L")' if channels == 1 else '.convert("RGB")'
    fn = "torchvision.transforms.functional.pil_to_tensor"
    if many:
        code, note = f"torch.stack([{fn}(img{convert}) for img in images])", "uint8 (B, C, H, W); images of one size"
    else:
        code, note = f"{fn}(img{convert}).unsqueeze(0)", "uint8 (1, C, H, W)"
    return (
        f"convert with {code} ({note}), or give the dataset transforms.PILToTensor() so that the DataLoader's "
        "batches are (B, C, H, W) uint8 tensors"
    )


def _channels_axis(shape: tuple[int, ...], channels: int | None) -> str:
    """``"first"`` or ``"last"``: where the channels of a ``(C, H, W)``/``(H, W, C)`` array most likely are."""
    first, last = shape[0], shape[-1]
    if channels is not None and (first == channels) != (last == channels):
        return "first" if first == channels else "last"
    return "last" if last <= 4 or last < first else "first"  # NumPy/OpenCV/PIL images are usually (H, W, C)


def _ndarray_conversion(shape: tuple[int, ...], channels: int | None, many: bool) -> str:
    """The code turning a NumPy array of this shape (of one image, or a batch) into a ``(B, C, H, W)`` tensor."""
    src = "torch.from_numpy(np.stack(arrays))" if many else "torch.from_numpy(arr)"
    if len(shape) == 2:  # one grayscale image (H, W)
        return f"{src}[:, None]" if many else f"{src}[None, None]"
    if len(shape) == 3 and not many and channels == 1 and 1 not in (shape[0], shape[-1]):
        return f"{src}.unsqueeze(1)"  # a batch of grayscale images (B, H, W)
    if len(shape) == 3:
        if _channels_axis(shape, channels) == "last":
            return f"{src}.permute(0, 3, 1, 2)" if many else f"{src}.permute(2, 0, 1).unsqueeze(0)"
        return src if many else f"{src}.unsqueeze(0)"
    if len(shape) == 4:  # a batch (B, H, W, C) or (B, C, H, W), or a list of them
        src = "torch.from_numpy(np.concatenate(arrays))" if many else src
        return f"{src}.permute(0, 3, 1, 2)" if _channels_axis(shape[1:], channels) == "last" else src
    return f"{src}, reshaped to (B, C, H, W)"


def not_a_tensor_error(x: Any, channels: int | None = None) -> TypeError:
    """The ``TypeError`` for images that are not a tensor, with the conversion for PIL images and NumPy arrays.

    Args:
        x: What was given: a PIL image, a NumPy array, a list or tuple of them (or of tensors), or anything else.
        channels: The channel count expected, if known; it picks the channel axis of an array and the PIL mode.
    """
    base = "x must be a torch.Tensor of images of shape (B, C, H, W)"
    many = isinstance(x, (list, tuple)) and len(x) > 0
    item = x[0] if many else x
    kind = f"a {type(x).__name__} of {len(x)} " if many else "a "
    if _is_pil_image(item):
        size = f"{item.size[0]}x{item.size[1]} pixels"
        what = f"{kind}PIL image{'s' if many else ''} (mode {item.mode!r}, {size})"
        return TypeError(f"{base}; got {what}: {_pil_conversion(item, channels, many)}")
    if _is_ndarray(item):
        shape = tuple(int(s) for s in item.shape)
        what = f"{kind}NumPy array{'s' if many else ''} (shape {shape}, dtype {item.dtype})"
        code = _ndarray_conversion(shape, channels, many)
        if not many and any(st < 0 for st in item.strides):  # a flipped view: torch.from_numpy refuses it
            code = code.replace("torch.from_numpy(arr)", "torch.from_numpy(np.ascontiguousarray(arr))")
        hint = f"convert with {code}" + (" (channels first, as torch's layers expect)" if "permute" in code else "")
        if item.dtype.kind != "f" and str(item.dtype) not in ("uint8", "uint16", "int16"):
            hint += "; then make the dtype uint8, uint16 or float in [0, 1] (e.g. .float() / x.max())"
        return TypeError(f"{base}; got {what}: {hint}")
    if many and isinstance(item, torch.Tensor):
        return TypeError(
            f"{base}; got {kind}tensors: stack them with torch.stack(x) (one image (C, H, W) each) or torch.cat(x)"
        )
    return TypeError(f"{base}; got {type(x).__name__}")


def check_images(x: Any) -> None:
    """Raise unless ``x`` is a 4-D tensor of an integer image dtype or floating point (see :func:`to_float_image`).

    Raises:
        TypeError: ``x`` is not a tensor, or its dtype is neither one of those integers nor floating point.
        ValueError: ``x`` is not 4-D.
    """
    if not isinstance(x, torch.Tensor):
        raise not_a_tensor_error(x)
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
