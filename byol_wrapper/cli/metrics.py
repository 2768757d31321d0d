"""The metrics log (``metrics.jsonl``), its plot (``metrics.png``) and the progress bar of ``byol-train``."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from ..plot import read_metrics

__all__ = ["plot_metrics", "progress_bar", "read_metrics", "truncate_metrics"]


def truncate_metrics(path: Path, keep_up_to_step: int) -> None:
    """Keeps the records with ``step <= keep_up_to_step`` (the part of the log the checkpoint covers)."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if isinstance(r.get("step"), int) and r["step"] <= keep_up_to_step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in keep:
            f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_metrics(metrics_path: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> bool:
    """Plots the training loss and kNN accuracy of a ``metrics.jsonl`` against the step.

    Args:
        metrics_path: The JSON-lines log written by ``byol-train``.
        png_path: Where to write the PNG.

    Returns:
        ``True`` if the plot was written, ``False`` (with a warning) if matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping metrics.png (pip install matplotlib)", RuntimeWarning, stacklevel=2)
        return False
    from ..plot import render_metrics_png  # loss, lr/tau, kNN against chance and random init, collapse statistics

    render_metrics_png(read_metrics(Path(metrics_path)), png_path)
    return True


class _NoBar:
    """Stand-in for tqdm when it is missing or disabled: prints a line per logging window."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.n, self.total, self.enabled = initial, total, enabled

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, values: dict[str, str], refresh: bool = True) -> None:
        if self.enabled:
            print(f"step {self.n}/{self.total} " + " ".join(f"{k}={v}" for k, v in values.items()), file=sys.stderr)

    def write(self, msg: str, file: Any = None) -> None:
        print(msg, file=file or sys.stderr)

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, disable: bool) -> Any:
    if disable:
        return _NoBar(total, initial, enabled=False)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar(total, initial, enabled=True)
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)
