"""The plan of a ``byol-train`` run: batch split, steps, warmup, learning rate and weight decay.

A pure function of the arguments and of the data set's size (no I/O, no torch), so it can be tested alone.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass

from .args import UsageError

__all__ = ["BASE_LR", "DEFAULT_WEIGHT_DECAY", "Plan", "default_load_size", "make_plan"]

BASE_LR = {"lars": 0.2, "sgd": 0.05, "adamw": 1e-3}
"""Default peak learning rate per 256 images (scaled linearly with ``--batch-size``)."""

DEFAULT_WEIGHT_DECAY = {"lars": 1.5e-6, "sgd": 1e-4, "adamw": 1e-2}
"""Default weight decay per optimizer (LARS: the paper's 1.5e-6)."""


def default_load_size(image_size: int) -> int:
    """The default ``--load-size``: the view size up to 64 px, else 8/7 of it (224 -> 256, as in the paper)."""
    return image_size if image_size <= 64 else int(round(image_size * 8 / 7))


@dataclass(frozen=True)
class Plan:
    """What a run will do, derived from the arguments and the number of training images.

    Attributes:
        load_size: Decoded image size (``--load-size`` or :func:`default_load_size`).
        steps_per_epoch: Full global batches per epoch (the last partial batch is dropped).
        rank_batch: Images per process and step (``--batch-size`` over the processes).
        total_steps: ``--max-steps``, else ``--epochs`` epochs.
        warmup_steps: Linear warmup length, at most ``total_steps``.
        base_lr: Peak learning rate (``--lr``, else :data:`BASE_LR` scaled by ``batch_size / 256``).
        weight_decay: ``--weight-decay``, else :data:`DEFAULT_WEIGHT_DECAY` of the optimizer.
    """

    load_size: int
    steps_per_epoch: int
    rank_batch: int
    total_steps: int
    warmup_steps: int
    base_lr: float
    weight_decay: float


def make_plan(args: argparse.Namespace, num_images: int, world: int = 1) -> Plan:
    """The plan of a run on ``num_images`` training images with ``world`` processes.

    Raises:
        UsageError: The batch does not fit the data or the processes.

    Warns:
        RuntimeWarning: The warmup is longer than training (it is shortened).
    """
    steps_per_epoch = num_images // args.batch_size
    if steps_per_epoch == 0:
        raise UsageError(
            f"--batch-size {args.batch_size} is larger than the {num_images} images in --data "
            f"{args.data}; lower --batch-size to at most {num_images}"
        )
    if args.batch_size < 2:
        raise UsageError("--batch-size must be at least 2 (BatchNorm in the BYOL heads needs batch statistics)")
    if args.batch_size % world or args.batch_size // world < 2:
        raise UsageError(
            f"--batch-size is the global batch, split over the {world} processes: it must be a multiple of {world} "
            f"with at least 2 images per process; got {args.batch_size}"
        )
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    if args.warmup_steps is not None:
        warmup = args.warmup_steps
    elif args.warmup_epochs is not None:
        warmup = int(round(args.warmup_epochs * steps_per_epoch))
    else:
        warmup = min(10 * steps_per_epoch, total_steps // 10)
    if warmup > total_steps:
        warnings.warn(f"warmup ({warmup} steps) is longer than training ({total_steps} steps); shortened", RuntimeWarning, stacklevel=3)
    return Plan(
        load_size=args.load_size or default_load_size(args.image_size),
        steps_per_epoch=steps_per_epoch,
        rank_batch=args.batch_size // world,
        total_steps=total_steps,
        warmup_steps=min(warmup, total_steps),
        base_lr=args.lr if args.lr is not None else BASE_LR[args.optimizer] * args.batch_size / 256,
        weight_decay=args.weight_decay if args.weight_decay is not None else DEFAULT_WEIGHT_DECAY[args.optimizer],
    )
