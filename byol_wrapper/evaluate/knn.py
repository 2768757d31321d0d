"""The weighted cosine k-nearest-neighbour classifier of InstDisc (Wu et al., 2018).

The usual cheap "online" monitor of self-supervised training in SSL libraries (lightly, solo-learn):
:func:`knn_predict` classifies features, :func:`knn_accuracy` scores an encoder (or precomputed features).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..utils.checks import check_float, check_int
from .features import DeviceLike, _check_label_range, _evaluation_device, _features_for, _validate_features_labels

__all__ = ["knn_accuracy", "knn_predict"]


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
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
    k = check_int("k", k, 1)
    temperature = check_float("temperature", temperature, strict=True)
    chunk_size = check_int("chunk_size", chunk_size, 1)
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
    num_classes = check_int("num_classes", num_classes, 1)
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


def knn_accuracy(
    encoder: Callable[[torch.Tensor], Any] | None,
    train: Any,
    test: Any,
    k: int = 200,
    temperature: float = 0.1,
    *,
    batch_size: int = 256,
    device: DeviceLike = None,
    num_classes: int | None = None,
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
    k = check_int("k", k, 1)
    temperature = check_float("temperature", temperature, strict=True)
    if num_classes is not None:
        num_classes = check_int("num_classes", num_classes, 1)
    train_x, train_y = _features_for(encoder, train, "train", batch_size, device, num_workers)
    test_x, test_y = _features_for(encoder, test, "test", batch_size, device, num_workers)
    if test_x.shape[0] == 0:
        raise ValueError("test is empty; accuracy needs at least one test sample.")
    dev = _evaluation_device(device, encoder, train_x)
    preds = knn_predict(
        train_x.to(dev),
        train_y,
        test_x.to(dev),
        k=k,
        temperature=temperature,
        num_classes=num_classes,
    )
    return (preds.cpu() == test_y).double().mean().item()
