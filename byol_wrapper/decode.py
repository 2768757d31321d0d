"""Fast image decoding for pretraining: the quickest decoder per format on the CPU, and batched JPEG decoding on CUDA.

What decodes what (measured by ``benchmarks/data_pipeline.py``, figures in ``benchmarks/RESULTS.md``):

* **JPEG, shorter side at least 2x the load size** (e.g. a 500x375 photo to 32 or 96 px): Pillow in *draft*
  mode, which makes libjpeg scale the DCT by 1/2, 1/4 or 1/8 while decoding (to no less than the load size),
  then an antialiased bilinear resize of the small result. It skips most of the inverse DCT and colour
  conversion work.
* **Other JPEGs** (e.g. 500x375 to 224 px): ``torchvision.io.decode_jpeg`` (libjpeg-turbo)
  straight into a tensor, centre crop as a view, and torch's antialiased uint8 bilinear resize (the AVX2 path),
  about 1.7x Pillow's decode + ``ImageOps.fit``.
* **Everything else** (PNG, TIFF, 16-bit, GIF, WebP, ...) goes through :func:`byol_wrapper.data._load_image`, the
  reference path, so formats only Pillow reads and any special handling there stay in one place.

All paths return what the reference returns: EXIF orientation applied, shorter side resized to ``load_size`` and
centre crop to ``load_size x load_size``, uint8 ``(C, S, S)``; the results differ from a full-size decode and
resize by 0.3-2 grey levels per pixel on average on photos, up to 5 on fine texture at 1/8 DCT scale
(``tests/test_decode.py``). Unreadable files raise, and
:class:`FastDecode` turns that into the ``None`` + warning that :func:`~byol_wrapper.data.collate_skip_none`
counts, as :class:`~byol_wrapper.data.ImageFolderDataset` does.

On CUDA, :class:`EncodedImages` has the DataLoader workers only *read* JPEG files (non-JPEG files are decoded in
the workers), and :class:`GPUDecodedBatches` decodes each batch with ``decode_jpeg(..., device="cuda")``
(nvJPEG) and resizes it on the device. :func:`resolve_decode` picks the path and prints one info line when the
GPU path was wanted but cannot be used.
"""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch.utils.data import Dataset

from . import data as _data

__all__ = [
    "DECODE_CHOICES",
    "EncodedImages",
    "FastDecode",
    "GPUDecodedBatches",
    "apply_orientation",
    "collate_encoded",
    "decode_image_file",
    "gpu_decode_error",
    "resolve_decode",
]

DECODE_CHOICES = ("auto", "cpu", "gpu")
"""Values of ``byol-train --decode``: auto (GPU decoding on CUDA, else CPU), cpu, gpu."""

_JPEG_MAGIC = b"\xff\xd8\xff"
_ORIENTATION_TAG = 0x0112


def _read_mode(mode: str) -> Any:
    from torchvision.io import ImageReadMode

    return ImageReadMode.RGB if mode == "RGB" else ImageReadMode.GRAY


def _orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of encoded JPEG bytes; 1 when absent or unreadable (header parse only)."""
    if b"Exif" not in data[:65536]:
        return 1
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            value = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
        return 1
    return value if 1 <= value <= 8 else 1


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Applies an EXIF orientation to a ``(C, H, W)`` tensor on any device, as ``PIL.ImageOps.exif_transpose``.

    Args:
        image: Image tensor ``(C, H, W)``.
        orientation: EXIF tag 0x0112 value (1 = upright, 2-8 = mirrored and/or rotated).

    Returns:
        The upright image (a view or a new tensor).
    """
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return image.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return image.transpose(-1, -2).flip(-2)
    return image


def _fit(image: torch.Tensor, load_size: int) -> torch.Tensor:
    """Centre square crop (a view) and antialiased bilinear resize to ``load_size``: ``ImageOps.fit`` in torch."""
    import torchvision.transforms.v2.functional as TF

    h, w = image.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[..., top : top + side, left : left + side]
    if side == load_size:
        return image.contiguous()
    if image.dtype == torch.uint8 and image.device.type == "cpu":
        return TF.resize(image, [load_size, load_size], antialias=True)  # the uint8 SIMD kernel
    out = TF.resize(image.float(), [load_size, load_size], antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _decode_jpeg_cpu(data: bytes, load_size: int, mode: str) -> torch.Tensor:
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        if min(w, h) >= 2 * load_size:  # a DCT scale of 1/2 or less fits: Pillow's draft decode is fastest
            # Draft to >= 1x the target. Drafting to >= 2x would bring fine texture (the fur of skimage's
            # "chelsea" at 32 px) from ~5 to ~1 grey level of a full-size decode, but costs 25% of the speed at
            # 32 px; other photos are within ~1.5 either way (tests/test_decode.py).
            img.draft(mode, (load_size, load_size))
            img = ImageOps.exif_transpose(img.convert(mode))
            img = ImageOps.fit(img, (load_size, load_size), method=getattr(Image, "Resampling", Image).BILINEAR)
            from torchvision.transforms.functional import pil_to_tensor

            return pil_to_tensor(img)
    from torchvision.io import decode_jpeg

    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    image = decode_jpeg(tensor, mode=_read_mode(mode), apply_exif_orientation=True)
    return _fit(image, load_size)


def decode_image_file(path: Union[str, Path], load_size: int, mode: str = "RGB", data: Optional[bytes] = None) -> torch.Tensor:
    """Decodes one file with the fastest decoder for its format (see the module docstring).

    Args:
        path: Image file.
        load_size: Side of the square result.
        mode: ``"RGB"`` or ``"L"``; other modes go to the reference decoder.
        data: The file's bytes if already read (JPEG only; other formats are read from ``path``).

    Returns:
        uint8 ``(C, load_size, load_size)``.

    Raises:
        Exception: whatever the decoder raises for an unreadable file (callers skip the file).
    """
    path = Path(path)
    if mode in ("RGB", "L"):
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        if data[:3] == _JPEG_MAGIC:
            return _decode_jpeg_cpu(data, load_size, mode)
    return _data._load_image(path, load_size, mode)


def _skip_warning(path: Path, exc: BaseException) -> None:
    warnings.warn(f"skipping unreadable image {str(path)!r}: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)


class FastDecode(Dataset):
    """Wraps an :class:`~byol_wrapper.data.ImageFolderDataset`, decoding its files with :func:`decode_image_file`.

    Same files, labels, output and skip-and-count behaviour (``None`` plus a warning for an unreadable file).

    Args:
        dataset: The folder dataset (its ``files``, ``labels``, ``load_size``, ``mode`` and ``warn`` are used).
    """

    def __init__(self, dataset: _data.ImageFolderDataset) -> None:
        self.dataset = dataset
        self.files, self.labels, self.classes = dataset.files, dataset.labels, dataset.classes
        self.root, self.load_size, self.mode = dataset.root, dataset.load_size, dataset.mode
        self.warn = getattr(dataset, "warn", True)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> _data.Sample:
        path = self.files[index]
        try:
            image = decode_image_file(path, self.load_size, self.mode)
        except Exception as exc:  # noqa: BLE001 - any decoding failure: skip the file, never crash training
            if self.warn:
                _skip_warning(path, exc)
            return None
        return image, self.labels[index]


# ---------------------------------------------------------------------------------------------- GPU decoding
Encoded = Optional[tuple[Union[tuple[torch.Tensor, int], torch.Tensor], int, str]]
"""``((jpeg_bytes, orientation) | decoded_image, label, path)`` or ``None`` for an unreadable file."""


class EncodedImages(FastDecode):
    """Like :class:`FastDecode`, but JPEG files are only read (bytes + EXIF orientation), for decoding on the GPU.

    Non-JPEG files (and JPEGs in a mode the GPU path does not decode) are decoded here, on the CPU.
    """

    def __getitem__(self, index: int) -> Encoded:  # type: ignore[override]
        path = self.files[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
            if self.mode in ("RGB", "L") and data[:3] == _JPEG_MAGIC:
                return (torch.frombuffer(bytearray(data), dtype=torch.uint8), _orientation(data)), self.labels[index], str(path)
            return decode_image_file(path, self.load_size, self.mode, data=data), self.labels[index], str(path)
        except Exception as exc:  # noqa: BLE001
            if self.warn:
                _skip_warning(path, exc)
            return None


def collate_encoded(batch: Sequence[Encoded]) -> tuple[list[Any], torch.Tensor, list[str], int]:
    """``(payloads, labels, paths, skipped)`` of a batch of :class:`EncodedImages` samples."""
    good = [s for s in batch if s is not None]
    labels = torch.tensor([int(s[1]) for s in good], dtype=torch.int64)
    return [s[0] for s in good], labels, [s[2] for s in good], len(batch) - len(good)


class GPUDecodedBatches:
    """Iterates ``(images, labels, skipped)`` from a DataLoader of :class:`EncodedImages` with :func:`collate_encoded`.

    JPEG payloads are decoded together by ``torchvision.io.decode_jpeg(list, device=device)`` (nvJPEG on CUDA),
    oriented and resized on the device; decoded payloads are moved there. A JPEG that the batched decode cannot
    handle is retried on the CPU and skipped (with a warning, counted in ``skipped``) only if that fails too.

    Args:
        loader: The DataLoader.
        load_size: Side of the square images.
        mode: ``"RGB"`` or ``"L"``.
        device: Where to decode (``cuda``; ``cpu`` works too and is what the CPU tests use).
        warn: Warn for each skipped file.
    """

    def __init__(self, loader: Any, load_size: int, mode: str, device: torch.device, warn: bool = True) -> None:
        self.loader, self.load_size, self.mode, self.device, self.warn = loader, load_size, mode, torch.device(device), warn

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        for payloads, labels, paths, skipped in self.loader:
            images, keep = self.decode(payloads, paths)
            yield images, labels[keep], skipped + (len(payloads) - len(keep))

    def decode(self, payloads: Sequence[Any], paths: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """Decodes one batch; returns ``(images (B, C, S, S) on the device, indices of the payloads kept)``."""
        from torchvision.io import decode_jpeg

        jpeg = [i for i, p in enumerate(payloads) if isinstance(p, tuple)]
        decoded: dict[int, torch.Tensor] = {}
        if jpeg:
            read_mode = _read_mode(self.mode)
            try:
                raw = decode_jpeg([payloads[i][0] for i in jpeg], mode=read_mode, device=self.device)
            except Exception:  # noqa: BLE001 - one bad file fails the whole batched call: decode one by one
                raw = [None] * len(jpeg)
            for i, image in zip(jpeg, raw):
                data, orientation = payloads[i]
                if image is None:
                    try:
                        image = decode_jpeg(data, mode=read_mode, device=self.device)
                    except Exception:  # noqa: BLE001
                        try:  # what nvJPEG does not support (e.g. some CMYK files) the CPU may still read
                            image = _decode_jpeg_cpu(bytes(data.numpy()), self.load_size, self.mode).to(self.device)
                            decoded[i] = image
                            continue
                        except Exception as exc:  # noqa: BLE001
                            if self.warn:
                                _skip_warning(Path(paths[i]), exc)
                            continue
                decoded[i] = _fit(apply_orientation(image, orientation), self.load_size)
        for i, p in enumerate(payloads):
            if not isinstance(p, tuple):
                decoded[i] = p.to(self.device, non_blocking=True)
        keep = sorted(decoded)
        if not keep:
            return torch.empty(0, 0, 0, 0, dtype=torch.uint8, device=self.device), keep
        return torch.stack([decoded[i] for i in keep]), keep


def gpu_decode_error(device: torch.device) -> Optional[str]:
    """Why batched JPEG decoding cannot run on ``device`` (``None`` when it can): decodes a tiny JPEG there."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the training device is {device.type}, not CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        from PIL import Image
        from torchvision.io import decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format="JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        decode_jpeg([data, data], device=device)
    except Exception as exc:  # noqa: BLE001 - no nvJPEG in this torchvision build, driver issue, ...
        return f"torchvision.io.decode_jpeg on {device} failed ({type(exc).__name__}: {exc})"
    return None


def resolve_decode(requested: str, device: torch.device, say: Optional[Callable[[str], None]] = None) -> str:
    """The decoding path to use, ``"gpu"`` or ``"cpu"``, for ``byol-train --decode``.

    ``auto`` means the GPU on CUDA when nvJPEG works there; ``gpu`` asks for it explicitly. Where the GPU path
    was wanted (``gpu``, or ``auto`` on a CUDA device) but cannot be used, ``say`` gets one info line and the CPU
    path is returned.

    Args:
        requested: One of :data:`DECODE_CHOICES`.
        device: The training device.
        say: Where the info line goes (default: stderr).

    Raises:
        ValueError: ``requested`` is not one of :data:`DECODE_CHOICES`.
    """
    if requested not in DECODE_CHOICES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_CHOICES)}, got {requested!r}")
    device = torch.device(device)
    if requested == "cpu" or (requested == "auto" and device.type != "cuda"):
        return "cpu"
    reason = gpu_decode_error(device)
    if reason is None:
        return "gpu"
    (say or (lambda m: print(m, file=sys.stderr)))(f"info: decoding images on the CPU: GPU JPEG decoding is unavailable ({reason})")
    return "cpu"
