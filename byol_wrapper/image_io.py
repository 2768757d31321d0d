"""Decoding of grayscale, 16-bit and multi-channel images at full precision (``byol-train --channels``).

:func:`load_image` returns a float32 ``(C, S, S)`` tensor in ``[0, 1]`` with exactly ``channels`` channels:

* **PNG** through ``torchvision.io.decode_png`` (8- and 16-bit, grayscale, grayscale+alpha, RGB, RGBA), so a
  16-bit file keeps its 65536 levels (Pillow would reduce 16-bit RGB to 8 bits).
* **TIFF** through ``tifffile`` when installed (``pip install byol-wrapper[tiff]``): multi-page files (one page
  per channel) and multi-sample files (``(H, W, S)``) give N channels, at any integer or float bit depth.
  Without ``tifffile``, single-page TIFFs are read with Pillow (8/16-bit grayscale, 8-bit RGB/RGBA).
* **.npy** arrays ``(H, W)``, ``(C, H, W)`` or ``(H, W, C)`` (the axis whose length is ``channels`` is the
  channel axis; if neither end matches, the shorter end axis).
* every other format (JPEG, BMP, WebP, ...) through Pillow, 8-bit.

Scaling: integer data are divided by their dtype's range (``uint8`` / 255, ``uint16`` / 65535, ``int16``
shifted by 32768 first, like :func:`byol_wrapper.augmentations.to_float_image`); floating-point data are
taken as already in ``[0, 1]`` and only clamped.

Channel counts that differ from ``channels`` are converted where the meaning is clear, with a warning
naming the file: grayscale to ``channels`` copies, RGB to grayscale (ITU-R 601 luma), an alpha channel
dropped (grayscale+alpha, RGBA). Any other mismatch raises :class:`ChannelMismatchError` naming the file; the
dataset then skips that file with a warning like an unreadable one, so training never stops mid-epoch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ARRAY_EXTENSIONS", "ChannelMismatchError", "load_image", "read_array"]

#: Extensions read as raw arrays in addition to the image extensions when ``channels`` is set.
ARRAY_EXTENSIONS = (".npy",)

_LUMA = (0.299, 0.587, 0.114)


class ChannelMismatchError(ValueError):
    """An image's channel count cannot be converted to the requested one."""


def _scale(array: np.ndarray) -> torch.Tensor:
    """A numpy image to float32 in [0, 1], integers scaled by their dtype's range."""
    if array.dtype == np.bool_:
        return torch.from_numpy(array.astype(np.float32))
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        out = (array.astype(np.float64) - info.min) / float(info.max - info.min)
        return torch.from_numpy(out.astype(np.float32))
    if np.issubdtype(array.dtype, np.floating):
        return torch.from_numpy(np.clip(array.astype(np.float32), 0.0, 1.0))
    raise ValueError(f"unsupported array dtype {array.dtype}; use integer or floating-point pixels")


def _to_chw(array: np.ndarray, channels: int) -> np.ndarray:
    """``(H, W)``, ``(C, H, W)`` or ``(H, W, C)`` to ``(C, H, W)``."""
    array = np.squeeze(array) if array.ndim > 3 else array
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D image array, got shape {array.shape}")
    if array.shape[0] == channels:
        return array
    if array.shape[-1] == channels:
        return np.moveaxis(array, -1, 0)
    return array if array.shape[0] <= array.shape[-1] else np.moveaxis(array, -1, 0)


def _read_png(path: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_png, read_file

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        image = decode_png(read_file(str(path)), mode=ImageReadMode.UNCHANGED)  # uint8, or uint16 for 16-bit files
    if image.dtype == torch.uint8:
        return image.to(torch.float32).div_(255.0)
    return image.to(torch.float32).div_(65535.0)


def _read_pil(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        if img.mode.startswith("I;16"):
            return _scale(np.asarray(img, dtype=np.uint16))[None]
        if img.mode == "I":  # 32-bit integer mode, how Pillow presents most 16-bit grayscale files
            return torch.from_numpy(np.clip(np.asarray(img, dtype=np.float64) / 65535.0, 0.0, 1.0).astype(np.float32))[None]
        if img.mode == "F":
            return _scale(np.asarray(img, dtype=np.float32))[None]
        mode = {"1": "L", "L": "L", "LA": "LA", "RGBA": "RGBA"}.get(img.mode, "RGB")
        array = np.asarray(img.convert(mode))
    return _scale(_to_chw(array, array.shape[-1] if array.ndim == 3 else 1))


def read_array(path: str | Path, channels: int) -> torch.Tensor:
    """Decodes ``path`` to a float32 ``(C', H, W)`` tensor in ``[0, 1]``, ``C'`` the file's own channel count.

    Args:
        path: Image or ``.npy`` file.
        channels: The wanted channel count (resolves the layout of 3-D arrays).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _scale(_to_chw(np.load(path, allow_pickle=False), channels))
    if suffix == ".png":
        return _read_png(path)
    if suffix in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError:
            return _read_pil(path)
        return _scale(_to_chw(tifffile.imread(path), channels))
    return _read_pil(path)


def _convert_channels(image: torch.Tensor, channels: int, path: Path) -> torch.Tensor:
    have = original = image.shape[0]
    if have == channels:
        return image
    if have in (2, 4) and have - 1 in (1, 3) and (channels == have - 1 or channels in (1, 3)):
        image = image[:-1]  # grayscale+alpha or RGBA: drop the alpha channel
        have -= 1
    if have == channels:
        how = "dropped its alpha channel"
    elif have == 1:
        image = image.expand(channels, -1, -1).contiguous()
        how = f"copied its single channel {channels} times"
    elif have == 3 and channels == 1:
        weights = torch.tensor(_LUMA, dtype=image.dtype).view(3, 1, 1)
        image = (image * weights).sum(dim=0, keepdim=True)
        how = "converted RGB to grayscale (ITU-R 601 luma)"
    else:
        raise ChannelMismatchError(
            f"{str(path)!r} has {original} channels, not the {channels} of --channels; convert it or remove it from the folder"
        )
    warnings.warn(f"{str(path)!r} has {original} channel(s), not the {channels} of --channels: {how}", RuntimeWarning, stacklevel=3)
    return image


def _fit(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bilinear, antialiased) and centre-crop to ``size x size``."""
    _, h, w = image.shape
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[:, top : top + size, left : left + size].clamp_(0.0, 1.0).contiguous()


def load_image(path: str | Path, load_size: int, channels: int) -> torch.Tensor:
    """Decodes ``path`` at full precision to a float32 ``(channels, load_size, load_size)`` tensor in ``[0, 1]``.

    The shorter side is resized to ``load_size`` and the centre cropped (aspect ratio kept).

    Raises:
        ChannelMismatchError: the file's channel count cannot be converted (see the module docstring).
        Exception: any decoding error (the dataset skips the file with a warning).
    """
    path = Path(path)
    image = _convert_channels(read_array(path, channels), channels, path)
    return _fit(image, load_size)
