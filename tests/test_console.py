"""What ``byol-train`` tells a user who installed the package without the ``[train]`` extra (tqdm, matplotlib)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from byol_wrapper.cli._extras import train_extras_notice
from byol_wrapper.train import main


def _images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(8):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(root / f"{i}.png")
    return root


def test_missing_train_extra_is_said_once_at_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in ("tqdm", "matplotlib")] + ["tqdm", "matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed (submodules imported earlier too)
    out = tmp_path / "run"
    argv = [
        "--data", str(_images(tmp_path / "data")), "--out", str(out), "--backbone", "byol_wrapper.demo:SmallCNN",
        "--backbone-kwargs", '{"width": 4, "depth": 2}', "--hidden-layer", "pool", "--image-size", "16",
        "--batch-size", "4", "--projection-size", "16", "--projection-hidden-size", "32", "--workers", "0",
        "--device", "cpu", "--max-steps", "3", "--log-every", "1",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    notices = [line for line in err if "byol-wrapper[train]" in line]
    assert len(notices) == 1 and err[0] == notices[0]  # the first line, and only once
    assert "tqdm not installed" in notices[0] and "matplotlib not installed: no metrics.png" in notices[0]
    assert not [w for w in caught if "matplotlib" in str(w.message)]  # no second, late warning about the plot
    assert not (out / "metrics.png").exists() and (out / "backbone.pt").is_file()
    assert any(line.startswith("step 3/3") for line in err)  # the plain progress lines stand in for the bar


def test_no_notice_when_the_extra_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")
    pytest.importorskip("matplotlib")
    assert train_extras_notice() is None
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert train_extras_notice(progress=False) is None  # --no-progress needs no tqdm
    assert "tqdm" in train_extras_notice(progress=True)


def test_threads_flag_and_its_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import os

    import torch

    from byol_wrapper import train

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert train.default_threads() == 4  # half the usable cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert train.default_threads() == 1
    assert main(["--help"]) == 0
    assert "default: 1, half of this machine's 1 usable CPU cores" in " ".join(capsys.readouterr().out.split())
    argv = ["--data", str(_images(tmp_path / "data")), "--out", str(tmp_path / "run"), "--backbone",
            "byol_wrapper.demo:SmallCNN", "--backbone-kwargs", '{"width": 4, "depth": 2}', "--hidden-layer", "pool",
            "--image-size", "16", "--batch-size", "4", "--projection-size", "16", "--projection-hidden-size", "32",
            "--workers", "0", "--device", "cpu", "--max-steps", "1", "--no-progress"]
    assert main([*argv, "--threads", "3"]) == 0
    assert torch.get_num_threads() == 3
    assert main([*argv, "--out", str(tmp_path / "run2")]) == 0
    assert torch.get_num_threads() == 1  # the default
    assert main([*argv, "--threads", "0"]) == 2
