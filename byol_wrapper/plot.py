"""``metrics.png``: does training work? The loss, lr and tau, the kNN monitor against chance and the random
initialisation, and the collapse statistics, from a ``byol-train`` ``metrics.jsonl``.

Warnings (returned, and written on the plot) flag a kNN accuracy below chance and a collapsing representation:
a std ratio (std of the L2-normalised embeddings over ``1/sqrt(d)``, SimSiam's collapse monitor) below
:data:`COLLAPSE_STD_RATIO`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["COLLAPSE_STD_RATIO", "health_warnings", "read_metrics", "render_metrics_png"]

COLLAPSE_STD_RATIO = 0.1
"""A std ratio below this (1 for isotropic embeddings, 0 for complete collapse), reached during training and at most
half the random initialisation's, counts as collapsing."""


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; lines cut by a kill are skipped."""
    records = []
    path = Path(path)
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    records.append(rec)
    return records


def _chance(evals: list[dict[str, Any]]) -> float | None:
    n = next((r.get("num_classes") for r in reversed(evals) if r.get("num_classes")), None)
    return 1.0 / n if n else None


def health_warnings(records: list[dict[str, Any]]) -> list[str]:
    """Warnings about the last evaluation: kNN accuracy below chance, collapsing std ratio."""
    evals = [r for r in records if r.get("event") == "eval" and r.get("knn_accuracy") is not None]
    if not evals:
        return []
    last, out = evals[-1], []
    chance = _chance(evals)
    if chance is not None and last["step"] > 0 and last["knn_accuracy"] < chance:
        out.append(
            f"kNN accuracy {100 * last['knn_accuracy']:.1f}% at step {last['step']} is below chance "
            f"({100 * chance:.1f}%): check the data, the labels of --eval-data and the learning rate"
        )
    ratio = last.get("std_ratio")
    start = evals[0].get("std_ratio") if evals[0].get("step") == 0 else None
    # A random backbone can start low: only a fall during training, to half the start or less, is a collapse.
    if ratio is not None and last["step"] > 0 and ratio < COLLAPSE_STD_RATIO and (start is None or ratio < start / 2):
        out.append(
            f"std ratio {ratio:.3f} at step {last['step']} (1 = spread out, 0 = every image the same embedding): "
            "the representation is collapsing; lower --lr or raise --moving-average-decay"
        )
    return out


def render_metrics_png(records: list[dict[str, Any]], png_path: str | os.PathLike[str]) -> list[str]:
    """Writes the four-panel plot to ``png_path`` (atomically) and returns :func:`health_warnings`.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("event") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("event") == "eval" and r.get("knn_accuracy") is not None]
    warns = health_warnings(records)
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))

    ax = axes[0, 0]
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        ax.plot(steps, losses, lw=0.6, alpha=0.4, color="C0", label="loss")
        window = max(1, len(losses) // 50)
        if window > 1:
            smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, lw=1.5, color="C0", label=f"loss (mean of {window})")
        ax.annotate(f"{losses[-1]:.3f}", (steps[-1], losses[-1]), textcoords="offset points", xytext=(-30, 8), color="C0")
        ax.legend(loc="upper right")
    ax.set(xlabel="step", ylabel="BYOL loss (2 - 2cos, both views)", title="training loss")
    ax.grid(alpha=0.3)

    ax = axes[0, 1]
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r.get("lr", float("nan")) for r in train], color="C2", label="learning rate")
        ax.set_ylabel("learning rate", color="C2")
        twin = ax.twinx()
        twin.plot(steps, [r.get("tau", float("nan")) for r in train], color="C3", label="tau (EMA)")
        twin.set_ylabel("tau of the target EMA", color="C3")
        ax.set_title(f"schedules: lr {train[-1].get('lr', float('nan')):.3g}, tau {train[-1].get('tau', float('nan')):.5f} at the end")
    else:
        ax.set_title("schedules")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)

    ax = axes[1, 0]
    if evals:
        steps = [r["step"] for r in evals]
        acc = [100 * r["knn_accuracy"] for r in evals]
        ax.plot(steps, acc, "o-", color="C1", label="kNN accuracy (online backbone)")
        if evals[0].get("step") == 0:
            ax.axhline(acc[0], color="C7", ls="--", lw=1, label=f"random initialisation ({acc[0]:.1f}%)")
        chance = _chance(evals)
        if chance is not None:
            ax.axhline(100 * chance, color="k", ls=":", lw=1, label=f"chance ({100 * chance:.1f}%)")
        ax.annotate(f"{acc[-1]:.1f}%", (steps[-1], acc[-1]), textcoords="offset points", xytext=(-20, 8), color="C1")
        ax.margins(y=0.15)
        ax.legend(loc="best", framealpha=0.6)
    else:
        ax.text(0.5, 0.5, "no evaluation data (--eval-data)", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel="kNN top-1 accuracy (%)", title="kNN monitor: is the representation learning?")
    ax.grid(alpha=0.3)

    ax = axes[1, 1]
    stats = [r for r in evals if r.get("std_ratio") is not None]
    if stats:
        steps = [r["step"] for r in stats]
        ax.plot(steps, [r["std_ratio"] for r in stats], "o-", color="C4", label="std ratio (x 1/sqrt(d))")
        ax.axhline(1.0, color="C4", ls=":", lw=1)
        ax.axhline(COLLAPSE_STD_RATIO, color="r", ls="--", lw=1, label=f"collapse below {COLLAPSE_STD_RATIO}")
        ax.set_ylim(0, max(1.1, max(r["std_ratio"] for r in stats) * 1.1))
        ax.set_ylabel("std ratio (1 healthy, 0 collapsed)", color="C4")
        ax.legend(loc="lower left")
        ranks = [r.get("effective_rank") for r in stats]
        if all(v is not None for v in ranks):
            twin = ax.twinx()
            twin.plot(steps, ranks, "s-", color="C5", ms=3)
            twin.set_ylabel("effective rank", color="C5")
        ax.set_title(f"collapse: std ratio {stats[-1]['std_ratio']:.2f}, effective rank {stats[-1].get('effective_rank', float('nan')):.1f}")
    else:
        ax.text(0.5, 0.5, "no collapse statistics (--eval-data)", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("collapse")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)

    if warns:
        short = [w.split(":")[0] if "below chance" in w else f"representation collapsing ({w.split(' (')[0]})" for w in warns]
        fig.suptitle("WARNING: " + " | ".join(short), color="r", fontsize=11)
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return warns
