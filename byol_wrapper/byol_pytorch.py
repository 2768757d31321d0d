"""byol-pytorch's module ``byol_pytorch.byol_pytorch`` under this package's name.

Every public name of byol-pytorch 0.8.x and 0.9.x's ``byol_pytorch.byol_pytorch`` is here with its signature,
so that replacing ``byol_pytorch`` by ``byol_wrapper`` in imports (``from byol_wrapper.byol_pytorch import
BYOL, EMA, RandomApply, ...``) keeps code running. The learner, the wrapper and the heads are this package's
own (see ``README.md``, "Coming from byol-pytorch", for what differs and the keyword restoring
byol-pytorch's behaviour); the small helpers behave as byol-pytorch's, without ``assert`` on user input and
without ``.data`` loops.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import wraps
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .byol import BYOL, NetWrapper
from .compat import EMA
from .heads import MLP, SimSiamMLP
from .sem import SEM

__all__ = [
    "BYOL",
    "EMA",
    "MLP",
    "MaybeSyncBatchnorm",
    "NetWrapper",
    "RandomApply",
    "SEM",
    "SimSiamMLP",
    "cosine_loss_fn",
    "default",
    "divisible_by",
    "exists",
    "flatten",
    "get_module_device",
    "kl_loss_fn",
    "l2norm",
    "loss_fn",
    "set_requires_grad",
    "singleton",
    "update_moving_average",
]


def exists(v: Any) -> bool:
    """``v is not None``."""
    return v is not None


def default(val: Any, def_val: Any) -> Any:
    """``def_val`` when ``val`` is ``None``, else ``val``."""
    return def_val if val is None else val


def divisible_by(num: int, den: int) -> bool:
    """``num % den == 0``."""
    return (num % den) == 0


def l2norm(t: torch.Tensor) -> torch.Tensor:
    """L2-normalises the last dimension."""
    return F.normalize(t, dim=-1, p=2)


def flatten(t: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` -> ``(B, -1)``."""
    return t.reshape(t.shape[0], -1)


def singleton(cache_key: str) -> Callable[[Callable], Callable]:
    """Method decorator: the first result is stored as ``self.<cache_key>`` and returned while it is not ``None``."""

    def inner_fn(fn: Callable) -> Callable:
        @wraps(fn)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            instance = getattr(self, cache_key)
            if instance is not None:
                return instance
            instance = fn(self, *args, **kwargs)
            setattr(self, cache_key, instance)
            return instance

        return wrapper

    return inner_fn


def get_module_device(module: nn.Module) -> torch.device:
    """Device of the module's first parameter (first buffer without parameters).

    Raises:
        ValueError: the module has neither parameters nor buffers.
    """
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    raise ValueError(f"get_module_device: {type(module).__name__} has no parameters or buffers to take a device from")


def set_requires_grad(model: nn.Module, val: bool) -> None:
    """Sets ``requires_grad`` of every parameter of ``model``."""
    for p in model.parameters():
        p.requires_grad_(val)


def MaybeSyncBatchnorm(is_distributed: bool | None = None) -> type[nn.Module]:  # noqa: N802 - byol-pytorch's name
    """``nn.SyncBatchNorm`` when ``is_distributed`` (default: a process group of more than one rank), else
    ``nn.BatchNorm1d``."""
    if is_distributed is None:
        is_distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return nn.SyncBatchNorm if is_distributed else nn.BatchNorm1d


def cosine_loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ``2 - 2 cos(x, y)`` (byol-pytorch 0.9's; gradients flow into both arguments)."""
    return 2 - 2 * (l2norm(x) * l2norm(y)).sum(dim=-1)


loss_fn = cosine_loss_fn  # byol-pytorch 0.8's name for it


def kl_loss_fn(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``KL(y || x)`` of probability vectors (batch mean), both clamped at ``eps`` (byol-pytorch 0.9's)."""
    x, y = (t.clamp_min(eps) for t in (x, y))
    return F.kl_div(x.log(), y, reduction="batchmean")


class RandomApply(nn.Module):
    """Applies ``fn`` to the whole batch with probability ``p`` (one Python ``random.random()`` draw per call,
    as byol-pytorch's, so seeded pipelines draw the same).

    Args:
        fn: Callable on a batch (a torchvision or Kornia transform, an ``nn.Module``...).
        p: Probability of applying it, in [0, 1].

    Raises:
        TypeError: ``fn`` is not callable.
        ValueError: ``p`` is not in [0, 1].
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], p: float) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"RandomApply: fn must be callable (a transform), got {type(fn).__name__}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomApply: p must be a probability in [0, 1], got {p!r}")
        self.fn = fn
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if random.random() > self.p:
            return x
        return self.fn(x)


@torch.no_grad()
def update_moving_average(ema_updater: EMA, ma_model: nn.Module, current_model: nn.Module) -> None:
    """Moves the parameters of ``ma_model`` towards ``current_model``: ``ma = beta * ma + (1 - beta) * current``.

    With an :class:`EMA` (or anything with a numeric ``beta`` and EMA's ``update_average``), one fused
    ``torch._foreach_lerp_``; a custom ``update_average`` is applied tensor by tensor. Parameters only, as in
    byol-pytorch (``BYOL.update_moving_average()`` also follows buffers, see ``buffer_policy``).

    Raises:
        RuntimeError: the two models have different numbers of parameters.
    """
    ma, current = list(ma_model.parameters()), list(current_model.parameters())
    if len(ma) != len(current):
        raise RuntimeError(
            f"update_moving_average: ma_model has {len(ma)} parameters and current_model {len(current)}; "
            "they must have the same structure (ma_model is a copy of current_model)"
        )
    update = getattr(type(ema_updater), "update_average", None)
    beta = getattr(ema_updater, "beta", None)
    if update is EMA.update_average and isinstance(beta, (int, float)) and not isinstance(beta, bool):
        if ma and beta < 1.0:
            torch._foreach_lerp_(ma, current, 1.0 - float(beta))
        return
    for ma_p, p in zip(ma, current):
        ma_p.copy_(ema_updater.update_average(ma_p, p))
