"""A checkpoint written by an earlier byol_wrapper (``tests/fixtures/checkpoint_v0``) still resumes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import make_checkpoint_v0 as v0  # noqa: E402


def test_v0_checkpoint_resumes_at_its_step(tmp_path: Path) -> None:
    from byol_wrapper.train import main

    data = v0.fixture_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("last.pt", "config.json"):
        shutil.copy2(v0.TARGET / name, out / name)
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert saved["step"] == v0.STEPS

    rc = main(["--data", str(data), "--out", str(out), "--max-steps", str(v0.STEPS + 2), *v0.ARGS])

    assert rc == 0
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [v0.STEPS + 1, v0.STEPS + 2]  # continued after the stored step, not from 0
    resumed = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert resumed["step"] == v0.STEPS + 2
    # the learner's tau-schedule step was restored from the old checkpoint and advanced from there
    assert resumed["learner"]["_extra_state"]["step"] == v0.STEPS + 2
    assert resumed["learner"]["_extra_state"]["total_steps"] == v0.STEPS + 2
