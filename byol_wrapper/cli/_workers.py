"""Stopping DataLoader worker processes for certain, so that ``byol-train`` always exits.

``byol-train``'s DataLoader workers ignore SIGINT and SIGTERM (the main process alone decides when to stop, at a
step boundary, after saving). The price is that SIGTERM, which is how both torch (``_shutdown_workers``) and
multiprocessing (its exit handler terminates daemonic children, then joins them) stop workers that did not stop on
request, no longer stops them. Whenever a DataLoader iterator outlives the run (a persistent-workers iterator held
by the trainer, which a traceback keeps alive after an uncaught exception, or a worker that missed the join
timeout), the interpreter then waits forever in multiprocessing's exit handler.

:func:`shutdown_loader` stops a loader's workers at the end of a run (the polite request first, SIGKILL for any
that remain), and :func:`install_exit_guard` registers an exit handler, run before multiprocessing's, that kills
any daemonic child still alive, so that no path (finish, error, signal) can hang at exit.
"""

from __future__ import annotations

import atexit
import multiprocessing
from typing import Any

__all__ = ["install_exit_guard", "kill_daemonic_children", "shutdown_loader"]

_JOIN_TIMEOUT_S = 5.0
_guard_installed = False


def _kill(processes: list[Any], timeout: float) -> None:
    for p in processes:
        if p.is_alive():
            p.kill()  # SIGKILL: cannot be ignored
    for p in processes:
        p.join(timeout)


def shutdown_loader(loader: Any, timeout: float = _JOIN_TIMEOUT_S) -> None:
    """Stops the worker processes of ``loader``'s live iterator, if it has one (persistent workers).

    Asks the workers to stop (torch's own shutdown, which joins them with a timeout), then kills any that are
    still alive, and drops the iterator. Safe to call on any DataLoader, more than once.
    """
    inner = getattr(loader, "loader", None)  # a wrapper of a DataLoader (GPU-decoded batches)
    if inner is not None and inner is not loader:
        shutdown_loader(inner, timeout)
    iterator = getattr(loader, "_iterator", None)
    if iterator is None:
        return
    workers = list(getattr(iterator, "_workers", []))
    shutdown = getattr(iterator, "_shutdown_workers", None)
    try:
        if shutdown is not None:
            shutdown()
    finally:
        _kill(workers, timeout)
        loader._iterator = None


def kill_daemonic_children(timeout: float = _JOIN_TIMEOUT_S) -> None:
    """Kills (SIGKILL) and reaps every daemonic multiprocessing child of this process that is still alive.

    Daemonic children are the ones multiprocessing would terminate at exit anyway (DataLoader workers are
    daemonic); this does it with a signal that workers cannot ignore.
    """
    _kill([p for p in multiprocessing.active_children() if p.daemon], timeout)


def install_exit_guard() -> None:
    """Registers :func:`kill_daemonic_children` to run at interpreter exit, once per process.

    ``atexit`` runs handlers in the reverse order of registration; multiprocessing registers its own when it is
    imported (torch imports it), so this one, registered later, runs first.
    """
    global _guard_installed
    if not _guard_installed:
        atexit.register(kill_daemonic_children)
        _guard_installed = True
