"""Crash-safe training checkpoints that load with ``torch.load(..., weights_only=True)``.

Writing (:func:`save_checkpoint`): the state is moved to the CPU, a SHA-256 digest of its content is added,
and it is written to a temporary file in the destination folder, flushed and ``fsync``-ed; the current
checkpoint is then renamed to ``<name>.prev<suffix>`` (``last.pt`` -> ``last.prev.pt``) and the temporary file
renamed into place with :func:`os.replace` (atomic on POSIX), and the folder is ``fsync``-ed. A process killed at
any moment (SIGKILL, power loss after the fsync) leaves a complete ``last.pt``, or no ``last.pt`` and a complete
``last.prev.pt``, plus possibly a stray temporary file that :func:`remove_stale_temporaries` deletes.

Reading (:func:`load_latest_checkpoint`): ``last.pt`` is loaded with ``weights_only=True`` and its format tag and
digest are checked; if it is missing, truncated or corrupt, ``last.prev.pt`` is used with a warning (a corrupt
file is renamed to ``<name>.corrupt``, or ``<name>.corrupt.1``, ``.2``... when that name is taken, so that the next
save cannot rotate it over the good previous one and no file set aside ever replaces another). A file that cannot
be *read* (permission denied, I/O error) raises :class:`CheckpointUnreadableError` and a file that loads but is not
one of ours (a plain ``state_dict``, a whole pickled model) raises :class:`ForeignCheckpointError`: both are left
untouched.

Saving (:func:`nonfinite_entries`): callers check the state on its device before writing, so that a diverged
state (NaN or infinite weights, buffers or optimizer moments) never replaces a finite checkpoint.

Only tensors, Python scalars, strings, ``None``, lists and dicts may be stored: nothing pickles code.
"""

from __future__ import annotations

import errno
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
    "CheckpointUnreadableError",
    "ForeignCheckpointError",
    "atomic_save",
    "load_checkpoint",
    "load_latest_checkpoint",
    "nonfinite_entries",
    "previous_path",
    "remove_stale_temporaries",
    "rng_state",
    "save_checkpoint",
    "set_aside",
    "set_rng_state",
    "state_digest",
]

CHECKPOINT_FORMAT = "byol_wrapper.checkpoint/1"
"""Format tag stored under ``"format"`` in every checkpoint written by :func:`save_checkpoint`."""

_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not one of ours."""


class CheckpointUnreadableError(CheckpointError):
    """The file exists but cannot be read (permission denied, I/O error): not evidence of corruption."""


class ForeignCheckpointError(CheckpointError):
    """The file loads but is not a ``byol_wrapper`` checkpoint (e.g. a plain ``state_dict`` or a pickled model)."""


def set_aside(path: str | os.PathLike[str], tag: str) -> Path:
    """Renames ``path`` to ``<name>.<tag>``, or ``<name>.<tag>.1``, ``.2``... : never over an existing file.

    The new name is claimed with a hard link (fails if it exists) before the old one is removed; where hard
    links are not supported the first free name is used with :func:`os.rename`.

    Args:
        path: The file to move.
        tag: Suffix, e.g. ``"corrupt"``.

    Returns:
        The new path.

    Raises:
        OSError: The file cannot be moved.
    """
    path = Path(path)
    for i in range(10_000):
        target = path.with_name(f"{path.name}.{tag}" + (f".{i}" if i else ""))
        try:
            os.link(path, target)
        except FileExistsError:
            continue
        except OSError:
            if target.exists() or target.is_symlink():
                continue
            os.rename(path, target)
            return target
        os.unlink(path)
        return target
    raise OSError(f"no free name to set {path} aside")


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor on ``t``'s device: no NaN and no infinity in ``t``.

    The minimum and maximum are finite exactly when every element is (NaN propagates through both); one
    reduction pass without the full-size boolean mask of ``isfinite(t).all()`` (much faster on the CPU; figures in
    the issue-10 notes of ``benchmarks/RESULTS.md``).
    """
    if t.is_complex():
        return torch.isfinite(t).all()
    return torch.isfinite(torch.stack(torch.aminmax(t))).all()


def nonfinite_entries(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in ``state`` that hold a NaN or an infinity (empty: all finite).

    The check runs on the tensors' own devices with one min/max reduction per tensor and a single host transfer
    per device, so it costs one synchronisation: call it where the state is about to be copied to the host anyway
    (a checkpoint write), never inside a training step. Names are only computed when something is not finite.

    Args:
        state: A nested dict/list of tensors and plain values (e.g. ``{"learner": ..., "optimizer": ...}``).
        prefix: Prepended to the names.

    Returns:
        Dotted names such as ``"learner.online_encoder.net.bn1.running_var"``.
    """
    named: list[tuple[str, torch.Tensor]] = []

    def walk(obj: Any, name: str) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() or obj.is_complex():
                named.append((name, obj.detach()))
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}.{i}" if name else str(i))

    walk(state, prefix)
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        if t.numel():
            by_device.setdefault(t.device, []).append(i)
    bad: list[str] = []
    for indices in by_device.values():
        flags = torch.stack([_all_finite(named[i][1]) for i in indices])
        if bool(flags.all()):  # the one host sync of this device
            continue
        bad += [named[i][0] for i, ok in zip(indices, flags.tolist()) if not ok]
    return bad


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
    # Reading is apart from decoding: a file that cannot be read (permission denied, I/O error) is not evidence of
    # corruption, whereas torch.load reports a truncated file with OSErrors too. So read it through first (into the
    # page cache, which the load below then reads again at memory speed).
    try:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except OSError as exc:
        raise CheckpointUnreadableError(f"{path} cannot be read ({type(exc).__name__}: {exc.strerror or exc})") from exc
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:
        if exc.errno in (errno.EIO, errno.EACCES, errno.EPERM):
            raise CheckpointUnreadableError(f"{path} cannot be read ({type(exc).__name__}: {exc.strerror or exc})") from exc
        raise CheckpointError(f"{path} cannot be loaded ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # noqa: BLE001 - any other failure means the file is unusable
        detail = (str(exc).splitlines() or [""])[0]
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        if "weights only load failed" in str(exc).lower() and "unsupported global" in str(exc).lower():
            # A complete torch file holding pickled objects (a whole saved model...): not ours, not a torn write.
            raise ForeignCheckpointError(
                f"{path} cannot be loaded with weights_only=True: it holds pickled Python objects, so it is not a "
                f"byol_wrapper checkpoint ({type(exc).__name__}: {detail})"
            ) from exc
        raise CheckpointError(f"{path} cannot be loaded ({type(exc).__name__}: {detail})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "sha256" not in state:
        if isinstance(state, dict) and str(state.get("format", "")).startswith("byol_wrapper.checkpoint/") and "sha256" in state:
            raise ForeignCheckpointError(
                f"{path} is a byol_wrapper checkpoint of another format ({state['format']!r}, this version reads "
                f"{CHECKPOINT_FORMAT!r}); use the byol_wrapper version that wrote it"
            )
        kind = f"a {type(state).__name__}" + (f" with keys {sorted(map(str, state))[:5]}" if isinstance(state, dict) else "")
        raise ForeignCheckpointError(
            f"{path} is not a complete byol_wrapper checkpoint (format tag or digest missing; it holds {kind})"
        )
    if state_digest(state) != state["sha256"]:
        raise CheckpointError(f"{path} is corrupt: its content does not match the stored SHA-256 digest")
    return state


def load_latest_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> tuple[dict[str, Any] | None, Path | None]:
    """Loads ``path`` (e.g. ``OUT/last.pt``), falling back to its previous version if it is unusable.

    A corrupt or truncated file produces a warning and is set aside as ``<name>.corrupt`` (``.corrupt.1``... if
    taken, see :func:`set_aside`); if neither file is usable the result is ``(None, None)`` (start from scratch)
    and a warning says so when a file existed. A file that cannot be read, or that is not a byol_wrapper
    checkpoint, raises and nothing is moved: neither is evidence that the run is lost.

    Args:
        path: The main checkpoint path.
        map_location: Passed to :func:`torch.load`.

    Returns:
        ``(checkpoint, the file it came from)``, or ``(None, None)``.

    Raises:
        CheckpointUnreadableError: A checkpoint file exists but cannot be read (permissions, I/O error).
        ForeignCheckpointError: A checkpoint file loads but is not a byol_wrapper checkpoint.
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
        except (CheckpointUnreadableError, ForeignCheckpointError):
            raise
        except CheckpointError as exc:
            try:
                corrupt = set_aside(candidate, "corrupt")
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
