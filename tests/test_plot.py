"""metrics.png answers "is it working?": chance and random-init references, last values, lr/tau, collapse
statistics, and warnings (in the log and on the plot) for kNN below chance and a collapsing std ratio."""

from __future__ import annotations

from pathlib import Path

import pytest

from byol_wrapper.plot import health_warnings, render_metrics_png


def _records(final_acc: float, final_ratio: float) -> list[dict]:
    train = [{"event": "train", "step": s, "loss": 4.0 - s / 10, "lr": 0.1 * s / 20, "tau": 0.99 + s / 2000} for s in range(1, 21)]
    evals = [
        {"event": "eval", "step": 0, "knn_accuracy": 0.30, "num_classes": 5, "std_ratio": 0.6, "effective_rank": 40.0},
        {"event": "eval", "step": 10, "knn_accuracy": 0.35, "num_classes": 5, "std_ratio": 0.5, "effective_rank": 30.0},
        {"event": "eval", "step": 20, "knn_accuracy": final_acc, "num_classes": 5, "std_ratio": final_ratio, "effective_rank": 5.0},
    ]
    return train + evals


def test_healthy_run_has_no_warning_and_a_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert render_metrics_png(_records(0.45, 0.4), tmp_path / "m.png") == []
    assert (tmp_path / "m.png").stat().st_size > 10_000


def test_below_chance_and_collapse_are_warned() -> None:
    warns = health_warnings(_records(0.15, 0.02))  # chance is 1/5 = 20%; std ratio fell from 0.6 to 0.02
    assert len(warns) == 2
    assert "below chance (20.0%)" in warns[0] and "collapsing" in warns[1]


def test_a_low_start_is_not_a_collapse() -> None:
    records = _records(0.45, 0.08)
    records[20]["std_ratio"] = 0.09  # the random backbone already starts this low: no fall during training
    assert health_warnings(records) == []


def test_warning_is_written_on_the_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    titles = []
    real = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", lambda self, t, **kw: titles.append(t) or real(self, t, **kw))
    assert len(render_metrics_png(_records(0.15, 0.3), tmp_path / "m.png")) == 1
    assert titles and titles[0].startswith("WARNING: kNN accuracy 15.0% at step 20 is below chance")
