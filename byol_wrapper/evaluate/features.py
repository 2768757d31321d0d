"""Feature extraction: run a frozen encoder over a data set once and return ``(features, labels)`` on the CPU.

Also the checks shared by the evaluations of :mod:`byol_wrapper.evaluate` (labels, precomputed features, the
device they compute on).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..extractor import pool_features, preserved_state
from ..utils.checks import check_device, check_int

__all__ = ["extract_features"]

DeviceLike = Union[str, torch.device, None]
"""Anything accepted as a device: a string such as ``"cuda:0"``, a
:class:`torch.device`, or ``None`` for the default."""

DataLike = Union[Dataset, DataLoader, Tuple[torch.Tensor, torch.Tensor]]
"""Accepted data sources: a ``Dataset`` of ``(image, label)`` pairs, a
``DataLoader`` of ``(images, labels)`` batches or an ``(images, labels)``
tuple of tensors."""


# ---------------------------------------------------------------------------
# Checks shared by the evaluations
# ---------------------------------------------------------------------------


def _evaluation_device(
    device: DeviceLike, encoder: Any = None, features: torch.Tensor | None = None
) -> torch.device:
    """The device an evaluation computes on.

    Args:
        device: Explicit device, or None for the default.
        encoder: The encoder (may be None or any callable).
        features: Precomputed features, used when there is no encoder.

    Returns:
        ``device`` if given; otherwise the device of the encoder's first
        parameter (or buffer) when it is an ``nn.Module``; otherwise, with
        ``encoder=None``, the device of ``features``; otherwise CPU.

    Raises:
        TypeError: If ``device`` cannot be interpreted as a torch device.
    """
    explicit = check_device("device", device)
    if explicit is not None:
        return explicit
    if encoder is None and features is not None:
        return features.device
    if isinstance(encoder, nn.Module):
        for tensor in encoder.parameters():
            return tensor.device
        for tensor in encoder.buffers():
            return tensor.device
    return torch.device("cpu")




def _as_labels(labels: Any, n: int, name: str) -> torch.Tensor:
    """Converts labels to a 1-D int64 CPU tensor of length ``n``.

    Args:
        labels: A tensor, a sequence of ints or of 0-d tensors.
        n: Expected number of labels.
        name: Name used in error messages.

    Returns:
        The labels as an int64 tensor of shape ``(n,)`` on the CPU.

    Raises:
        TypeError: If the labels are not integral class indices.
        ValueError: If the number of labels does not match ``n``.
    """
    if not isinstance(labels, torch.Tensor):
        try:
            if isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], torch.Tensor):
                labels = torch.stack([torch.as_tensor(x).reshape(()) for x in labels])
            else:
                labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"{name} must be integer class indices (a tensor or a sequence of ints); "
                f"could not convert {type(labels).__name__}."
            ) from exc
    labels = labels.detach().cpu()
    if labels.numel() != n:
        raise ValueError(
            f"{name} has {labels.numel()} elements but there are {n} samples; "
            f"pass exactly one integer label per sample."
        )
    labels = labels.reshape(n)
    if labels.is_floating_point() or labels.is_complex():
        if labels.is_complex() or not torch.equal(labels, labels.round()):
            raise TypeError(
                f"{name} must hold integer class indices, got non-integral "
                f"{labels.dtype} values; pass int64 labels."
            )
    return labels.to(torch.int64)


def _validate_features_labels(
    features: Any, labels: Any, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates a precomputed ``(features, labels)`` pair.

    Args:
        features: Expected 2-D tensor ``(N, D)``.
        labels: Expected ``N`` integer labels.
        name: Name of the argument, used in error messages.

    Returns:
        ``(features, labels)`` with labels as a 1-D int64 CPU tensor.

    Raises:
        TypeError: If ``features`` is not a floating-point tensor.
        ValueError: If shapes are inconsistent.
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(
            f"{name} features must be a torch.Tensor of shape (N, D), got "
            f"{type(features).__name__}; pass (features_tensor, labels_tensor)."
        )
    if features.ndim != 2:
        raise ValueError(
            f"{name} features must be 2-D (N, D), got shape {tuple(features.shape)}; "
            f"flatten/pool them or pass an encoder so they are extracted for you."
        )
    if not features.is_floating_point():
        features = features.float()
    return features, _as_labels(labels, features.shape[0], f"{name} labels")


def _check_label_range(labels: torch.Tensor, num_classes: int, name: str) -> None:
    """Checks that labels lie in ``[0, num_classes)``.

    Args:
        labels: 1-D int64 labels.
        num_classes: Number of classes.
        name: Name used in error messages.

    Raises:
        ValueError: If a label is negative or >= ``num_classes``.
    """
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise ValueError(
            f"{name} contains negative label {lo}; labels must be class indices in "
            f"[0, num_classes)."
        )
    if hi >= num_classes:
        raise ValueError(
            f"{name} contains label {hi} but num_classes={num_classes}; pass "
            f"num_classes >= {hi + 1} or leave it as None to infer it."
        )


# ---------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------


def _image_to_tensor(image: Any) -> torch.Tensor:
    """Converts one image to a tensor.

    Tensors are returned unchanged; PIL images and ``numpy`` arrays (H, W, C)
    go through :func:`torchvision.transforms.functional.to_tensor`, which
    returns a (C, H, W) float tensor in [0, 1] for 8-bit images.

    Args:
        image: A tensor, PIL image or numpy array.

    Returns:
        The image as a tensor.

    Raises:
        TypeError: If the image type is not supported.
    """
    if isinstance(image, torch.Tensor):
        return image
    try:
        from torchvision.transforms.functional import to_tensor
    except ImportError as exc:  # pragma: no cover - torchvision is a dependency
        raise TypeError(
            "data yields non-tensor images, which needs torchvision to convert; "
            "install torchvision or add transforms.ToTensor() to the dataset."
        ) from exc
    try:
        return to_tensor(image)
    except TypeError as exc:
        raise TypeError(
            f"data yields images of type {type(image).__name__}; datasets must yield "
            f"(image, label) pairs with tensor, PIL or numpy images - add "
            f"transforms.ToTensor() to the dataset."
        ) from exc


def _collate_pairs(batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collates ``(image, label)`` samples into ``(images, labels)`` tensors.

    Args:
        batch: Samples as yielded by a dataset.

    Returns:
        Stacked images and a 1-D int64 label tensor.

    Raises:
        TypeError: If a sample is not an ``(image, label)`` pair.
    """
    images, labels = [], []
    for sample in batch:
        if not isinstance(sample, (tuple, list)) or len(sample) < 2:
            raise TypeError(
                f"data must yield (image, label) pairs, got a {type(sample).__name__}; "
                f"wrap the dataset so that __getitem__ returns (image, label)."
            )
        images.append(_image_to_tensor(sample[0]))
        labels.append(sample[1])
    return torch.stack(images), _as_labels(labels, len(labels), "data labels")


def _iter_batches(
    data: Any, batch_size: int, num_workers: int, pin_memory: bool
) -> Iterator[tuple[torch.Tensor, Any]]:
    """Yields ``(images, labels)`` batches from any supported data source.

    Args:
        data: Dataset, DataLoader or ``(images, labels)`` tuple.
        batch_size: Batch size for Dataset and tuple inputs.
        num_workers: Loader workers for Dataset inputs.
        pin_memory: Whether to pin memory for Dataset inputs.

    Yields:
        ``(images, labels)`` batches.

    Raises:
        TypeError: If ``data`` is of an unsupported type.
        ValueError: If a tuple input has inconsistent lengths.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        images, labels = data
        if images.ndim < 1:
            raise ValueError("data images must have a leading batch dimension; got a 0-d tensor.")
        n = images.shape[0]
        labels = _as_labels(labels, n, "data labels")
        for start in range(0, n, batch_size):
            yield images[start : start + batch_size], labels[start : start + batch_size]
        return
    if isinstance(data, DataLoader):
        loader: Any = data
    elif isinstance(data, Dataset):
        loader = DataLoader(
            data,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_collate_pairs,
            pin_memory=pin_memory,
        )
    else:
        raise TypeError(
            f"data must be a torch Dataset of (image, label) pairs, a DataLoader of "
            f"(images, labels) batches, or an (images_tensor, labels_tensor) tuple; "
            f"got {type(data).__name__}."
        )
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(
                f"data loader must yield (images, labels) batches, got a "
                f"{type(batch).__name__}; make the dataset return (image, label) pairs."
            )
        images = batch[0]
        if not isinstance(images, torch.Tensor):
            images = torch.stack([_image_to_tensor(im) for im in images])
        yield images, batch[1]


def _pool_features(out: Any, batch: int) -> torch.Tensor:
    """Reduces an encoder output to a ``(B, D)`` feature matrix.

    Args:
        out: The encoder output (tensor, or tuple/list whose first element is
            the features).
        batch: Expected batch size.

    Returns:
        The ``(B, D)`` features.

    Raises:
        ValueError: If the output is not a tensor of a supported rank, or its batch size is wrong.
    """
    try:
        out = pool_features(out, token_pool="mean")
    except RuntimeError as err:
        raise ValueError(
            f"encoder output is not usable as features ({err}); the encoder must return a tensor of rank "
            f"2 (B, D), 3 (B, T, D) or 4 (B, C, H, W): wrap it so it returns one of these."
        ) from None
    if out.shape[0] != batch:
        raise ValueError(
            f"encoder returned {out.shape[0]} feature rows for a batch of {batch} "
            f"images; the first output dimension must be the batch."
        )
    return out


@torch.no_grad()
def extract_features(
    encoder: Callable[[torch.Tensor], Any],
    data: DataLike,
    *,
    batch_size: int = 256,
    device: DeviceLike = None,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a frozen encoder over a data set and returns its features.

    The encoder is called on float image batches under ``torch.no_grad()``.
    Outputs of rank 4 ``(B, C, H, W)`` (or higher) are global-average-pooled
    over all trailing dimensions, rank 3
    ``(B, T, D)`` are mean-pooled over tokens and rank 2 ``(B, D)`` are used
    as is; if the encoder returns a tuple or list, its first element is used.

    If ``encoder`` is an ``nn.Module`` it is switched to eval mode for the
    extraction (so BatchNorm uses, and does not update, its running
    statistics), and the training flag of every submodule and every buffer
    are restored afterwards, even if an exception is raised
    (:func:`~byol_wrapper.extractor.preserved_state`). The module is never
    moved: it must already live on ``device``.

    Args:
        encoder: Any callable mapping a float image batch ``(B, C, H, W)`` to
            features, typically an ``nn.Module`` backbone.
        data: One of

            * a ``torch.utils.data.Dataset`` yielding ``(image, label)``
              pairs; images may be tensors, PIL images or ``numpy`` arrays
              (the latter two are converted like torchvision's ``to_tensor``);
            * a ``DataLoader`` yielding ``(images, labels)`` batches (its own
              batch size and workers are used);
            * a tuple ``(images, labels)`` of tensors.

            ``uint8`` images are scaled to ``[0, 1]``; other integer images
            are cast to float32; floating images are passed unchanged.
        batch_size: Batch size for Dataset and tuple inputs.
        device: Device on which the encoder runs. Defaults to the device of
            the module's first parameter (or buffer), else CPU.
        num_workers: DataLoader workers used for Dataset inputs.

    Returns:
        ``(features, labels)``: float32 features of shape ``(N, D)`` and int64
        labels of shape ``(N,)``, both on the CPU, in data order.

    Raises:
        TypeError: If ``encoder`` is not callable, ``data`` has an unsupported
            type, or the encoder output is not a tensor.
        ValueError: If ``data`` is empty, sizes are inconsistent or the
            encoder output has an unsupported rank.
    """
    if encoder is None or not callable(encoder):
        raise TypeError(
            f"encoder must be a callable (e.g. an nn.Module) mapping images to "
            f"features, got {type(encoder).__name__}."
        )
    batch_size = check_int("batch_size", batch_size, 1)
    num_workers = check_int("num_workers", num_workers, 0)
    dev = _evaluation_device(device, encoder)
    frozen = preserved_state(encoder) if isinstance(encoder, nn.Module) else contextlib.nullcontext()

    features, labels = [], []
    with frozen:
        for images, batch_labels in _iter_batches(
            data, batch_size, num_workers, pin_memory=dev.type == "cuda"
        ):
            if not isinstance(images, torch.Tensor):
                raise TypeError(
                    f"data images must be tensors, got {type(images).__name__}."
                )
            n = images.shape[0] if images.ndim > 0 else 0
            batch_labels = _as_labels(batch_labels, n, "data labels")
            if n == 0:
                continue
            images = images.to(dev, non_blocking=True)
            if images.dtype == torch.uint8:
                images = images.float().div_(255.0)
            elif not images.is_floating_point():
                images = images.float()
            feats = _pool_features(encoder(images), n)
            features.append(feats.detach().float().cpu())
            labels.append(batch_labels)

    if not features:
        raise ValueError("data is empty; pass a data set with at least one sample.")
    return torch.cat(features), torch.cat(labels)


def _features_for(
    encoder: Any,
    data: Any,
    name: str,
    batch_size: int,
    device: DeviceLike,
    num_workers: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(features, labels)`` for ``data``, extracting if needed.

    Args:
        encoder: Encoder, or None if ``data`` holds precomputed features.
        data: Data source, or a ``(features, labels)`` tuple when
            ``encoder`` is None.
        name: Argument name used in error messages.
        batch_size: Extraction batch size.
        device: Extraction device.
        num_workers: Extraction loader workers.

    Returns:
        ``(features, labels)`` with 2-D features and 1-D int64 labels.

    Raises:
        TypeError: If ``encoder`` is None and ``data`` is not a
            ``(features, labels)`` tuple.
    """
    if encoder is None:
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise TypeError(
                f"with encoder=None, {name} must be a (features, labels) tuple of "
                f"precomputed features; got {type(data).__name__}. Pass an encoder to "
                f"extract features from images."
            )
        return _validate_features_labels(data[0], data[1], name)
    return extract_features(
        encoder, data, batch_size=batch_size, device=device, num_workers=num_workers
    )
