"""What ``byol-train`` needs beyond the library's dependencies: the ``[train]`` extra (tqdm, matplotlib)."""

from __future__ import annotations

import importlib.util

__all__ = ["TRAIN_EXTRA", "missing_train_extras", "train_extras_notice"]

TRAIN_EXTRA = {"tqdm": "no progress bar (a line per --log-every steps instead)", "matplotlib": "no metrics.png"}
"""The packages of ``pip install "byol-wrapper[train]"`` and what ``byol-train`` does without each."""


def missing_train_extras() -> list[str]:
    """The packages of :data:`TRAIN_EXTRA` that cannot be imported."""
    return [name for name in TRAIN_EXTRA if importlib.util.find_spec(name) is None]


def train_extras_notice(progress: bool = True) -> str | None:
    """One line naming what is missing and the install command, or ``None`` when nothing is.

    Args:
        progress: Whether a progress bar was asked for (tqdm is not needed with ``--no-progress``).
    """
    missing = [n for n in missing_train_extras() if progress or n != "tqdm"]
    if not missing:
        return None
    effects = "; ".join(f"{n} not installed: {TRAIN_EXTRA[n]}" for n in missing)
    return f"byol-train: {effects}. Install them with: pip install \"byol-wrapper[train]\" (or pip install -e \".[train]\")"
