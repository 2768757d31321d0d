"""One BYOL training step, shared by ``byol-train``, the demo, the examples and the benchmarks.

A step is: set the learning rate of step ``s``, forward under autocast, backward (through a ``GradScaler`` for
float16), optimizer step, then the EMA update of the target with the tau of step ``s``. The learning-rate and tau
schedules sit side by side in :class:`Schedule` and are driven by ONE step counter: the learner's own
(:attr:`byol_wrapper.BYOL.step`, the number of EMA updates, saved in its ``state_dict``). The schedule is the
source of truth for the learner's tau settings: each step writes its ``total_steps`` and base tau onto the
learner, so a run resumed with a longer schedule continues both curves on the new length from the restored step.

Example:
    >>> schedule = Schedule(total_steps=1000, base_lr=0.2, warmup_steps=100, base_tau=0.996)
    >>> for images in loader:  # doctest: +SKIP
    ...     out = train_step(learner, optimizer, images, schedule=schedule)

No host sync happens inside a step: the loss comes back as a detached device tensor; the learning rate and tau
are Python floats computed from the step counter.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from .momentum import cosine_tau
from .optim import warmup_cosine_lr
from .utils.checks import check_choice, check_float, check_int

__all__ = ["PRECISIONS", "Schedule", "StepResult", "autocast", "grad_scaler", "resolve_device", "resolve_precision", "train_step"]

PRECISIONS = ("auto", "32", "fp32", "bf16", "fp16")
"""Precision names: ``"32"``/``"fp32"`` full precision, ``"bf16"``/``"fp16"`` autocast, ``"auto"`` see
:func:`resolve_precision`."""


@dataclass
class Schedule:
    """The learning-rate and tau schedules of a run, as functions of the step.

    The learning rate is linear warmup then cosine decay (:func:`byol_wrapper.optim.warmup_cosine_lr`); tau rises
    from ``base_tau`` to 1 on a cosine (the paper's schedule, :func:`byol_wrapper.momentum.cosine_tau`). The fields
    may be changed during a run (e.g. a length fitted to a time budget); the next step uses the new values.

    Attributes:
        total_steps: Length of training in optimizer steps.
        base_lr: Peak learning rate (after warmup).
        warmup_steps: Linear warmup steps.
        final_lr: Learning rate at the end of the cosine.
        base_tau: tau at step 0 (the paper's 0.996); ``None`` leaves the learner's ``moving_average_decay``.
    """

    total_steps: int
    base_lr: float
    warmup_steps: int = 0
    final_lr: float = 0.0
    base_tau: float | None = None

    def __post_init__(self) -> None:
        self.total_steps = check_int("total_steps", self.total_steps, 1)
        self.warmup_steps = check_int("warmup_steps", self.warmup_steps, 0)
        self.base_lr = check_float("base_lr", self.base_lr)
        self.final_lr = check_float("final_lr", self.final_lr)
        if self.base_tau is not None:
            self.base_tau = check_float("base_tau", self.base_tau)
            if self.base_tau > 1.0:
                raise ValueError(f"base_tau must be in [0, 1] (the paper's 0.996), got {self.base_tau}")

    def lr(self, step: int) -> float:
        """The learning rate of step ``step`` (0 for the first)."""
        return warmup_cosine_lr(step, self.total_steps, min(self.warmup_steps, self.total_steps), self.base_lr, self.final_lr)

    def tau(self, step: int, base_tau: float | None = None) -> float:
        """The EMA decay of step ``step``, from ``self.base_tau`` (or ``base_tau`` when that is ``None``)."""
        base = self.base_tau if self.base_tau is not None else base_tau
        if base is None:
            raise ValueError("Schedule.base_tau is None: pass base_tau (the learner's moving_average_decay)")
        return cosine_tau(step, self.total_steps, base)

    def apply_to(self, learner: nn.Module) -> None:
        """Writes the tau settings onto ``learner`` (its ``total_steps``, and its base tau when set here)."""
        if getattr(learner, "total_steps", None) != self.total_steps:
            learner.total_steps = self.total_steps
        if self.base_tau is not None and getattr(learner, "moving_average_decay", None) != self.base_tau:
            learner.moving_average_decay = float(self.base_tau)


class StepResult(NamedTuple):
    """What :func:`train_step` did: the loss (a detached device tensor: no host sync), the lr and tau it used."""

    loss: torch.Tensor
    lr: float
    tau: float | None


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast for ``"bf16"`` / ``"fp16"`` on ``device``; a null context for full precision."""
    precision = check_choice("precision", precision, PRECISIONS)
    if precision in ("32", "fp32", "auto"):
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(device: torch.device | str) -> Any:
    """A ``GradScaler`` for float16 training on ``device``."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(torch.device(device).type)
    return torch.cuda.amp.GradScaler()  # torch < 2.3


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The device named by ``spec``, checked to be usable; ``None`` or ``"auto"``: CUDA if available, else the CPU.

    Raises:
        ValueError: Not a device name, or a device that is not available here (CUDA, MPS, a GPU index too high)
            or cannot hold data (``meta``).
    """
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {spec!r} is not a torch device; use e.g. cpu, cuda or cuda:1") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec} requested but CUDA is not available; use --device cpu")
    if device.type == "meta":
        raise ValueError("--device meta holds no data and cannot train; use --device cpu or cuda")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {spec} requested but MPS (Apple GPU) is not available here; use --device cpu")
    if device.type != "cpu":
        try:
            torch.empty(1, device=device)  # e.g. cuda:3 on a 1-GPU machine, or a backend this build lacks
        except (RuntimeError, AssertionError, AttributeError) as exc:
            detail = (str(exc).splitlines() or [""])[0][:160]
            raise ValueError(f"--device {spec} cannot be used ({detail}); use --device cpu or a device that exists") from exc
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` checked against ``device``; ``"auto"`` is ``"bf16"`` on a CUDA GPU that supports it, else ``"fp32"``.

    Raises:
        ValueError: ``"fp16"`` (it needs a GradScaler) without CUDA, or ``"bf16"`` on a GPU without bfloat16.
    """
    precision = check_choice("precision", precision, PRECISIONS)
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 (with a GradScaler) needs CUDA; use bf16 or fp32 on this device")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16 is not supported by this GPU; use --precision fp16 or 32")
    return precision


def train_step(
    learner: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    *,
    schedule: Schedule | None = None,
    model: nn.Module | None = None,
    precision: str = "32",
    scaler: Any = None,
    micro_batches: int = 1,
    step: int | None = None,
) -> StepResult:
    """One optimizer step of BYOL on ``images``, then the EMA update of the target.

    Args:
        learner: The :class:`byol_wrapper.BYOL` learner (its ``step`` is the step counter of both schedules).
        optimizer: Its optimizer.
        images: A batch of images, already on the learner's device.
        schedule: Sets the learning rate of every parameter group and the learner's tau settings for this step;
            ``None`` leaves both as they are.
        model: What the forward runs: the learner wrapped in ``DistributedDataParallel`` and/or ``torch.compile``
            (``None``: the learner). The EMA update always reads the plain learner.
        precision: ``"32"``/``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast around the forward only).
        scaler: A ``GradScaler`` (float16); ``None`` for a plain backward.
        micro_batches: Gradient accumulation: the batch is split into this many chunks, each forwarded and
            backpropagated with its loss divided by the number of chunks, before one optimizer step and one EMA
            update (BatchNorm then sees each chunk's statistics). With DDP only the last chunk synchronises.
        step: The step counter, for a learner without a target (``use_momentum=False``, whose ``step`` does not
            advance); ``None``: ``learner.step``, the one counter of both schedules.

    Returns:
        The mean loss (detached, on the device), the learning rate and the tau used.
    """
    micro_batches = check_int("micro_batches", micro_batches, 1)
    if micro_batches > 1 and images.shape[0] < 2 * micro_batches:
        raise ValueError(
            f"micro_batches={micro_batches} splits a batch of {images.shape[0]} images into chunks of fewer than 2; "
            "BatchNorm needs at least 2 images per chunk: lower micro_batches"
        )
    step = int(learner.step) if step is None else check_int("step", step, 0)
    if schedule is not None:
        lr = schedule.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        schedule.apply_to(learner)
    else:
        lr = float(optimizer.param_groups[0]["lr"])
    tau = learner.tau if getattr(learner, "use_momentum", True) else None
    forward = model if model is not None else learner
    optimizer.zero_grad(set_to_none=True)
    chunks = images.chunk(micro_batches) if micro_batches > 1 else (images,)
    total = None
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if last or not hasattr(forward, "no_sync") else forward.no_sync()
        with sync:
            with autocast(chunk.device, precision):
                loss = forward(chunk)
            scaled = loss / len(chunks) if len(chunks) > 1 else loss
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        total = scaled.detach() if total is None else total + scaled.detach()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if tau is not None:
        learner.update_moving_average()
    return StepResult(total, lr, tau)  # type: ignore[arg-type]
