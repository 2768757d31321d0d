"""examples/finetune.py takes any backbone byol-train can build, from the config.json saved next to backbone.pt,
and checks the file before it decodes any image."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from byol_wrapper.train import main as byol_train

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CPU = ["--device", "cpu", "--threads", "1", "--workers", "0", "--cache", "none"]


def _finetune():
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module("finetune")
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def demo_like_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """byol-train with the demo's own SmallCNN (narrowed) on a tiny labelled folder: (data, out)."""
    root = tmp_path_factory.mktemp("ft")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(("a", "b")):
            (root / "data" / split / name).mkdir(parents=True)
            for i in range(4):
                arr = (rng.random((16, 16, 3)) * 80).astype(np.uint8)
                arr[..., c] += 150
                Image.fromarray(arr).save(root / "data" / split / name / f"{i}.png")
    out = root / "run"
    argv = ["--data", str(root / "data" / "train"), "--out", str(out), "--backbone", "byol_wrapper.demo:SmallCNN",
            "--backbone-kwargs", '{"width": 4, "depth": 2}', "--hidden-layer", "pool", "--image-size", "16",
            "--batch-size", "4", "--projection-size", "16", "--projection-hidden-size", "32", "--max-steps", "1",
            "--workers", "0", "--device", "cpu", "--no-progress"]
    assert byol_train(argv) == 0
    return root / "data", out


def test_finetune_rebuilds_the_saved_backbone_from_config_json(demo_like_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, out = demo_like_run
    finetune = _finetune()
    threads = torch.get_num_threads()
    try:
        for mode in ("finetune", "linear"):
            results = finetune.main(["--backbone", str(out / "backbone.pt"), "--data", str(data), "--mode", mode,
                                     "--epochs", "1", "--batch-size", "4", "--image-size", "16",
                                     "--out", str(tmp_path / mode), *CPU])
            assert results["mode"] == mode and 0.0 <= results["test_top1"] <= 1.0
    finally:
        torch.set_num_threads(threads)
    classifier = torch.load(tmp_path / "finetune" / "classifier.pt", weights_only=True)
    assert classifier["fc.weight"].shape == (2, 8)  # SmallCNN width 4, depth 2: 8 features at "pool"
    pretrained = torch.load(out / "backbone.pt", weights_only=True)
    assert classifier["net.features.0.weight"].shape == pretrained["features.0.weight"].shape


def test_finetune_checks_the_file_before_the_data(demo_like_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = demo_like_run
    finetune = _finetune()
    missing_data = str(tmp_path / "no_such_data")  # would fail only when the images are decoded
    with pytest.raises(SystemExit, match="does not fit --arch byol_wrapper.demo:SmallCNN"):
        finetune.main(["--backbone", str(out / "backbone.pt"), "--data", missing_data, "--backbone-kwargs",
                       '{"width": 8, "depth": 2}', *CPU])
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2, 2)}, foreign)  # no config.json here: the ResNet-18 default
    with pytest.raises(SystemExit, match="no conv1.weight"):
        finetune.main(["--backbone", str(foreign), "--data", missing_data, *CPU])
    with pytest.raises(SystemExit, match="no such file"):
        finetune.main(["--backbone", str(tmp_path / "absent.pt"), "--data", missing_data, "--arch", "resnet18", *CPU])
    with pytest.raises(SystemExit, match="no such file"):
        finetune.main(["--backbone", str(tmp_path / "absent.pt"), "--data", missing_data, *CPU])
