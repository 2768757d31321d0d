"""Target-network momentum: the cosine tau schedule and a fused exponential moving average.

Paper (Grill et al. 2020, Sec. 3.3): "the exponential moving average parameter tau starts from tau_base = 0.996
and is increased to one during training", with ``tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2`` at step
``k`` of ``K``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

__all__ = ["BufferPolicy", "cosine_tau", "ema_update_", "copy_weights_"]

BufferPolicy = Literal["ema", "copy", "none"]
BUFFER_POLICIES = ("ema", "copy", "none")


def cosine_tau(step: int, total_steps: int | None, base_tau: float) -> float:
    """tau at ``step`` of ``total_steps``: ``1 - (1 - base_tau) * (cos(pi * step / total_steps) + 1) / 2``.

    Args:
        step: Optimizer steps done so far (0 for the first update).
        total_steps: Length of training in optimizer steps; ``None`` keeps tau constant at ``base_tau``.
        base_tau: tau at step 0 (0.996 in the paper).

    Returns:
        tau, a Python float (no device sync), reaching 1.0 at ``step >= total_steps``.
    """
    if total_steps is None:
        return float(base_tau)
    progress = min(max(step, 0) / total_steps, 1.0)
    return 1.0 - (1.0 - base_tau) * (math.cos(math.pi * progress) + 1.0) / 2.0


def _pairs(target: nn.Module, online: nn.Module, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    get = (lambda m: m.parameters()) if kind == "parameters" else (lambda m: m.buffers())
    t, o = list(get(target)), list(get(online))
    if len(t) != len(o):
        raise RuntimeError(
            f"target and online networks have different numbers of {kind} ({len(t)} vs {len(o)}); "
            f"call reset_moving_average() after changing the online network"
        )
    return t, o


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, tau: float, buffers: BufferPolicy = "ema") -> None:
    """``target = tau * target + (1 - tau) * online`` for all parameters in one fused ``torch._foreach_lerp_``.

    Buffers follow ``buffers``: ``"ema"`` lerps floating-point buffers (BatchNorm running mean/var) with the same
    tau and copies integer ones (``num_batches_tracked``); ``"copy"`` copies all buffers from the online network;
    ``"none"`` leaves target buffers to evolve on their own.

    Args:
        target: The EMA network (same structure as ``online``).
        online: The trained network.
        tau: Decay in ``[0, 1]``; 1 keeps the target unchanged.
        buffers: The buffer policy.
    """
    if tau < 1.0:
        t, o = _pairs(target, online, "parameters")
        if t:
            torch._foreach_lerp_(t, o, 1.0 - tau)
    if buffers == "none":
        return
    lerp_t, lerp_o, copy_t, copy_o = [], [], [], []
    for t_, o_ in zip(*_pairs(target, online, "buffers")):
        if buffers == "ema" and t_.is_floating_point():
            lerp_t.append(t_)
            lerp_o.append(o_)
        else:
            copy_t.append(t_)
            copy_o.append(o_)
    if lerp_t and tau < 1.0:
        torch._foreach_lerp_(lerp_t, lerp_o, 1.0 - tau)
    if copy_t:
        torch._foreach_copy_(copy_t, copy_o)


@torch.no_grad()
def copy_weights_(target: nn.Module, online: nn.Module) -> None:
    """Copies all parameters and buffers of ``online`` into ``target`` (same structure)."""
    t, o = _pairs(target, online, "parameters")
    if t:
        torch._foreach_copy_(t, o)
    tb, ob = _pairs(target, online, "buffers")
    if tb:
        torch._foreach_copy_(tb, ob)
