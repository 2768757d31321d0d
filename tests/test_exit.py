"""``byol-train`` exits, with the right status, on every path: finish, error, signal; with and without
``--eval-data``; with the default DataLoader workers (processes that ignore SIGINT/SIGTERM) and without.

Each run is the installed console script (``python -m byol_wrapper.train`` from a bare checkout) with the defaults
that matter here -- progress bar on, ``--workers`` not given -- in its own process group, under a timeout: a run
that does not exit fails the test, and its whole group (workers included) is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # generous: the machine may be loaded; a hang never ends
MODEL = ["--backbone", "byol_wrapper.demo:SmallCNN", "--backbone-kwargs", '{"width": 4, "depth": 2}', "--hidden-layer", "pool"]

# A backbone whose 4th training forward raises: an uncaught exception while the DataLoader workers are running.
FAILING_NET = """
from torch import nn

class Net(nn.Sequential):
    calls = 0

    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        if self.training and not x.is_meta:
            Net.calls += 1
            if Net.calls > 3:
                raise RuntimeError("boom in forward")
        return super().forward(x)
"""


def _write_images(root: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = (rng.random((16, 16, 3)) * 80).astype(np.uint8)
            arr[..., c] += 150
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("exit")
    _write_images(base / "data", 6, 0)  # 12 images: 3 batches of 4 per epoch
    _write_images(base / "eval" / "train", 4, 1)
    _write_images(base / "eval" / "test", 2, 2)
    (base / "failing_net.py").write_text(FAILING_NET)
    return base


def _command() -> list[str]:
    script = Path(sys.executable).with_name("byol-train")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "byol_wrapper.train"]


def _start(workdir: Path, out: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    argv = [
        *_command(), "--data", str(workdir / "data"), "--out", str(out), "--image-size", "16", "--batch-size", "4",
        "--projection-size", "16", "--projection-hidden-size", "32", "--device", "cpu", "--log-every", "1", *extra,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    log = out.with_suffix(".log")
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _wait(proc: subprocess.Popen, log: Path, deadline: float) -> int:
    try:
        return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers
        proc.wait()
        pytest.fail(f"byol-train did not exit within {TIMEOUT_S} s:\n{log.read_text(errors='replace')[-3000:]}")


def _no_workers_left(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return
    time.sleep(2)  # killed workers may still be being reaped by init
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("worker processes outlived byol-train")


@pytest.mark.parametrize(
    ("eval_data", "workers"),
    [(True, None), (False, None), (True, "0")],
    ids=["eval-workers", "no-eval-workers", "eval-no-workers"],
)
def test_finished_run_exits_0(workdir: Path, tmp_path: Path, eval_data: bool, workers: str | None) -> None:
    extra = ["--max-steps", "4"]  # into the second epoch: the persistent workers are reused
    extra += ["--eval-data", str(workdir / "eval")] if eval_data else []
    extra += ["--workers", workers] if workers else []
    deadline = time.monotonic() + TIMEOUT_S
    proc, log = _start(workdir, tmp_path / "run", *MODEL, *extra)
    rc = _wait(proc, log, deadline)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    assert "done: 4 steps" in text
    assert ("kNN accuracy:" in text) is eval_data
    _no_workers_left(proc)


def test_uncaught_error_exits_1(workdir: Path, tmp_path: Path) -> None:
    """An exception in the training step (workers running): the traceback, status 1, and no hang."""
    deadline = time.monotonic() + TIMEOUT_S
    model = ["--backbone", "failing_net:Net", "--hidden-layer", "-1"]
    proc, log = _start(workdir, tmp_path / "run", *model, "--eval-data", str(workdir / "eval"), "--max-steps", "20")
    rc = _wait(proc, log, deadline)
    text = log.read_text(errors="replace")
    assert rc == 1, text[-3000:]
    assert "RuntimeError: boom in forward" in text
    _no_workers_left(proc)


@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["sigterm-to-main", "ctrl-c-to-group"],
)
def test_signal_saves_and_exits_128_plus_signal(workdir: Path, tmp_path: Path, sig: signal.Signals, group: bool) -> None:
    """``kill PID`` (SIGTERM to the main process) and Ctrl-C (SIGINT to the whole process group, workers too)."""
    deadline = time.monotonic() + TIMEOUT_S
    out = tmp_path / "run"
    proc, log = _start(workdir, out, *MODEL, "--eval-data", str(workdir / "eval"), "--max-steps", "100000",
                       "--checkpoint-every", "1")
    while not (out / "last.pt").exists():
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        if time.monotonic() > deadline:
            _wait(proc, log, deadline)
        time.sleep(0.05)
    if group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    rc = _wait(proc, log, deadline)
    text = log.read_text(errors="replace")
    assert rc == 128 + sig, text[-3000:]
    assert f"stopped by signal {int(sig)}" in text and "To resume, run the same command again" in text
    _no_workers_left(proc)


def test_usage_error_exits_2(workdir: Path, tmp_path: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    proc, log = _start(workdir, tmp_path / "run", *MODEL, "--augment-kwargs", '{"crop_scal": [0.5, 1]}')
    assert _wait(proc, log, deadline) == 2
    assert "byol-train: error:" in log.read_text(errors="replace")
