"""Linear evaluation: a linear classifier trained on frozen, cached features (the standard protocol, on a budget)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.checks import check_float, check_int
from .features import DeviceLike, _check_label_range, _evaluation_device, _features_for

__all__ = ["linear_probe"]


@torch.no_grad()
def _evaluate_linear(
    weight: torch.Tensor,
    bias: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    topk: int,
) -> tuple[float, float]:
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
    encoder: Callable[[torch.Tensor], Any] | None,
    train: Any,
    test: Any,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    device: DeviceLike = None,
    seed: int = 0,
    num_classes: int | None = None,
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
    epochs = check_int("epochs", epochs, 1)
    lr = check_float("lr", lr, strict=True)
    weight_decay = check_float("weight_decay", weight_decay)
    batch_size = check_int("batch_size", batch_size, 1)
    seed = check_int("seed", seed, -(2**63))
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be True or False, got {normalize!r}.")
    if num_classes is not None:
        num_classes = check_int("num_classes", num_classes, 1)

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

    dev = _evaluation_device(device, encoder, train_x)
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
