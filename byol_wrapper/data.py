"""Image-folder data loading for pretraining: decode with PIL, resize to a fixed size, skip unreadable files.

The datasets return ``uint8`` tensors ``(C, S, S)`` of one fixed load size so that they batch; the BYOL
augmentations run later, inside the learner, on the training device. Files that cannot be decoded (corrupt,
truncated, not an image) are skipped with a warning: the dataset returns ``None`` for them and
:func:`collate_skip_none` drops the ``None`` entries and returns how many it dropped alongside the batch, so the
count reaches the main process even when the decoding runs in DataLoader worker processes.

Example:
    >>> ds = ImageFolderDataset("data/train", load_size=32)            # doctest: +SKIP
    >>> loader = DataLoader(ds, batch_size=256, collate_fn=collate_skip_none)  # doctest: +SKIP
    >>> for images, labels, skipped in loader: ...                        # doctest: +SKIP
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import Dataset, Sampler

from .image_io import ARRAY_EXTENSIONS, load_image
from .utils.checks import check_choice, check_dir, check_int

__all__ = [
    "IMAGE_EXTENSIONS",
    "EpochSampler",
    "ImageFolderDataset",
    "LabelledImageFolder",
    "collate_pairs",
    "collate_skip_none",
    "find_images",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""File extensions (case-insensitive) that are treated as images."""

Sample = Optional[tuple[torch.Tensor, int]]


def _is_image(name: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> bool:
    return name.lower().endswith(tuple(extensions))


def _scan(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Walks ``root`` following links, each real folder once; returns the images and what was skipped (and why)."""
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    try:
        st = root.stat()
        seen = {(st.st_dev, st.st_ino)}
    except OSError:
        seen = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:  # cannot be listed (permissions, I/O error): counted like an unreadable file
            skipped.append((folder, f"folder cannot be listed ({exc.strerror or exc})"))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                st = entry.stat()  # follows links; no system call for plain entries on most file systems
            except OSError as exc:
                if _is_image(entry.name, extensions):
                    skipped.append((Path(entry.path), f"cannot stat ({exc.strerror or exc}; a broken link?)"))
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key not in seen:  # a link loop, or a second link to a folder already listed: once only
                    seen.add(key)
                    subfolders.append(Path(entry.path))
            elif _is_image(entry.name, extensions):
                if stat.S_ISREG(st.st_mode):
                    found.append(Path(entry.path))
                else:  # a FIFO, socket or device would block or never end when decoded
                    skipped.append((Path(entry.path), "not a regular file"))
        stack.extend(reversed(subfolders))
    return sorted(found), skipped


def find_images(
    root: str | os.PathLike[str], extensions: Sequence[str] = IMAGE_EXTENSIONS, *, warn: bool = True
) -> list[Path]:
    """All image files under ``root``, recursively, sorted; hidden files and folders are ignored.

    Links are followed, but each real folder is listed once (a link loop cannot hang the scan or repeat images).
    Entries named like images that are not regular files (FIFOs, sockets, devices: decoding them would block) and
    subfolders that cannot be listed are skipped, counted in one warning.

    Args:
        root: Folder to scan.
        extensions: Lower-case extensions to keep (default :data:`IMAGE_EXTENSIONS`).
        warn: Emit the warning about skipped entries.

    Returns:
        Sorted paths of the regular files whose extension is in ``extensions`` (links are followed, each real
        folder once).

    Raises:
        TypeError: ``root`` is not a path.
        ValueError: ``root`` does not exist or is not a folder.
    """
    return _scan_and_warn(check_dir("root", root), warn, extensions)[0]


def _scan_and_warn(
    root: Path, warn: bool, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[list[Path], list[tuple[Path, str]]]:
    found, skipped = _scan(root, extensions)
    if skipped and warn:
        shown = "; ".join(f"{str(p)!r}: {why}" for p, why in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        noun = "entry" if len(skipped) == 1 else "entries"
        warnings.warn(f"skipped {len(skipped)} {noun} under {str(root)!r}: {shown}{more}", RuntimeWarning, stacklevel=3)
    return found, skipped


def _class_of(root: Path, path: Path) -> str | None:
    """The top-level subfolder of ``path`` under ``root`` (its class), or ``None`` for a file directly in root."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def _exif_upright(img: Any) -> Any:
    """The image turned as its EXIF orientation tag says (phone photos), or ``img`` itself when upright already."""
    from PIL import ImageOps

    try:
        orientation = img.getexif().get(0x0112, 1)  # 0x0112: Orientation
    except Exception:  # noqa: BLE001 - a broken EXIF block: keep the pixels as stored
        return img
    return img if orientation in (None, 1) else ImageOps.exif_transpose(img)


def _load_image(path: Path, load_size: int, mode: str) -> torch.Tensor:
    from PIL import Image, ImageOps
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(path) as img:
        img.draft(mode, (load_size, load_size))  # JPEG: decode at a reduced scale that is still >= load_size
        img = _exif_upright(img)
        img = img.convert(mode)  # decodes the whole file: truncated or corrupt data raises here
        img = ImageOps.fit(img, (load_size, load_size), method=getattr(Image, "Resampling", Image).BILINEAR)
    return pil_to_tensor(img)


class ImageFolderDataset(Dataset):
    """Every image under a folder (ImageFolder tree or flat), as ``uint8`` tensors of one size.

    Images are converted to ``mode`` (RGB by default), resized so the shorter side is ``load_size`` and centre
    cropped to ``load_size x load_size`` (aspect ratio kept). Labels are the index of the top-level class
    subfolder (sorted) when there is one, else ``-1``; pretraining ignores them.

    Args:
        root: Folder scanned recursively for :data:`IMAGE_EXTENSIONS`.
        load_size: Side of the square uint8 images returned.
        mode: PIL mode, ``"RGB"`` (3 channels) or ``"L"`` (1 channel).
        warn: Emit a warning for each unreadable file (and one for the entries the scan skipped, see
            :func:`find_images`; they are listed in ``scan_skipped``).
        channels: Decode at full precision to this many channels instead (16-bit PNG/TIFF, multi-page TIFF,
            ``.npy`` files, which are then scanned too): the images are float32 in ``[0, 1]``; see
            :mod:`byol_wrapper.image_io`. ``None`` (default): 8-bit ``mode`` decoding, uint8 images.

    Raises:
        TypeError: ``root`` is not a path.
        ValueError: ``root`` is missing or holds no image, or ``load_size`` is not a positive int.
    """

    def __init__(
        self, root: str | os.PathLike[str], load_size: int, *, mode: str = "RGB", warn: bool = True, channels: int | None = None
    ) -> None:
        self.root = check_dir("root", root)
        self.load_size = check_int("load_size", load_size, 1, error=ValueError)
        mode = check_choice("mode", mode, ("RGB", "L"))
        if channels is not None:
            channels = check_int("channels (or None)", channels, 1, error=ValueError)
        self.mode = mode
        self.channels = channels
        self.warn = bool(warn)
        extensions = IMAGE_EXTENSIONS if channels is None else IMAGE_EXTENSIONS + ARRAY_EXTENSIONS
        self.files, self.scan_skipped = _scan_and_warn(self.root, self.warn, extensions)  # scan_skipped: [(path, why)]
        if not self.files:
            raise ValueError(
                f"root {str(self.root)!r} contains no image files (extensions {', '.join(IMAGE_EXTENSIONS)}); "
                "pass a folder of images or class subfolders of images"
            )
        tops = [_class_of(self.root, p) for p in self.files]
        self.classes = sorted({c for c in tops if c is not None})
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [-1 if c is None else index[c] for c in tops]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        """``(image, label)`` with a uint8 ``(C, load_size, load_size)`` image, or ``None`` if unreadable."""
        path = self.files[index]
        try:
            if self.channels is None:
                image = _load_image(path, self.load_size, self.mode)
            else:
                image = load_image(path, self.load_size, self.channels)
        except Exception as exc:  # noqa: BLE001 - any decoding failure: skip the file, never crash training
            if self.warn:
                warnings.warn(f"skipping unreadable image {str(path)!r}: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
            return None
        return image, self.labels[index]


class LabelledImageFolder(ImageFolderDataset):
    """A labelled ImageFolder tree ``root/<class>/**/image``, for evaluation.

    Args:
        root: Folder with one subfolder per class.
        load_size: Side of the square uint8 images returned.
        classes: Class names to use (the index is the label), e.g. the train split's classes for the test split;
            defaults to the sorted subfolders that contain images.
        mode: PIL mode.
        warn: Emit a warning for each unreadable file.
        channels: Full-precision decoding to this many channels; see :class:`ImageFolderDataset`.

    Raises:
        ValueError: ``root`` is missing or empty, holds images outside class subfolders only, or a class
            subfolder is not in ``classes``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        load_size: int,
        *,
        classes: Sequence[str] | None = None,
        mode: str = "RGB",
        warn: bool = True,
        channels: int | None = None,
    ) -> None:
        super().__init__(root, load_size, mode=mode, warn=warn, channels=channels)
        keep = [(p, c) for p in self.files if (c := _class_of(self.root, p)) is not None]
        if not keep:
            raise ValueError(
                f"root {str(self.root)!r} has no class subfolders with images; a labelled folder must look like "
                "root/<class>/<image>"
            )
        found = sorted({c for _, c in keep})
        if classes is None:
            classes = found
        classes = list(classes)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"root {str(self.root)!r} has class folders {unknown} that are not among the train classes {classes}")
        index = {c: i for i, c in enumerate(classes)}
        self.classes = classes
        self.files = [p for p, _ in keep]
        self.labels = [index[c] for _, c in keep]


def collate_skip_none(batch: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stacks the readable samples of a batch and counts the unreadable ones.

    Args:
        batch: Samples from :class:`ImageFolderDataset`; ``None`` marks an unreadable file.

    Returns:
        ``(images, labels, skipped)``: uint8 images ``(B, C, S, S)`` (``B`` may be 0), int64 labels ``(B,)`` and
        the number of ``None`` samples dropped.
    """
    good = [s for s in batch if s is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0, 0, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), skipped
    images = torch.stack([s[0] for s in good])
    labels = torch.tensor([int(s[1]) for s in good], dtype=torch.int64)
    return images, labels, skipped


def collate_pairs(batch: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`collate_skip_none` without the count: ``(images, labels)``, for evaluation loaders."""
    images, labels, _ = collate_skip_none(batch)
    return images, labels


class EpochSampler(Sampler[int]):
    """Deterministic shuffling per epoch, resumable in the middle of an epoch, optionally sharded over ranks.

    The order of epoch ``e`` is ``torch.randperm(n)`` drawn from a private generator seeded with
    ``(seed, e)``, so it never touches (or depends on) the global RNG. :meth:`set_epoch` with ``start`` skips
    the first ``start`` indices of that order; with ``start`` a multiple of the batch size and
    ``drop_last=True``, the remaining batches are exactly those the uninterrupted epoch would have produced.

    With ``num_replicas > 1`` (distributed training) every rank computes the same order and takes every
    ``num_replicas``-th index of what remains after ``start``, beginning at its ``rank``; the tail that does not
    divide evenly is dropped, so all ranks yield the same number of indices. A rank's ``k``-th batch of ``b``
    indices and the other ranks' ``k``-th batches then together hold exactly the ``k``-th batch of
    ``b * num_replicas`` indices of the unsharded order: the same global batches as one process, whatever the
    number of ranks.

    Args:
        num_samples: Dataset length.
        seed: Base seed.
        shuffle: ``False`` keeps the dataset order.
        num_replicas: Number of ranks sharing the data set (1: no sharding).
        rank: This process's rank, in ``[0, num_replicas)``.

    Raises:
        ValueError: ``num_samples`` or ``num_replicas`` is not a positive int, or ``rank`` is out of range.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, *, num_replicas: int = 1, rank: int = 0) -> None:
        num_samples = check_int("num_samples", num_samples, 1, error=ValueError)
        num_replicas = check_int("num_replicas (the world size)", num_replicas, 1, error=ValueError)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an int in [0, {num_replicas}) (num_replicas={num_replicas}), got {rank!r}")
        self.num_samples = num_samples
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch whose order is produced next, and how many of its leading indices to skip."""
        if start < 0 or start > self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.epoch = int(epoch)
        self.start = int(start)

    def order(self, epoch: int) -> list[int]:
        """The full (unsharded) index order of ``epoch``."""
        if not self.shuffle:
            return list(range(self.num_samples))
        gen = torch.Generator()
        gen.manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(self.num_samples, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        rest = self.order(self.epoch)[self.start :]
        if self.num_replicas > 1:
            rest = rest[: len(rest) - len(rest) % self.num_replicas][self.rank :: self.num_replicas]
        return iter(rest)

    def __len__(self) -> int:
        return (self.num_samples - self.start) // self.num_replicas
