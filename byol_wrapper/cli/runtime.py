"""The process around a run: ranks of a ``torchrun`` launch, the device, precision, seeding, signals and ``--out``.

Nothing here trains; :mod:`byol_wrapper.cli.trainer` uses it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..engine import autocast, grad_scaler, resolve_device
from ..engine import resolve_precision as engine_precision
from ..lock import RunLock, RunLockedError
from .args import UsageError

__all__ = ["EXIT_DIVERGED", "Ranks", "autocast", "grad_scaler", "lock_out", "resolve_precision", "select_device", "start_ranks"]

EXIT_DIVERGED = 3
"""Exit status when the loss or the model state became NaN or infinite (nothing non-finite was saved)."""


class Diverged(RuntimeError):
    """The loss, or the model or optimizer state, became NaN or infinite."""


class OutputError(RuntimeError):
    """Writing to ``--out`` failed (full disk, read-only file system...): reported with exit status 2."""


def out_problem(out: Path, exc: OSError) -> str:
    """One line naming what is wrong with ``--out`` and what to do."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        fix = "free some space (or raise the quota)"
    elif exc.errno == errno.EROFS:
        fix = "choose a folder on a writable file system"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        fix = "fix the folder's permissions or choose another --out"
    else:
        fix = "check the disk or choose another --out"
    return f"cannot write to --out {out} ({reason}); {fix}"


def lock_out(out_arg: str, ranks: "Ranks") -> RunLock | None:
    """Creates ``--out`` and locks it for this run (rank 0 only); every rank raises the same UsageError if not."""
    lock: RunLock | None = None
    problem: str | None = None
    if ranks.main:
        out = Path(out_arg).expanduser()
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = RunLock(out).acquire()
        except RunLockedError as exc:
            problem = f"{exc}: a second byol-train must not write the same --out. Wait for it, stop it, or use another --out"
        except (FileExistsError, NotADirectoryError):
            problem = f"--out {out} (or a folder above it) is a file, not a folder; pass a folder path"
        except OSError as exc:
            problem = out_problem(out, exc)
    if ranks.sum(int(problem is not None))[0]:  # a collective: the other ranks refuse with rank 0
        raise UsageError(problem or "rank 0 cannot use --out (see its message)")
    return lock


def select_device(spec: str | None) -> torch.device:
    """The training device of ``--device SPEC``: CUDA if available when not given, else SPEC checked to be usable."""
    try:
        return resolve_device(spec)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


class Ranks:
    """The ranks of a ``torchrun`` launch (``WORLD_SIZE > 1``), or the one process of a plain run.

    Collectives that only carry host values (flags, RNG states) go over a gloo group, so they never wait for
    the GPU: with NCCL a separate gloo group is created for them.
    """

    def __init__(self, world: int = 1, rank: int = 0, host_group: Any = None) -> None:
        self.world = world
        self.rank = rank
        self.host_group = host_group
        self.main = rank == 0

    def sum(self, *values: int) -> list[int]:
        """The element-wise sum of ``values`` over all ranks (host ints, gloo)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, group=self.host_group)
        return [int(v) for v in t.tolist()]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.host_group)
        return out

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over all ranks (a device collective)."""
        if self.world == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.host_group)


def start_ranks(spec: str | None) -> tuple[Ranks, torch.device]:
    """Joins the ``torchrun`` process group when ``WORLD_SIZE > 1``; returns the ranks and this rank's device.

    Each rank uses ``cuda:LOCAL_RANK`` (NCCL) when the device is CUDA, else the CPU (gloo).
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or "1")
    except ValueError as exc:
        raise UsageError(f"WORLD_SIZE must be an int (set by torchrun), got {os.environ.get('WORLD_SIZE')!r}") from exc
    device = select_device(spec)
    if world <= 1:
        return Ranks(), device
    if not dist.is_available():
        raise UsageError(f"WORLD_SIZE={world} (torchrun) but this torch build has no torch.distributed")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UsageError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible; launch at most that many "
                "processes per node (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return Ranks(dist.get_world_size(), dist.get_rank(), host_group), device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``--precision``: ``fp16`` without CUDA falls back to float32 with a warning; ``bf16`` needs GPU support."""
    if precision == "fp16" and device.type != "cuda":
        warnings.warn(
            f"--precision fp16 (with a GradScaler) needs a CUDA device; training in float32 on {device.type} "
            "(use --precision bf16 for bfloat16 autocast on the CPU)",
            RuntimeWarning,
            stacklevel=2,
        )
        return "32"
    try:
        return engine_precision(precision, device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops at a step boundary, and print their
    warnings (an unreadable image) as one line each, once per message."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    warnings.showwarning = _one_line(None)
    warnings.simplefilter("default")


def _one_line(say: Callable[[str], None] | None) -> Callable[..., None]:
    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: str | None = None) -> None:
        text = f"warning: {message}"
        if say is not None:
            say(text)
        else:
            print(text, file=sys.stderr, flush=True)

    return show


@contextlib.contextmanager
def one_line_warnings(say: Callable[[str], None] | None) -> Iterator[None]:
    """Shows warnings as ``warning: MESSAGE`` lines through ``say`` (the progress bar's write), without Python's
    ``file:line: Category:`` prefix and source echo; ``None``: on stderr. Restored on exit."""
    # Where warnings are being recorded (warnings.catch_warnings(record=True), as pytest does), leave them be.
    recording = getattr(getattr(warnings, "_showwarnmsg_impl", None), "__name__", "_showwarnmsg_impl") != "_showwarnmsg_impl"
    previous = warnings.showwarning
    if not recording:
        warnings.showwarning = _one_line(say)
    try:
        yield
    finally:
        warnings.showwarning = previous


@contextlib.contextmanager
def graceful_stop() -> Iterator[dict[str, int]]:
    """SIGINT/SIGTERM set a flag (the loop saves a checkpoint and stops); a second signal interrupts at once."""
    flag: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        if flag:
            raise KeyboardInterrupt
        flag["signal"] = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
            # Restart interrupted system calls (SA_RESTART): the flag is read at step boundaries anyway, and a
            # signal must not fail a blocking call inside the DataLoader or a collective (EINTR).
            signal.siginterrupt(sig, False)
        except (ValueError, OSError):  # pragma: no cover
            pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def seed_everything(seed: int) -> None:
    """Seeds Python's, torch's and (if installed) numpy's global generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
