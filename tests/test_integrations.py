"""The Lightning and Accelerate examples run a few steps on the CPU (skipped when the package is missing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"byol_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ARGS = ["--steps", "3", "--batch-size", "4", "--image-size", "16", "--accumulate", "2", "--arch", "tiny"]


def test_lightning_example_steps_ema_per_optimizer_step():
    pytest.importorskip("lightning")
    example = load_example("lightning_byol")
    module = example.main([*ARGS, "--accelerator", "cpu", "--devices", "1"])
    assert module.learner.step == 3  # 6 batches, 3 optimizer steps, 3 EMA updates
    assert module.learner.tau == pytest.approx(1.0)  # total_steps=3 reached
    assert module._ddp_params_and_buffers_to_ignore == ["learner.online_encoder.net.fc.weight", "learner.online_encoder.net.fc.bias"]
    assert torch.isfinite(module.learner.net.conv1.weight).all()


def test_accelerate_example_steps_ema_per_optimizer_step():
    pytest.importorskip("accelerate")
    example = load_example("accelerate_byol")
    learner = example.main([*ARGS, "--cpu"])
    assert learner.step == 3
    assert torch.isfinite(learner.net.conv1.weight).all()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the accelerator state is a process-wide singleton
