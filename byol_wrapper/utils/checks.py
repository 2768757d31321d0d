"""The one home of argument checks: every public function and class of the package validates its arguments here.

Each check returns the value in its canonical Python type and raises ``TypeError`` for a value of the wrong kind
and ``ValueError`` for one of the right kind out of range, with a message that names the argument and says what to
pass instead. ``bool`` is never taken for a number. Nothing here asserts: these are user inputs.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "check_choice",
    "check_device",
    "check_dir",
    "check_float",
    "check_int",
    "check_pair",
    "check_positive_int",
    "check_probability",
    "check_size",
    "check_stats",
    "is_int",
    "is_real",
]


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number (``bool`` excluded)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (``bool`` excluded)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int = 0, *, error: type[Exception] = TypeError) -> int:
    """An integer no smaller than ``minimum``.

    Args:
        name: Argument name for the message.
        value: The value to check.
        minimum: Smallest allowed value.
        error: Exception class for a value that is not an integer (``TypeError``; some callers historically
            raise ``ValueError`` for every bad value and keep doing so).

    Returns:
        ``value`` as an ``int``.

    Raises:
        TypeError: ``value`` is not an integer (or ``error``).
        ValueError: ``value < minimum``.
    """
    if not is_int(value):
        raise error(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}; pass an integer such as {name}={max(minimum, 1)}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; pass an integer >= {minimum}")
    return value


def check_positive_int(name: str, value: Any, *, error: type[Exception] = TypeError, what: str = "") -> int:
    """A positive integer: the short form of ``check_int(name, value, 1)`` whose message says "a positive int".

    Args:
        name: Argument name for the message.
        value: The value to check.
        error: Exception class for a value that is not an integer (``TypeError``; byol-pytorch-style
            constructors raise ``ValueError`` for every bad value and keep doing so).
        what: What the number counts, added to the message in parentheses (e.g. ``"the world size"``).

    Returns:
        ``value`` as an ``int``.

    Raises:
        TypeError: ``value`` is not an integer (or ``error``).
        ValueError: ``value < 1``.
    """
    message = f"{name} must be a positive int{f' ({what})' if what else ''}, got {value!r}"
    if not is_int(value):
        raise error(message)
    if value < 1:
        raise ValueError(message)
    return int(value)


def check_float(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False, error: type[Exception] = TypeError) -> float:
    """A finite real number ``>= minimum`` (``> minimum`` when ``strict``).

    Args:
        name: Argument name for the message.
        value: The value to check.
        minimum: Lower bound.
        strict: Exclude ``minimum`` itself.
        error: Exception class for a value that is not a real number.

    Returns:
        ``value`` as a ``float``.

    Raises:
        TypeError: ``value`` is not a real number (or ``error``).
        ValueError: ``value`` is not finite or out of range.
    """
    bound = f"{'>' if strict else '>='} {minimum:g}"
    if not is_real(value):
        raise error(f"{name} must be a finite float {bound}, got {type(value).__name__} {value!r}; pass a number such as {name}=0.1")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be a finite float {bound}, got {value}; pass a finite number {bound}")
    return value


def check_probability(name: str, value: Any) -> float:
    """A probability in ``[0, 1]``."""
    if not is_real(value):
        raise TypeError(f"{name} must be a probability, a float in [0, 1]; got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (0 disables the op, 1 always applies it); got {value}")
    return float(value)


def check_pair(name: str, value: Any, what: str) -> tuple[float, float]:
    """A ``(low, high)`` pair of finite floats; ``what`` says what the pair means (for the message)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2 or not all(is_real(v) for v in value):
        raise TypeError(f"{name} must be a (low, high) pair of floats, {what}; got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} must hold finite numbers, {what}; got {value!r}")
    return low, high


def check_size(name: str, value: Any) -> tuple[int, int]:
    """An image size: a positive int (square) or an ``(H, W)`` pair of positive ints."""
    if is_int(value):
        size = (int(value), int(value))
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == 2 and all(is_int(v) for v in value):
        size = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be a positive int (square output) or an (H, W) pair of positive ints; got {value!r}")
    if min(size) <= 0:
        raise ValueError(f"{name} must be a positive int (square output) or an (H, W) pair of positive ints; got {value!r}")
    return size


def check_stats(name: str, value: Any, positive: bool) -> tuple[float, ...] | None:
    """Per-channel normalisation statistics (``None`` passes through): finite floats, positive for a std."""
    if value is None:
        return None
    if hasattr(value, "ndim") and hasattr(value, "tolist") and value.ndim == 1:  # a 1-D tensor or array
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0 or not all(is_real(v) for v in value):
        raise TypeError(
            f"{name} must be None (no normalization) or a sequence with one float per channel, "
            f"e.g. IMAGENET_{name.upper()}; got {value!r}"
        )
    stats = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in stats):
        raise ValueError(f"{name} must hold finite numbers; got {value!r}")
    if positive and not all(v > 0 for v in stats):
        raise ValueError(f"{name} must hold positive numbers (standard deviations); got {value!r}")
    return stats


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def check_dir(name: str, value: Any, *, must_exist: bool = True, what: str = "a folder of images") -> Path:
    """A folder path (``~`` expanded).

    Args:
        name: Argument name for the message.
        value: A ``str`` or ``os.PathLike``.
        must_exist: The folder must exist already (input data); ``False`` for a folder to be written.
        what: What the folder is for (for the message).

    Raises:
        TypeError: ``value`` is not a path.
        ValueError: Empty path; or, with ``must_exist``, missing or not a folder.
    """
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path to {what}, got {type(value).__name__}")
    if str(value) == "":
        raise ValueError(f"{name} must be a non-empty path ({what})")
    path = Path(value).expanduser()
    if must_exist:
        if not path.exists():
            raise ValueError(f"{name} {str(path)!r} does not exist; pass {what} (class subfolders or flat)")
        if not path.is_dir():
            raise ValueError(f"{name} {str(path)!r} is not a folder; pass the folder that contains the images")
    return path


def check_device(name: str, value: Any) -> torch.device | None:
    """A device as ``torch.device`` accepts it (``"cpu"``, ``"cuda:0"``, a ``torch.device``); ``None`` passes through.

    Raises:
        TypeError: ``torch.device`` cannot read ``value``.
    """
    if value is None:
        return None
    try:
        return torch.device(value)
    except (TypeError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a torch.device, a string such as 'cpu' or 'cuda:0', or None; got {value!r}") from exc
