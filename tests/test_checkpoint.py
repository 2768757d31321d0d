"""Atomic, verified checkpoints with a previous-version fallback (CPU, tiny tensors)."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from byol_wrapper.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    atomic_save,
    load_checkpoint,
    load_latest_checkpoint,
    previous_path,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _state(step: int) -> dict:
    return {
        "model": {"w": torch.full((2, 3), float(step)), "n": torch.tensor(step), "_extra_state": {"step": step, "total_steps": None}},
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0], "lars_exclude": True}]},
        "step": step,
        "config": {"backbone": "resnet18", "hidden_layer": -2, "kwargs": {}, "eval": None},
        "rng": rng_state(),
    }


def test_round_trip_loads_with_weights_only(tmp_path: Path) -> None:
    path = save_checkpoint(_state(3), tmp_path / "last.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)  # nothing pickled-code
    assert raw["format"] == CHECKPOINT_FORMAT and len(raw["sha256"]) == 64
    state = load_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.full((2, 3), 3.0))
    assert state["optimizer"]["param_groups"][0]["lars_exclude"] is True
    assert state["config"]["hidden_layer"] == -2
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary file was renamed into place


def test_previous_checkpoint_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(_state(1), path)
    assert not previous_path(path).exists()
    save_checkpoint(_state(2), path)
    assert previous_path(path) == tmp_path / "last.prev.pt"
    assert load_checkpoint(path)["step"] == 2
    assert load_checkpoint(previous_path(path))["step"] == 1


def test_truncated_checkpoint_falls_back_to_previous(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(_state(1), path)
    save_checkpoint(_state(2), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, source = load_latest_checkpoint(path)
    messages = [str(w.message) for w in caught]
    assert any("cannot be loaded" in m and "trying last.prev.pt" in m for m in messages)
    assert any("resuming from the previous checkpoint" in m for m in messages)
    assert state is not None and state["step"] == 1 and source == previous_path(path)
    assert (tmp_path / "last.pt.corrupt").exists() and not path.exists()  # moved aside: a later save cannot rotate it over prev


def test_content_not_matching_digest_is_detected(tmp_path: Path) -> None:
    path = save_checkpoint(_state(5), tmp_path / "last.pt")
    raw = torch.load(path, weights_only=True)
    raw["model"]["w"][0, 0] = 123.0  # silent corruption of the tensor data
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def test_missing_marker_or_pickled_code_is_rejected(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"step": 1}, plain)
    with pytest.raises(CheckpointError, match="format tag"):
        load_checkpoint(plain)
    code = tmp_path / "code.pt"
    torch.save({"fn": Path("x")}, code)  # a pickled class instance: refused by weights_only
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(code)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_no_usable_checkpoint_starts_from_scratch(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_latest_checkpoint(path) == (None, None)  # nothing there: silent
    path.write_bytes(b"garbage")
    previous_path(path).write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_latest_checkpoint(path) == (None, None)
    assert len(caught) == 3 and "starting from scratch" in str(caught[-1].message)


def test_atomic_save_and_stale_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "backbone.pt"
    atomic_save({"w": torch.ones(2)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(2))
    stale = tmp_path / "sub" / ".tmp-last.pt.abc"
    stale.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path / "sub") == [stale]
    assert not stale.exists() and target.exists()


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    path = save_checkpoint({"rng": rng_state()}, tmp_path / "last.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    set_rng_state(load_checkpoint(path)["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and got[2] == expected[2]


def test_save_checkpoint_rejects_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="state must be a dict"):
        save_checkpoint([1, 2], tmp_path / "x.pt")  # type: ignore[arg-type]
