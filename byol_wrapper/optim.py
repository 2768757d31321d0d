"""Optimizers and learning-rate schedules for BYOL pretraining.

* :class:`LARS`: layer-wise adaptive rate scaling (You et al. 2017) as used by BYOL (Grill et al. 2020,
  Sec. 3.3 and App. C): SGD with momentum whose update of each weight tensor is rescaled by the trust ratio
  ``eta * ||w|| / ||g + weight_decay * w||``. Parameter groups marked ``lars_exclude=True`` (biases and
  normalisation parameters, see :func:`param_groups`) get neither weight decay nor the trust ratio, as in the
  paper ("we exclude the biases and batch normalization parameters from both LARS adaptation and weight
  decay").
* :func:`param_groups`: splits a model's trainable parameters into a decayed group and an excluded group.
* :func:`warmup_cosine_lr`: per-step linear warmup followed by cosine decay (paper: 10 warmup epochs, then
  cosine decay to 0).
* :func:`build_optimizer`: ``"lars"``, ``"adamw"`` or ``"sgd"`` from a name.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    >>> opt = LARS(param_groups(model, weight_decay=1.5e-6), lr=0.2)
    >>> [len(g["params"]) for g in opt.param_groups]  # weight | bias + BatchNorm weight and bias
    [1, 3]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .utils.checks import check_float, check_int, is_int

__all__ = ["LARS", "OPTIMIZERS", "build_optimizer", "is_excluded_parameter", "param_groups", "warmup_cosine_lr"]

OPTIMIZERS = ("lars", "adamw", "sgd")

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)


def is_excluded_parameter(name: str, param: torch.Tensor, module: nn.Module) -> bool:
    """Whether a parameter is excluded from weight decay and LARS adaptation.

    Excluded: every parameter of a normalisation layer (BatchNorm, SyncBatchNorm, InstanceNorm, LayerNorm,
    GroupNorm, RMSNorm), every bias, and any other parameter with fewer than 2 dimensions (scales and shifts
    of custom norm layers, layer-scale vectors).

    Args:
        name: The parameter's own name inside ``module`` (e.g. ``"bias"``).
        param: The parameter.
        module: The module that owns it directly.

    Returns:
        ``True`` if the parameter belongs to the excluded group.
    """
    return isinstance(module, _NORM_TYPES) or name == "bias" or param.ndim <= 1


def param_groups(
    model: nn.Module,
    weight_decay: float,
    exclude: Callable[[str, torch.Tensor, nn.Module], bool] = is_excluded_parameter,
) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed group and an excluded group (biases, norms).

    Only parameters with ``requires_grad=True`` are included, so a BYOL learner's frozen target network is left
    out. Shared parameters are included once.

    Args:
        model: The model (e.g. a :class:`byol_wrapper.BYOL` learner).
        weight_decay: Weight decay of the regular group.
        exclude: Predicate ``(name, param, owner_module) -> bool`` selecting the excluded parameters; defaults
            to :func:`is_excluded_parameter`.

    Returns:
        ``[{"params": regular, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True}]``, empty groups omitted.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``weight_decay`` is not a number.
        ValueError: ``weight_decay`` is negative, or the model has no trainable parameter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    weight_decay = check_float("weight_decay", weight_decay)
    seen: set[int] = set()
    regular: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (excluded if exclude(name, param, module) else regular).append(param)
    if not regular and not excluded:
        raise ValueError("model has no trainable parameter (requires_grad=True); nothing to optimise")
    groups = []
    if regular:
        groups.append({"params": regular, "weight_decay": weight_decay, "lars_exclude": False})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars_exclude": True})
    return groups


class LARS(Optimizer):
    """LARS: SGD with momentum and a layer-wise trust ratio, as in BYOL's reference implementation.

    For each parameter tensor ``w`` with gradient ``g`` in a group with ``lars_exclude=False``::

        u = g + weight_decay * w
        trust = trust_coefficient * ||w|| / ||u||      (1 if ||w|| == 0 or ||u|| == 0)
        buf = momentum * buf + trust * u
        w = w - lr * buf

    In groups with ``lars_exclude=True`` (biases and normalisation parameters), ``u = g`` and ``trust = 1``
    (plain SGD with momentum; the group's ``weight_decay`` is ignored). The update norm is the exact
    ``||g + weight_decay * w||`` of BYOL's and SimCLR's reference code (not the ``||g|| + wd ||w||`` bound of
    some PyTorch ports). No host synchronisation happens in :meth:`step`.

    Args:
        params: Parameters or parameter groups (see :func:`param_groups`).
        lr: Learning rate.
        momentum: Momentum factor (0.9 in the paper).
        weight_decay: Default weight decay of groups that do not set one (1.5e-6 in the paper).
        trust_coefficient: The LARS ``eta`` (1e-3 in the paper).
        nesterov: Use Nesterov momentum.
        lars_exclude: Default for groups that do not set ``lars_exclude``.

    Raises:
        TypeError: A hyper-parameter is not a number.
        ValueError: A hyper-parameter is out of range.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        nesterov: bool = False,
        lars_exclude: bool = False,
    ) -> None:
        lr = check_float("lr", lr)
        momentum = check_float("momentum", momentum)
        weight_decay = check_float("weight_decay", weight_decay)
        trust_coefficient = check_float("trust_coefficient", trust_coefficient, strict=True)
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0; pass momentum=0.9 or nesterov=False")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            nesterov=bool(nesterov),
            lars_exclude=bool(lars_exclude),
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one optimisation step.

        Args:
            closure: Optional closure that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LARS does not support sparse gradients; use dense parameters")
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p in params:  # the fused (foreach) kernels need one device and dtype per list
                buckets.setdefault((p.device, p.dtype), []).append(p)
            for bucket in buckets.values():
                self._update(bucket, group)
        return loss

    def _update(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """One step for parameters of one device and dtype, with fused multi-tensor kernels (no host sync)."""
        momentum, weight_decay, lr = group["momentum"], group["weight_decay"], group["lr"]
        grads = [p.grad for p in params]
        if group["lars_exclude"]:
            updates = grads
        else:
            updates = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay != 0 else grads
            p_norm = torch.stack(torch._foreach_norm(params))
            u_norm = torch.stack(torch._foreach_norm(updates))
            ok = (p_norm > 0) & (u_norm > 0)
            trust = torch.where(ok, group["trust_coefficient"] * p_norm / torch.where(ok, u_norm, 1.0), 1.0)
            updates = torch._foreach_mul(updates, list(trust.to(params[0].dtype).unbind()))
        if momentum != 0:
            old = [(self.state[p]["momentum_buffer"], u) for p, u in zip(params, updates) if "momentum_buffer" in self.state[p]]
            for p, u in zip(params, updates):
                if "momentum_buffer" not in self.state[p]:  # first step: the buffer starts as the update
                    self.state[p]["momentum_buffer"] = u.detach().clone()
            if old:
                bufs, upd = (list(x) for x in zip(*old))
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, upd)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            updates = torch._foreach_add(updates, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, updates, alpha=-lr)


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, final_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step``: linear warmup, then cosine decay.

    ``lr = base_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``; afterwards
    ``lr = final_lr + (base_lr - final_lr) * (1 + cos(pi * t)) / 2`` with
    ``t = (step - warmup_steps) / (total_steps - warmup_steps)``, so the first step after warmup uses
    ``base_lr`` and the value reaches ``final_lr`` at ``step == total_steps``.

    Args:
        step: Index of the optimizer step (0 for the first step).
        total_steps: Length of training in optimizer steps.
        warmup_steps: Number of warmup steps (0 for none; at most ``total_steps``).
        base_lr: Peak learning rate.
        final_lr: Learning rate at the end of the cosine.

    Returns:
        The learning rate as a Python float.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: ``total_steps < 1``, ``warmup_steps`` outside ``[0, total_steps]``, or a negative rate.
    """
    if not is_int(step):
        raise TypeError(f"step must be an int, got {step!r}")
    total_steps = check_int("total_steps", total_steps, 1)
    warmup_steps = check_int("warmup_steps", warmup_steps, 0)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    base_lr = check_float("base_lr", base_lr)
    final_lr = check_float("final_lr", final_lr)
    step = max(step, 0)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return base_lr
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    trust_coefficient: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
) -> Optimizer:
    """Creates ``"lars"``, ``"adamw"`` or ``"sgd"`` over the trainable parameters of ``model``.

    All three exclude biases and normalisation parameters from weight decay (:func:`param_groups`); LARS also
    excludes them from the trust-ratio adaptation.

    Args:
        name: One of :data:`OPTIMIZERS`.
        model: The model; only parameters with ``requires_grad=True`` are optimised.
        lr: Learning rate (the schedule overwrites it every step).
        weight_decay: Weight decay of the regular parameters.
        momentum: Momentum of LARS and SGD.
        trust_coefficient: LARS ``eta``.
        betas: AdamW betas.

    Returns:
        The optimizer.

    Raises:
        ValueError: Unknown ``name``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    groups = param_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, trust_coefficient=trust_coefficient)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=betas)
