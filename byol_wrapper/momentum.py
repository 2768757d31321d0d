"""Target-network momentum: the cosine tau schedule and a fused exponential moving average.

Paper (Grill et al. 2020, Sec. 3.3): "the exponential moving average parameter tau starts from tau_base = 0.996
and is increased to one during training", with ``tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2`` at step
``k`` of ``K``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

__all__ = ["BufferPolicy", "EMAPlan", "apply_ema_", "copy_weights_", "cosine_tau", "ema_update_", "make_ema_plan"]

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


@dataclass
class EMAPlan:
    """The tensor lists of one EMA update, built once (walking two module trees costs more than the update).

    Attributes:
        lerp_target: Target tensors moved by ``lerp`` (parameters, and floating buffers under ``"ema"``).
        lerp_online: The matching online tensors.
        copy_target: Target buffers copied from the online network.
        copy_online: The matching online buffers.
    """

    lerp_target: list[torch.Tensor] = field(default_factory=list)
    lerp_online: list[torch.Tensor] = field(default_factory=list)
    copy_target: list[torch.Tensor] = field(default_factory=list)
    copy_online: list[torch.Tensor] = field(default_factory=list)


def make_ema_plan(target: nn.Module, online: nn.Module, buffers: BufferPolicy = "ema") -> EMAPlan:
    """Pairs the tensors of ``target`` and ``online`` for :func:`apply_ema_`, following the buffer policy.

    The plan holds references: rebuild it when tensors are replaced (``module.to(...)`` replaces buffers).

    Raises:
        RuntimeError: the two networks have different structures.
    """
    plan = EMAPlan(*_pairs(target, online, "parameters"))
    if buffers == "none":
        return plan
    for t_, o_ in zip(*_pairs(target, online, "buffers")):
        if buffers == "ema" and t_.is_floating_point():
            plan.lerp_target.append(t_)
            plan.lerp_online.append(o_)
        else:
            plan.copy_target.append(t_)
            plan.copy_online.append(o_)
    return plan


@torch.no_grad()
def apply_ema_(plan: EMAPlan, tau: float) -> None:
    """One fused ``torch._foreach_lerp_`` (weight ``1 - tau``) and one ``torch._foreach_copy_`` over the plan."""
    if tau < 1.0 and plan.lerp_target:
        torch._foreach_lerp_(plan.lerp_target, plan.lerp_online, 1.0 - tau)
    if plan.copy_target:
        torch._foreach_copy_(plan.copy_target, plan.copy_online)


def ema_update_(target: nn.Module, online: nn.Module, tau: float, buffers: BufferPolicy = "ema") -> None:
    """``target = tau * target + (1 - tau) * online`` for all parameters in one fused ``torch._foreach_lerp_``.

    Buffers follow ``buffers``: ``"ema"`` lerps floating-point buffers (BatchNorm running mean/var) with the same
    tau and copies integer ones (``num_batches_tracked``); ``"copy"`` copies all buffers from the online network;
    ``"none"`` leaves target buffers to evolve on their own. (The learner caches the plan; see
    :func:`make_ema_plan`.)

    Args:
        target: The EMA network (same structure as ``online``).
        online: The trained network.
        tau: Decay in ``[0, 1]``; 1 keeps the target unchanged.
        buffers: The buffer policy.
    """
    apply_ema_(make_ema_plan(target, online, buffers), tau)


@torch.no_grad()
def copy_weights_(target: nn.Module, online: nn.Module) -> None:
    """Copies all parameters and buffers of ``online`` into ``target`` (same structure)."""
    t, o = _pairs(target, online, "parameters")
    if t:
        torch._foreach_copy_(t, o)
    tb, ob = _pairs(target, online, "buffers")
    if tb:
        torch._foreach_copy_(tb, ob)
