"""byol-train under torchrun: 2 gloo ranks on the CPU (sharded data, rank-0 outputs, resume, agreed stop)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from byol_wrapper.checkpoint import load_checkpoint
from byol_wrapper.cli.runtime import Ranks
from byol_wrapper.cli.trainer import Trainer
from byol_wrapper.train import UsageError, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from byol_wrapper.demo import generate_demo_dataset

    return Path(generate_demo_dataset(tmp_path_factory.mktemp("ddp") / "data", n_train_per_class=4, n_test_per_class=2, image_size=16))


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data / "train"), "--out", str(out), "--backbone", "byol_wrapper.demo:SmallCNN",
        "--backbone-kwargs", '{"width": 8}', "--hidden-layer", "pool", "--image-size", "16", "--batch-size", "8",
        "--projection-size", "16", "--projection-hidden-size", "32", "--optimizer", "adamw", "--workers", "0",
        "--device", "cpu", "--no-progress", "--log-every", "1", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "byol_wrapper.train", *argv]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)


def _steps(out: Path) -> list[int]:
    complete = (out / "metrics.jsonl").read_text().split("\n")[:-1]  # a line being written has no newline yet
    return [r["step"] for r in map(json.loads, complete) if r["event"] == "train"]


def test_torchrun_two_ranks_train_resume_and_continue_in_one_process(ddp_folder_run, tmp_path: Path) -> None:
    run = ddp_folder_run  # 2 ranks: --max-steps 2, then resumed to 4 (conftest; tests/test_cache.py shares it)
    out, argv = run.out, run.argv
    assert run.first.returncode == 0, run.first.stderr[-4000:]
    assert "2 processes, 4 images each per step (global batch 8)" in run.first.stderr
    assert run.second.returncode == 0, run.second.stderr[-4000:]
    assert "resuming from" in run.second.stderr and "at step 2/4" in run.second.stderr
    assert run.steps == [1, 2, 3, 4]  # rank 0 alone writes the log, each step once, resumed mid-epoch
    assert run.evals == [0, 2, 3, 4] and run.second.stderr.count("kNN accuracy:") == 1  # rank 0, every epoch (3 steps) and at the end
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == 4 and state["epoch"] == 1  # 24 images / global batch 8 = 3 steps per epoch
    rngs = state["rng_per_rank"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # ranks draw their own views
    assert (out / "backbone.pt").is_file() and (out / "backbone_ema.pt").is_file()

    with warnings.catch_warnings(record=True) as caught:  # one process continues the 2-rank run
        warnings.simplefilter("always")
        assert main([*argv, "--max-steps", "5"]) == 0
    assert any("written by 2 process(es), this run has 1" in str(w.message) for w in caught)
    assert _steps(out) == [1, 2, 3, 4, 5]
    assert load_checkpoint(out / "last.pt")["rng_per_rank"] is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_signal_to_one_rank_stops_both_at_the_same_step(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = _argv(data, out, "--checkpoint-every", "1000", "--max-steps", "100000")
    port = str(_free_port())
    procs = []
    for rank in range(2):  # what torchrun does, with the pid of each rank at hand
        env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
        with open(tmp_path / f"rank{rank}.txt", "wb") as log:  # the child keeps its own handle
            procs.append(subprocess.Popen([sys.executable, "-m", "byol_wrapper.train", *argv], env=env, cwd=ROOT, stdout=log, stderr=log))
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or len(_steps(out)) < 3:
            assert all(p.poll() is None for p in procs), (tmp_path / "rank0.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no training step within 120 s"
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGTERM)  # rank 1 only
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [128 + signal.SIGTERM] * 2, [(tmp_path / f"rank{r}.txt").read_text()[-2000:] for r in range(2)]
    state = load_checkpoint(out / "last.pt")
    assert 3 <= state["step"] < 100000 and state["step"] == _steps(out)[-1]  # both saved after the same step
    assert "stopped by signal" in (tmp_path / "rank0.txt").read_text()


def test_global_batch_must_split_evenly_over_the_ranks(data: Path, tmp_path: Path) -> None:
    args = build_parser().parse_args(_argv(data, tmp_path / "run", "--batch-size", "6", "--max-steps", "1"))
    with pytest.raises(UsageError, match="multiple of 4 with at least 2 images per process; got 6"):
        Trainer(args, Ranks(world=4, rank=0), torch.device("cpu"))  # fails before any collective
    args = build_parser().parse_args(_argv(data, tmp_path / "run", "--batch-size", "2", "--max-steps", "1"))
    with pytest.raises(UsageError, match="at least 2 images per process"):
        Trainer(args, Ranks(world=2, rank=0), torch.device("cpu"))
