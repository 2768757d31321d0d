"""One writer per output folder: an OS-level lock on ``OUT/.byol-train.lock``.

:class:`RunLock` takes an exclusive :func:`fcntl.flock` on the lock file without waiting. The kernel releases it
when the process ends in any way (normal exit, exception, SIGKILL, power loss), so there is never a stale lock
to clean up by hand; the file itself stays and is simply locked again by the next run. While held, it holds
the owner's pid, host name and start time, so a second process can say which run is using the folder.

A ``flock`` belongs to the open file description, which a forked child (a DataLoader worker) would share and keep
locked after its parent is killed; so every forked child closes its copy at once (:func:`os.register_at_fork`),
and the descriptor is close-on-exec: only the process that took the lock holds it.

Example:
    >>> with RunLock("runs/byol"):  # doctest: +SKIP
    ...     train()
"""

from __future__ import annotations

import json
import os
import socket
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]

LOCK_NAME = ".byol-train.lock"
"""File name of the lock in the output folder."""

_HELD: "weakref.WeakSet[RunLock]" = weakref.WeakSet()


def _close_in_child() -> None:
    """After a fork: the child must not keep the parent's locks alive (they die with the parent)."""
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None  # noqa: SLF001
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class RunLockedError(RuntimeError):
    """Another process holds the lock of the output folder.

    Attributes:
        holder: What the running process wrote into the lock file (``pid``, ``host``, ``started``), possibly empty.
    """

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def _describe(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "another process (it has not written its pid yet)"
    where = f" on {holder['host']}" if holder.get("host") else ""
    since = f", started {holder['started']}" if holder.get("started") else ""
    return f"process {holder['pid']}{where}{since}"


class RunLock:
    """Exclusive, non-blocking, kernel-released lock of an output folder.

    Args:
        directory: The output folder (must exist).
        name: Lock file name inside it.
    """

    def __init__(self, directory: str | os.PathLike[str], name: str = LOCK_NAME) -> None:
        self.path = Path(directory) / name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Takes the lock at once or raises.

        Returns:
            ``self``.

        Raises:
            RunLockedError: Another process holds it; the message names that process.
            OSError: The lock file cannot be created (read-only file system, permissions, full disk).
        """
        import fcntl

        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder(fd)
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is in use by {_describe(holder)} (lock {self.path})", holder) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)  # releases the lock
            raise
        self._fd = fd
        _HELD.add(self)
        return self

    @staticmethod
    def _read_holder(fd: int) -> dict[str, Any]:
        try:
            data = os.pread(fd, 4096, 0)
            holder = json.loads(data.decode("utf-8", "replace") or "{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def release(self) -> None:
        """Releases the lock (idempotent). The lock file stays: deleting it could let two runs lock two files."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.release()
        except Exception:  # noqa: BLE001
            pass
