"""The examples run end to end: quickstart.py, cifar10.py on a tiny generated ImageFolder, finetune.py on the
backbone it saved; and, marked ``slow``, cifar10.py on the real CIFAR-10 folder named by ``BYOL_CIFAR10_DIR``.

Each example runs in a subprocess with the checkout on ``PYTHONPATH`` (so no install is needed) and one CPU
thread (``--threads 1`` / ``OMP_NUM_THREADS=1``: on a shared machine, more threads than free cores make small
convolutions many times slower).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CPU = ("--device", "cpu", "--threads", "1", "--workers", "0")


def run_example(script: str, *args: str, cwd: Path, timeout: float = 300) -> str:
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=python_path)
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def make_image_folder(root: Path, per_class: int = 8, size: int = 32) -> Path:
    """``root/{train,test}/{red,blue}/*.png``: noisy reddish and bluish images, ``per_class`` per class and split."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, colour in (("blue", (40, 60, 200)), ("red", (200, 50, 40))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(rng.normal(colour, 50, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, str]:
    """cifar10.py for 2 steps (16 train images, batch 8, 1 epoch) on a tiny folder: (data, out, cache, stdout)."""
    tmp = tmp_path_factory.mktemp("cifar")
    data, out, cache = make_image_folder(tmp / "data"), tmp / "run", tmp / "cache"
    stdout = run_example("cifar10.py", "--data", str(data), "--out", str(out), "--cache", str(cache), "--epochs", "1",
                         "--batch-size", "8", "--probe-epochs", "2", "--eval-batch-size", "16", *CPU, cwd=tmp)
    return data, out, cache, stdout


def test_quickstart_runs(tmp_path: Path) -> None:
    stdout = run_example("quickstart.py", cwd=tmp_path)
    assert "step 2: loss" in stdout and "embedding (16, 512)" in stdout
    state = torch.load(tmp_path / "pretrained.pt", weights_only=True)
    assert "layer4.1.bn2.weight" in state


def test_cifar10_tiny_folder(tiny_run: tuple[Path, Path, Path, str]) -> None:
    _, out, _, stdout = tiny_run
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and results["epochs"] == 1.0 and results["stop_reason"] == "schedule complete"
    assert results["final_tau"] == 1.0  # cosine tau schedule ran to its end (total_steps was passed to BYOL)
    assert results["knn_train_size"] == 16 and results["knn_test_size"] == 16
    for key in ("knn_top1_before", "knn_top1_after", "probe_top1_before", "probe_top1_after"):
        assert _is_fraction_of(results[key], 16), (key, results[key])  # correct answers out of the 16 test images
    assert results["images_per_second"] > 0 and [e["tag"] for e in results["evals"]] == ["before", "after"]
    assert "| kNN top-1" in stdout and "images/s" in stdout
    state = torch.load(out / "backbone.pt", weights_only=True)
    assert state["conv1.weight"].shape == (64, 3, 3, 3)  # CIFAR stem
    assert not any(k.startswith("fc.") for k in state)  # plain backbone, fc = Identity


def _is_fraction_of(accuracy: float, n: int) -> bool:
    """An accuracy measured on ``n`` images: k/n for an integer k in [0, n] (not any number in [0, 1])."""
    k = accuracy * n
    return 0 <= round(k) <= n and abs(k - round(k)) < 1e-6


def import_example(name: str):
    """Imports ``examples/<name>.py`` in this process (``finetune`` imports ``cifar10`` from its own folder)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def test_cifar10_loader_cache(tiny_run: tuple[Path, Path, Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    data, _, cache, _ = tiny_run
    load_image_folder = import_example("cifar10").load_image_folder
    assert len(list(cache.glob("*.pt"))) == 1  # written by the run, outside the data folder
    loaded = load_image_folder(data, 32, str(cache))
    assert "loaded cache" in capsys.readouterr().out
    fresh = load_image_folder(data, 32, None)
    assert loaded["classes"] == fresh["classes"] == ["blue", "red"]
    assert loaded["train_x"].dtype == torch.uint8 and loaded["train_x"].shape == (16, 3, 32, 32)
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(loaded[key], fresh[key]), key


class _Clock:
    """A stand-in for ``time.perf_counter``: each reading advances by ``fast`` seconds until ``switch``, then by
    ``slow`` (the step time changes mid-run, as on a machine that gets busy)."""

    def __init__(self, fast: float, slow: float, switch: float) -> None:
        self.now, self.fast, self.slow, self.switch = 0.0, fast, slow, switch

    def perf_counter(self) -> float:
        self.now += self.fast if self.now < self.switch else self.slow
        return self.now


@pytest.mark.parametrize(
    ("clock", "reason"),
    [
        # steady steps: the schedule fitted in the first half of the budget ends with it
        (_Clock(0.25, 0.25, 0.0), "schedule complete"),
        # steps 4x slower after 3 s of clock (the fit is frozen by then): the budget stops the run before the schedule ends
        (_Clock(0.25, 1.0, 3.0), "time budget reached (0.05 min)"),
    ],
    ids=["steady", "slower-later"],
)
def test_cifar10_time_budget_fits_the_schedule(tiny_run: tuple[Path, Path, Path, str], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, clock: _Clock, reason: str) -> None:
    """With --time-budget-min, the lr/tau schedules are fitted to the budget and the budget stops the run."""
    data, _, cache, _ = tiny_run
    cifar10 = import_example("cifar10")
    monkeypatch.setattr(cifar10, "time", clock)  # step times under the test's control, not the machine's load
    threads = torch.get_num_threads()
    try:  # in-process (saves an interpreter start); main() sets the thread count
        results = cifar10.main(["--data", str(data), "--out", str(tmp_path), "--cache", str(cache), "--epochs", "1000",
                                "--time-budget-min", "0.05", "--batch-size", "8", "--probe-epochs", "0", *CPU])
    finally:
        torch.set_num_threads(threads)
    assert results["stop_reason"] == reason
    assert results["scheduled_steps"] < 100  # fitted to the 3 s budget, far below the 2000 steps of --epochs 1000
    if reason == "schedule complete":
        assert results["steps"] == results["scheduled_steps"] and results["final_tau"] == 1.0
        assert results["train_seconds"] <= 3.0 + 0.1  # the fitted schedule ends at the budget
    else:
        assert 2 <= results["steps"] < results["scheduled_steps"] and results["final_tau"] < 1.0
        assert 3.0 <= results["train_seconds"] <= 3.0 + 1.0  # stopped by the budget (one slow step may overrun)
    assert results["probe_top1_after"] is None and (tmp_path / "backbone.pt").is_file()


def test_finetune_on_saved_backbone(tiny_run: tuple[Path, Path, Path, str], tmp_path: Path) -> None:
    data, out, cache, _ = tiny_run
    stdout = run_example("finetune.py", "--backbone", str(out / "backbone.pt"), "--data", str(data), "--epochs", "1",
                         "--batch-size", "8", "--cache", str(cache), "--out", str(tmp_path / "ft"), *CPU, cwd=tmp_path)
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["mode"] == "finetune" and _is_fraction_of(results["test_top1"], 16)  # of the 16 test images
    assert "epoch 1/1: loss" in stdout and "finetune: train top-1" in stdout
    classifier = torch.load(tmp_path / "ft" / "classifier.pt", weights_only=True)
    assert classifier["fc.weight"].shape == (2, 512)  # new 2-way head on the pretrained backbone


def test_finetune_linear_mode(tiny_run: tuple[Path, Path, Path, str], tmp_path: Path) -> None:
    data, out, cache, _ = tiny_run
    finetune = import_example("finetune")
    threads = torch.get_num_threads()
    try:  # in-process (saves an interpreter start); main() sets the thread count
        results = finetune.main(["--backbone", str(out / "backbone.pt"), "--data", str(data), "--mode", "linear",
                                 "--epochs", "2", "--batch-size", "8", "--cache", str(cache), *CPU])
    finally:
        torch.set_num_threads(threads)
    assert results["mode"] == "linear" and _is_fraction_of(results["train_top1"], 16) and _is_fraction_of(results["test_top1"], 16)


def test_finetune_loads_an_imagenet_stem_backbone(tmp_path: Path) -> None:
    """A torchvision ResNet-18 state_dict (7x7 stem, with its old fc, compile prefix) loads with a new head."""
    import torchvision

    finetune = import_example("finetune")
    source = torchvision.models.resnet18()
    torch.save({f"_orig_mod.{k}": v for k, v in source.state_dict().items()}, tmp_path / "backbone.pt")
    net = finetune.load_backbone(tmp_path / "backbone.pt", num_classes=3)
    assert net.conv1.kernel_size == (7, 7) and net.fc.out_features == 3
    assert torch.equal(net.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_finetune_rejects_a_foreign_state_dict(tmp_path: Path) -> None:
    finetune = import_example("finetune")
    torch.save({"weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="no conv1.weight"):
        finetune.load_backbone(tmp_path / "other.pt", num_classes=10)
    torch.save({"module.conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "partial.pt")
    with pytest.raises(SystemExit, match="missing"):
        finetune.load_backbone(tmp_path / "partial.pt", num_classes=10)


@pytest.mark.slow
def test_cifar10_real_data(tmp_path: Path) -> None:
    """A short CPU run on the real CIFAR-10 folder: 30 steps of batch 32, kNN on 2k/1k images."""
    root = os.environ.get("BYOL_CIFAR10_DIR")
    if not root:
        pytest.skip("set BYOL_CIFAR10_DIR to the CIFAR-10 ImageFolder (with train/ and test/) to run this test")
    run_example("cifar10.py", "--data", root, "--out", str(tmp_path / "run"), "--cache", "none", "--max-steps",
                "30", "--batch-size", "32", "--knn-train-subset", "2000", "--knn-test-subset", "1000",
                "--probe-epochs", "10", "--channels-last", "--precision", "bf16", "--device", "cpu", "--threads", "1",
                cwd=tmp_path, timeout=1800)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 30 and results["knn_train_size"] == 2000 and results["knn_test_size"] == 1000
    assert 0.15 < results["knn_top1_before"] < 0.6 and 0.15 < results["knn_top1_after"] < 0.9
    assert results["probe_top1_after"] > 0.15
