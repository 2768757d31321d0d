"""Crash-safe training checkpoints that load with ``torch.load(..., weights_only=True)``.

Writing (:func:`save_checkpoint`): the state is moved to the CPU, a SHA-256 digest of its content is added,
and it is written to a temporary file in the destination folder, flushed and ``fsync``-ed; the current
checkpoint is then renamed to ``<name>.prev<suffix>`` (``last.pt`` -> ``last.prev.pt``) and the temporary file
renamed into place with :func:`os.replace` (atomic on POSIX), and the folder is ``fsync``-ed. A process killed at
any moment (SIGKILL, power loss after the fsync) leaves a complete ``last.pt``, or no ``last.pt`` and a complete
``last.prev.pt``, plus possibly a stray temporary file that :func:`remove_stale_temporaries` deletes.

Reading (:func:`load_latest_checkpoint`): ``last.pt`` is loaded with ``weights_only=True`` and its format tag and
digest are checked; if it is missing, truncated or corrupt, ``last.prev.pt`` is used with a warning (a corrupt
file is renamed to ``<name>.corrupt`` so that the next save cannot rotate it over the good previous one).

Only tensors, Python scalars, strings, ``None``, lists and dicts may be stored: nothing pickles code.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "atomic_save",
    "load_checkpoint",
    "load_latest_checkpoint",
    "previous_path",
    "remove_stale_temporaries",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "state_digest",
]

CHECKPOINT_FORMAT = "byol_wrapper.checkpoint/1"
"""Format tag stored under ``"format"`` in every checkpoint written by :func:`save_checkpoint`."""

_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not one of ours."""


def previous_path(path: str | os.PathLike[str]) -> Path:
    """Where the previous checkpoint of ``path`` is kept: ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def _update_digest(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _update_digest(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _update_digest(h, v)
    else:
        h.update(f"S{obj!r}".encode())


def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of a checkpoint's content (tensor bytes, dtypes, shapes, keys and plain values).

    The ``"sha256"`` entry itself is left out, so the digest of a loaded checkpoint can be compared with it.

    Args:
        state: The checkpoint dictionary.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    _update_digest(h, {k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike[str], *, keep_previous: bool = False) -> Path:
    """``torch.save`` to ``path`` atomically: temporary file in the same folder, fsync, ``os.replace``.

    Args:
        obj: What to save.
        path: Destination file; its folder is created if needed.
        keep_previous: Rename an existing ``path`` to :func:`previous_path` first.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Deletes temporary files left in ``directory`` by an :func:`atomic_save` that was killed.

    Returns:
        The files removed.
    """
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for p in directory.glob(f"{_TMP_PREFIX}*"):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str], *, keep_previous: bool = True) -> Path:
    """Writes a training checkpoint atomically, with a format tag and a content digest.

    Args:
        state: Plain dictionary of tensors, numbers, strings, ``None``, lists and dicts (e.g. ``state_dict()``
            outputs). Tensors are moved to the CPU.
        path: Destination (e.g. ``OUT/last.pt``).
        keep_previous: Keep the checkpoint being replaced as :func:`previous_path` (``last.prev.pt``).

    Returns:
        ``path``.

    Raises:
        TypeError: ``state`` is not a mapping.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    payload = _to_cpu(dict(state))
    payload["format"] = CHECKPOINT_FORMAT
    payload["sha256"] = state_digest(payload)
    return atomic_save(payload, path, keep_previous=keep_previous)


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Loads and verifies one checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Args:
        path: The checkpoint file.
        map_location: Passed to :func:`torch.load`.

    Returns:
        The checkpoint dictionary.

    Raises:
        CheckpointError: The file is missing, cannot be loaded (truncated, not a torch file, holds pickled code),
            has no format tag or digest, or its content does not match the digest.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        detail = (str(exc).splitlines() or [""])[0]
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise CheckpointError(f"{path} cannot be loaded ({type(exc).__name__}: {detail})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "sha256" not in state:
        raise CheckpointError(f"{path} is not a complete byol_wrapper checkpoint (format tag or digest missing)")
    if state_digest(state) != state["sha256"]:
        raise CheckpointError(f"{path} is corrupt: its content does not match the stored SHA-256 digest")
    return state


def load_latest_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> tuple[dict[str, Any] | None, Path | None]:
    """Loads ``path`` (e.g. ``OUT/last.pt``), falling back to its previous version if it is unusable.

    A corrupt or truncated file produces a warning and is renamed to ``<name>.corrupt``; if neither file is
    usable the result is ``(None, None)`` (start from scratch) and a warning says so when a file existed.
    Never raises for a bad file.

    Args:
        path: The main checkpoint path.
        map_location: Passed to :func:`torch.load`.

    Returns:
        ``(checkpoint, the file it came from)``, or ``(None, None)``.
    """
    path = Path(path)
    prev = previous_path(path)
    found_any = False
    for candidate in (path, prev):
        if not candidate.exists():
            continue
        found_any = True
        try:
            state = load_checkpoint(candidate, map_location)
        except CheckpointError as exc:
            corrupt = candidate.with_name(candidate.name + ".corrupt")
            try:
                os.replace(candidate, corrupt)
                moved = f"; moved it to {corrupt.name}"
            except OSError:
                moved = ""
            nxt = f"trying {prev.name}" if candidate == path else "no usable checkpoint left"
            warnings.warn(f"checkpoint {exc}{moved}; {nxt}", RuntimeWarning, stacklevel=2)
            continue
        if candidate != path:
            warnings.warn(f"resuming from the previous checkpoint {candidate}", RuntimeWarning, stacklevel=2)
        return state, candidate
    if found_any:
        warnings.warn(f"no usable checkpoint in {path.parent}; starting from scratch", RuntimeWarning, stacklevel=2)
    return None, None


def rng_state() -> dict[str, Any]:
    """The random number generator states as weights_only-loadable values.

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor per device], "python": [version, [ints], gauss],
        "numpy": [name, [ints], pos, has_gauss, cached] or None}``.
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "python": [version, list(internal), gauss],
        "numpy": None,
    }
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores the states saved by :func:`rng_state` (missing entries are left alone)."""
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(i) for i in internal), gauss))
    if state.get("numpy") is not None:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            return
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
