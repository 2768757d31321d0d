"""Evaluation utilities for self-supervised representations.

This module provides the standard tools used to monitor and evaluate a
self-supervised encoder (for example the online backbone of a BYOL model):

* :func:`extract_features` - run a frozen encoder over a data set once and
  return ``(features, labels)`` on the CPU.
* :func:`knn_predict` / :func:`knn_accuracy` - the weighted cosine
  k-nearest-neighbour classifier of InstDisc (Wu et al., 2018), which is the
  usual cheap "online" monitor in SSL libraries (lightly, solo-learn).
* :func:`linear_probe` - a linear classifier trained on frozen, cached
  features (the standard linear evaluation protocol, on a budget).
* :func:`collapse_stats` - representation-collapse diagnostics: the
  per-dimension standard deviation of L2-normalised embeddings (as in
  SimSiam, Chen & He, 2021) and the effective rank (Roy & Vetterli, 2007;
  RankMe, Garrido et al., 2023).

``knn_accuracy`` and ``linear_probe`` accept either an encoder plus data, or
``encoder=None`` with precomputed ``(features, labels)`` tuples, so that a
training loop can extract features once and run several evaluations on them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from byol_wrapper.evaluate import extract_features, knn_accuracy
    >>> encoder = nn.Flatten()
    >>> images = torch.rand(8, 1, 2, 2)
    >>> labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    >>> feats, labs = extract_features(encoder, (images, labels))
    >>> feats.shape, labs.dtype
    (torch.Size([8, 4]), torch.int64)
    >>> acc = knn_accuracy(None, (feats, labs), (feats, labs), k=1)
    >>> 0.0 <= acc <= 1.0
    True
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..extractor import pool_features

__all__ = [
    "extract_features",
    "knn_predict",
    "knn_accuracy",
    "linear_probe",
    "collapse_stats",
]

DeviceLike = Union[str, torch.device, None]
"""Anything accepted as a device: a string such as ``"cuda:0"``, a
:class:`torch.device`, or ``None`` for the default."""

DataLike = Union[Dataset, DataLoader, Tuple[torch.Tensor, torch.Tensor]]
"""Accepted data sources: a ``Dataset`` of ``(image, label)`` pairs, a
``DataLoader`` of ``(images, labels)`` batches or an ``(images, labels)``
tuple of tensors."""


# ---------------------------------------------------------------------------
# Argument validation helpers
# ---------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> int:
    """Validates that ``value`` is an integer no smaller than ``minimum``.

    Args:
        name: Argument name used in the error message.
        value: The value to check.
        minimum: Smallest allowed value.

    Returns:
        ``value`` as a Python ``int``.

    Raises:
        TypeError: If ``value`` is not an integer (``bool`` is rejected).
        ValueError: If ``value`` is smaller than ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an int >= {minimum}, got {type(value).__name__} "
            f"{value!r}; pass an integer such as {name}={max(minimum, 1)}."
        )
    value = int(value)
    if value < minimum:
        raise ValueError(
            f"{name} must be >= {minimum}, got {value}; pass an integer >= {minimum}."
        )
    return value


def _check_float(name: str, value: Any, *, positive: bool) -> float:
    """Validates that ``value`` is a finite real number (optionally > 0).

    Args:
        name: Argument name used in the error message.
        value: The value to check.
        positive: If True the value must be strictly positive, otherwise it
            must be non-negative.

    Returns:
        ``value`` as a Python ``float``.

    Raises:
        TypeError: If ``value`` is not a real number (``bool`` is rejected).
        ValueError: If ``value`` is not finite or out of range.
    """
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a finite float {bound}, got {type(value).__name__} "
            f"{value!r}; pass a number such as {name}=0.1."
        )
    value = float(value)
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(
            f"{name} must be a finite float {bound}, got {value}; "
            f"pass a finite number {bound}."
        )
    return value


def _resolve_device(encoder: Any, device: DeviceLike) -> torch.device:
    """Picks the device used for computation.

    Args:
        encoder: The encoder (may be None or any callable).
        device: Explicit device, or None for the default.

    Returns:
        ``device`` if given; otherwise the device of the encoder's first
        parameter (or buffer) when it is an ``nn.Module``; otherwise CPU.

    Raises:
        TypeError: If ``device`` cannot be interpreted as a torch device.
    """
    if device is not None:
        try:
            return torch.device(device)
        except (TypeError, RuntimeError) as exc:
            raise TypeError(
                f"device must be a torch.device, a string such as 'cpu' or "
                f"'cuda:0', or None; got {device!r}."
            ) from exc
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
) -> Tuple[torch.Tensor, torch.Tensor]:
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


def _collate_pairs(batch: Sequence[Any]) -> Tuple[torch.Tensor, torch.Tensor]:
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
) -> Iterator[Tuple[torch.Tensor, Any]]:
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Runs a frozen encoder over a data set and returns its features.

    The encoder is called on float image batches under ``torch.no_grad()``.
    Outputs of rank 4 ``(B, C, H, W)`` (or higher) are global-average-pooled
    over all trailing dimensions, rank 3
    ``(B, T, D)`` are mean-pooled over tokens and rank 2 ``(B, D)`` are used
    as is; if the encoder returns a tuple or list, its first element is used.

    If ``encoder`` is an ``nn.Module`` it is switched to eval mode for the
    extraction (so BatchNorm uses, and does not update, its running
    statistics), and the training flag of every submodule is restored
    afterwards, even if an exception is raised. The module is never moved:
    it must already live on ``device``.

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
    batch_size = _check_int("batch_size", batch_size, 1)
    num_workers = _check_int("num_workers", num_workers, 0)
    dev = _resolve_device(encoder, device)

    saved_modes = None
    if isinstance(encoder, nn.Module):
        saved_modes = [(m, m.training) for m in encoder.modules()]
        encoder.eval()

    features, labels = [], []
    try:
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
    finally:
        if saved_modes is not None:
            encoder.train(saved_modes[0][1])
            for module, mode in saved_modes:
                module.training = mode

    if not features:
        raise ValueError("data is empty; pass a data set with at least one sample.")
    return torch.cat(features), torch.cat(labels)


# ---------------------------------------------------------------------------
# k-nearest-neighbour classifier
# ---------------------------------------------------------------------------


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: Optional[int] = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicts labels with the weighted cosine kNN classifier of InstDisc.

    This is the classifier of Wu et al. (2018), "Unsupervised Feature
    Learning via Non-Parametric Instance Discrimination", used as the
    standard SSL monitor by lightly and solo-learn:

    1. L2-normalise train and test features; similarity = cosine similarity.
    2. For every test sample take the ``k`` most similar train samples
       (``k`` is capped at the train-set size).
    3. Weight each neighbour by ``exp(sim / temperature)``.
    4. Class score = sum of the weights of the neighbours of that class;
       the prediction is the arg-max (ties go to the smallest class index).

    The weights are computed as ``exp((sim - max_sim) / temperature)``,
    which rescales every class score of a test sample by the same positive
    factor (so the prediction is unchanged) but cannot overflow for small
    temperatures. Test samples are processed in chunks of ``chunk_size`` so
    the similarity matrix held in memory is at most ``chunk_size x N``.

    Args:
        train_features: ``(N, D)`` train features.
        train_labels: ``(N,)`` integer train labels in ``[0, num_classes)``.
        test_features: ``(M, D)`` test features.
        k: Number of neighbours (>= 1).
        temperature: Softmax-style temperature (> 0) of the neighbour weights.
        num_classes: Number of classes; inferred as ``max(train_labels) + 1``
            when None.
        chunk_size: Number of test samples processed at once.

    Returns:
        ``(M,)`` int64 predicted labels on the device of ``test_features``.
        The computation runs on the device of ``train_features``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If shapes are inconsistent, the train set is empty, or
            ``k``, ``temperature``, ``num_classes`` or ``chunk_size`` is out
            of range.
    """
    k = _check_int("k", k, 1)
    temperature = _check_float("temperature", temperature, positive=True)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    train_features, train_labels = _validate_features_labels(
        train_features, train_labels, "train"
    )
    if not isinstance(test_features, torch.Tensor):
        raise TypeError(
            f"test_features must be a torch.Tensor of shape (M, D), got "
            f"{type(test_features).__name__}."
        )
    if test_features.ndim != 2:
        raise ValueError(
            f"test_features must be 2-D (M, D), got shape {tuple(test_features.shape)}."
        )
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"test_features has dimension {test_features.shape[1]} but train_features "
            f"has {train_features.shape[1]}; both must come from the same encoder."
        )
    n_train = train_features.shape[0]
    if n_train == 0:
        raise ValueError("train_features is empty; kNN needs at least one train sample.")
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    num_classes = _check_int("num_classes", num_classes, 1)
    _check_label_range(train_labels, num_classes, "train_labels")

    out_device = test_features.device
    dev = train_features.device
    if test_features.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=out_device)

    k = min(k, n_train)
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(dev)
    preds = []
    for start in range(0, test_features.shape[0], chunk_size):
        chunk = F.normalize(test_features[start : start + chunk_size].to(dev).float(), dim=1)
        sim = chunk @ train.T  # (c, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (c, k), sorted descending
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
        scores = torch.zeros(chunk.shape[0], num_classes, device=dev, dtype=weights.dtype)
        scores.scatter_add_(1, labels[top_idx], weights)
        preds.append(scores.argmax(dim=1))
    return torch.cat(preds).to(out_device)


def _features_for(
    encoder: Any,
    data: Any,
    name: str,
    batch_size: int,
    device: DeviceLike,
    num_workers: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
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


def knn_accuracy(
    encoder: Optional[Callable[[torch.Tensor], Any]],
    train: Any,
    test: Any,
    k: int = 200,
    temperature: float = 0.1,
    *,
    batch_size: int = 256,
    device: DeviceLike = None,
    num_classes: Optional[int] = None,
    num_workers: int = 0,
) -> float:
    """Top-1 accuracy of the weighted cosine kNN classifier (see :func:`knn_predict`).

    Features of ``train`` and ``test`` are extracted once with
    :func:`extract_features`, then every test sample is classified by its
    ``k`` nearest train samples.

    Precomputed features: pass ``encoder=None`` and ``train``/``test`` as
    ``(features, labels)`` tuples with ``(N, D)`` features, e.g. the output
    of :func:`extract_features`; this lets a training loop extract once and
    run several evaluations.

    Args:
        encoder: Callable mapping image batches to features, or None when
            ``train``/``test`` hold precomputed features.
        train: Train data (any input accepted by :func:`extract_features`), or
            ``(features, labels)`` when ``encoder`` is None.
        test: Test data, same format as ``train``.
        k: Number of neighbours (>= 1, capped at the train-set size).
        temperature: Temperature (> 0) of the ``exp(sim / temperature)``
            neighbour weights.
        batch_size: Extraction batch size.
        device: Device for extraction and for the kNN computation. Defaults
            to the encoder's device; with ``encoder=None`` the features'
            own device.
        num_classes: Number of classes; inferred from the train labels when
            None.
        num_workers: DataLoader workers for Dataset inputs.

    Returns:
        The fraction of correctly classified test samples, in ``[0, 1]``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument is out of range or the test set is empty.
    """
    k = _check_int("k", k, 1)
    temperature = _check_float("temperature", temperature, positive=True)
    if num_classes is not None:
        num_classes = _check_int("num_classes", num_classes, 1)
    train_x, train_y = _features_for(encoder, train, "train", batch_size, device, num_workers)
    test_x, test_y = _features_for(encoder, test, "test", batch_size, device, num_workers)
    if test_x.shape[0] == 0:
        raise ValueError("test is empty; accuracy needs at least one test sample.")
    if encoder is None and device is None:
        dev = train_x.device
    else:
        dev = _resolve_device(encoder, device)
    preds = knn_predict(
        train_x.to(dev),
        train_y,
        test_x.to(dev),
        k=k,
        temperature=temperature,
        num_classes=num_classes,
    )
    return (preds.cpu() == test_y).double().mean().item()


# ---------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------


@torch.no_grad()
def _evaluate_linear(
    weight: torch.Tensor,
    bias: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    topk: int,
) -> Tuple[float, float]:
    """Top-1 and top-``topk`` accuracy of a linear classifier.

    Args:
        weight: ``(C, D)`` weight matrix.
        bias: ``(C,)`` bias.
        x: ``(N, D)`` features.
        y: ``(N,)`` labels.
        batch_size: Evaluation chunk size.
        topk: The ``k`` of the top-k accuracy (1 disables it).

    Returns:
        ``(top1, topk)`` accuracies in ``[0, 1]``.
    """
    top1 = topk_correct = 0
    for start in range(0, x.shape[0], batch_size):
        logits = F.linear(x[start : start + batch_size], weight, bias)
        target = y[start : start + batch_size]
        top1 += int((logits.argmax(dim=1) == target).sum())
        if topk > 1:
            idx = logits.topk(topk, dim=1).indices
            topk_correct += int((idx == target[:, None]).any(dim=1).sum())
    n = x.shape[0]
    return top1 / n, topk_correct / n


def linear_probe(
    encoder: Optional[Callable[[torch.Tensor], Any]],
    train: Any,
    test: Any,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    device: DeviceLike = None,
    seed: int = 0,
    num_classes: Optional[int] = None,
    normalize: bool = True,
    num_workers: int = 0,
) -> dict[str, float]:
    """Trains a linear classifier on frozen features and reports its accuracy.

    Recipe (a standard, cheap linear-evaluation protocol on cached features):

    1. Features of ``train`` and ``test`` are extracted once with
       :func:`extract_features` (the encoder is frozen, in eval mode).
    2. If ``normalize`` is True, features are standardised per dimension
       with the mean and (population) standard deviation of the *train*
       features; dimensions that are constant on the train set are only
       centred.
    3. A single linear layer (weights ``N(0, 0.01^2)``, zero bias) is
       trained for ``epochs`` epochs over the cached feature tensor in
       mini-batches of ``batch_size`` (reshuffled every epoch, last batch
       kept), with cross-entropy loss, SGD with momentum 0.9 and
       ``weight_decay``, and a cosine learning-rate schedule decaying from
       ``lr`` to 0 over all steps (updated every step).
    4. Top-1 accuracy is measured on the train and test features.

    All randomness (initialisation, shuffling) comes from a
    ``torch.Generator`` seeded with ``seed``, so results are deterministic
    for a given seed on CPU, and the global RNG state is not touched.

    Precomputed features: pass ``encoder=None`` and ``train``/``test`` as
    ``(features, labels)`` tuples with ``(N, D)`` features.

    Args:
        encoder: Callable mapping image batches to features, or None when
            ``train``/``test`` hold precomputed features.
        train: Train data (any input accepted by :func:`extract_features`), or
            ``(features, labels)`` when ``encoder`` is None.
        test: Test data, same format as ``train``.
        epochs: Number of passes over the train features.
        lr: Peak (initial) learning rate.
        weight_decay: L2 weight decay of SGD.
        batch_size: Mini-batch size for extraction and training.
        device: Device for extraction and training. Defaults to the
            encoder's device; with ``encoder=None`` the train features' device.
        seed: Seed of the generator used for initialisation and shuffling.
        num_classes: Number of classes; inferred as ``max label + 1`` over
            the train and test labels when None.
        normalize: Whether to standardise features with train statistics.
        num_workers: DataLoader workers for Dataset inputs.

    Returns:
        ``{"train_accuracy": ..., "test_accuracy": ...}`` (fractions in
        ``[0, 1]``), plus ``"test_top5_accuracy"`` when ``num_classes >= 5``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument is out of range or a split is empty.
    """
    epochs = _check_int("epochs", epochs, 1)
    lr = _check_float("lr", lr, positive=True)
    weight_decay = _check_float("weight_decay", weight_decay, positive=False)
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, -(2**63))
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be True or False, got {normalize!r}.")
    if num_classes is not None:
        num_classes = _check_int("num_classes", num_classes, 1)

    train_x, train_y = _features_for(encoder, train, "train", batch_size, device, num_workers)
    test_x, test_y = _features_for(encoder, test, "test", batch_size, device, num_workers)
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError(
            "train and test must each contain at least one sample for a linear probe."
        )
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train features have dimension {train_x.shape[1]} but test features have "
            f"{test_x.shape[1]}; both must come from the same encoder."
        )
    if num_classes is None:
        num_classes = int(torch.maximum(train_y.max(), test_y.max())) + 1
    _check_label_range(train_y, num_classes, "train labels")
    _check_label_range(test_y, num_classes, "test labels")

    if encoder is None and device is None:
        dev = train_x.device
    else:
        dev = _resolve_device(encoder, device)
    train_x = train_x.to(dev, torch.float32)
    test_x = test_x.to(dev, torch.float32)
    train_y = train_y.to(dev)
    test_y = test_y.to(dev)

    if normalize:
        mean = train_x.mean(dim=0)
        std = train_x.std(dim=0, correction=0)
        tiny = 1e-6 * float(std.max().clamp_min(torch.finfo(torch.float32).tiny))
        std = torch.where(std > tiny, std, torch.ones_like(std))
        train_x = (train_x - mean) / std
        test_x = (test_x - mean) / std

    n, dim = train_x.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    weight = nn.Parameter((torch.randn(num_classes, dim, generator=gen) * 0.01).to(dev))
    bias = nn.Parameter(torch.zeros(num_classes, device=dev))
    optimizer = torch.optim.SGD(
        [weight, bias], lr=lr, momentum=0.9, weight_decay=weight_decay
    )
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    )

    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(dev)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                loss = F.cross_entropy(F.linear(train_x[idx], weight, bias), train_y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()

    w, b = weight.detach(), bias.detach()
    topk = 5 if num_classes >= 5 else 1
    train_acc, _ = _evaluate_linear(w, b, train_x, train_y, batch_size, 1)
    test_acc, test_top5 = _evaluate_linear(w, b, test_x, test_y, batch_size, topk)
    result = {"train_accuracy": train_acc, "test_accuracy": test_acc}
    if num_classes >= 5:
        result["test_top5_accuracy"] = test_top5
    return result


# ---------------------------------------------------------------------------
# Collapse diagnostics
# ---------------------------------------------------------------------------


@torch.no_grad()
def collapse_stats(embeddings: torch.Tensor) -> dict[str, float]:
    """Representation-collapse diagnostics for a batch of embeddings.

    * ``std_mean``: rows are L2-normalised, then the (unbiased) standard
      deviation of every dimension across samples is averaged (the SimSiam
      collapse monitor, also used by lightly).
    * ``std_expected``: ``1 / sqrt(D)``, the value of ``std_mean`` for a
      non-collapsed, isotropic embedding; complete collapse gives ~0.
    * ``std_ratio``: ``std_mean / std_expected`` (~1 healthy, ~0 collapsed).
    * ``effective_rank``: ``exp(H(p))`` with ``p_i = s_i / sum(s)`` the
      normalised singular values of the *centred* (not L2-normalised)
      embedding matrix (Roy & Vetterli, 2007; as in RankMe, Garrido et al.,
      2023). It lies in ``[1, min(N, D)]``. Singular values below the
      numerical tolerance ``max(N, D) * eps(dtype) * ||X||_F`` are treated
      as zero, and a matrix without any variation above that tolerance
      (e.g. all rows identical) has effective rank 1. Because it is
      scale-invariant, read it together with ``std_ratio``.
    * ``dim``: ``D``.

    Non-finite embeddings give NaN statistics (``dim`` is still reported).

    Args:
        embeddings: ``(N, D)`` tensor with ``N >= 2``.

    Returns:
        A dict with keys ``std_mean``, ``std_expected``, ``std_ratio``,
        ``effective_rank`` and ``dim``.

    Raises:
        TypeError: If ``embeddings`` is not a real-valued tensor.
        ValueError: If ``embeddings`` is not 2-D, has fewer than 2 rows or
            zero columns.
    """
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(
            f"embeddings must be a torch.Tensor of shape (N, D), got "
            f"{type(embeddings).__name__}."
        )
    if embeddings.ndim != 2:
        raise ValueError(
            f"embeddings must be 2-D (N, D), got shape {tuple(embeddings.shape)}; "
            f"flatten or pool them to (N, D) first."
        )
    n, dim = embeddings.shape
    if n < 2 or dim < 1:
        raise ValueError(
            f"embeddings must have at least 2 rows and 1 column, got shape "
            f"{tuple(embeddings.shape)}; pass a batch of several samples."
        )
    if embeddings.is_complex():
        raise TypeError("embeddings must be real-valued, got a complex tensor.")
    eps = torch.finfo(embeddings.dtype).eps if embeddings.is_floating_point() else 0.0
    x = embeddings.detach().to(torch.float64)
    std_expected = 1.0 / math.sqrt(dim)
    if not bool(torch.isfinite(x).all()):
        nan = float("nan")
        return {
            "std_mean": nan,
            "std_expected": std_expected,
            "std_ratio": nan,
            "effective_rank": nan,
            "dim": dim,
        }

    std_mean = float(F.normalize(x, dim=1).std(dim=0).mean())

    singular = torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))
    tol = max(n, dim) * max(eps, torch.finfo(torch.float64).eps) * float(torch.linalg.norm(x))
    singular = singular[singular > tol]
    if singular.numel() == 0:
        effective_rank = 1.0
    else:
        p = singular / singular.sum()
        effective_rank = float(torch.exp(-(p * p.log()).sum()))

    return {
        "std_mean": std_mean,
        "std_expected": std_expected,
        "std_ratio": std_mean / std_expected,
        "effective_rank": effective_rank,
        "dim": dim,
    }
