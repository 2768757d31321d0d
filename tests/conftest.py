"""Shared tiny backbones for the tests (CPU, tiny inputs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyCNN(nn.Module):
    """A small custom CNN with BatchNorm, a pooling layer and a classifier head."""

    def __init__(self, channels: int = 3, width: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.unused = nn.Linear(3, 3)  # exists but never runs in forward
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips ``slow`` tests unless selected with ``-m slow`` (or BYOL_RUN_SLOW=1); ``gpu`` tests without CUDA."""
    import os

    run_slow = "slow" in (config.getoption("markexpr") or "") or os.environ.get("BYOL_RUN_SLOW") == "1"
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: select with -m slow or BYOL_RUN_SLOW=1"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spinning against other processes on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    return TinyCNN()


@pytest.fixture
def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


@pytest.fixture
def tiny_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)


SMALL_HEADS = dict(projection_size=16, projection_hidden_size=32)


@pytest.fixture(scope="session")
def ddp_folder_run(tmp_path_factory: pytest.TempPathFactory):
    """ONE torchrun run shared by tests/test_train_distributed.py and tests/test_cache.py (a launch costs seconds).

    2 gloo ranks on generated data (24 images, global batch 8: 3 steps per epoch), ``--eval-data``, checkpoints every
    step: ``--max-steps 2``, then the same command with ``--max-steps 4`` (resumed mid-epoch). Returns a namespace
    with ``data``, ``out``, ``argv`` (without ``--max-steps``), ``first`` and ``second`` (the CompletedProcesses),
    ``losses`` (the train losses after the second launch) and ``evals`` (the eval steps then).
    """
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from byol_wrapper.demo import generate_demo_dataset
    from tests.test_train_distributed import _argv, _torchrun

    base = tmp_path_factory.mktemp("ddp_shared")
    data = Path(generate_demo_dataset(base / "data", n_train_per_class=4, n_test_per_class=2, image_size=16))
    out = base / "run"
    argv = _argv(data, out, "--checkpoint-every", "1", "--eval-data", str(data), "--knn-k", "4")
    first = _torchrun([*argv, "--max-steps", "2"])
    second = _torchrun([*argv, "--max-steps", "4"]) if first.returncode == 0 else first
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if out.is_dir() else []
    return SimpleNamespace(
        data=data, out=out, argv=argv, first=first, second=second,
        losses=[r["loss"] for r in records if r["event"] == "train"],
        steps=[r["step"] for r in records if r["event"] == "train"],
        evals=[r["step"] for r in records if r["event"] == "eval"],
    )
