"""Tests for byol_wrapper.demo: the synthetic data set and a reduced reference run (CPU, tiny)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from byol_wrapper.demo import (
    DEMO_CLASSES,
    DEMO_CONFIG,
    SmallCNN,
    build_demo_backbone,
    generate_demo_dataset,
    load_demo_split,
    run_demo_experiment,
)

SMALL = dict(n_train_per_class=3, n_test_per_class=2, image_size=16)


def _pixels(root, split):
    return {
        p.relative_to(root).as_posix(): np.asarray(Image.open(p))
        for p in sorted((root / split).rglob("*.png"))
    }


def test_tree_and_counts(tmp_path):
    root = generate_demo_dataset(tmp_path / "d", seed=3, **SMALL)
    assert root == tmp_path / "d"
    for split, n in (("train", 3), ("test", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(DEMO_CLASSES)
        for name in DEMO_CLASSES:
            files = sorted((root / split / name).glob("*.png"))
            assert len(files) == n
            with Image.open(files[0]) as im:
                assert im.mode == "RGB" and im.size == (16, 16)
    images, labels = load_demo_split(root, "train")
    assert images.shape == (18, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.tolist() == [c for c in range(len(DEMO_CLASSES)) for _ in range(3)]
    # the labels are torchvision ImageFolder's, and byol-train's --eval-data's: DEMO_CLASSES[label] is the class
    from torchvision.datasets import ImageFolder

    from byol_wrapper.data import LabelledImageFolder

    assert ImageFolder(str(root / "train")).classes == list(DEMO_CLASSES)
    assert LabelledImageFolder(root / "test", 16).classes == list(DEMO_CLASSES)


def test_deterministic_and_seeded(tmp_path):
    a = generate_demo_dataset(tmp_path / "a", seed=0, **SMALL)
    b = generate_demo_dataset(tmp_path / "b", seed=0, **SMALL)
    c = generate_demo_dataset(tmp_path / "c", seed=1, **SMALL)
    for split in ("train", "test"):
        pa, pb, pc = _pixels(a, split), _pixels(b, split), _pixels(c, split)
        assert pa.keys() == pb.keys() == pc.keys()
        assert all(np.array_equal(pa[k], pb[k]) for k in pa)
        assert not all(np.array_equal(pa[k], pc[k]) for k in pa)
    # image i of a class does not depend on how many are asked for
    d = generate_demo_dataset(tmp_path / "d", seed=0, n_train_per_class=5, n_test_per_class=2, image_size=16)
    pd_ = _pixels(d, "train")
    assert all(np.array_equal(v, pd_[k]) for k, v in _pixels(a, "train").items())


def test_skips_complete_and_repairs(tmp_path):
    root = generate_demo_dataset(tmp_path, **SMALL)
    probe = root / "train" / "circle" / "circle_00000.png"
    stamp = probe.stat().st_mtime_ns
    generate_demo_dataset(tmp_path, **SMALL)
    assert probe.stat().st_mtime_ns == stamp  # complete: nothing rewritten
    probe.unlink()
    generate_demo_dataset(tmp_path, **SMALL)
    assert probe.exists()  # incomplete: regenerated
    generate_demo_dataset(tmp_path, n_train_per_class=2, n_test_per_class=2, image_size=16)
    assert len(list((root / "train" / "star").glob("*.png"))) == 2  # stale files of other counts removed
    assert json.loads((root / "demo_dataset.json").read_text())["n_train_per_class"] == 2


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(n_train_per_class=0), ValueError),
        (dict(n_test_per_class=1.5), TypeError),
        (dict(image_size=4), ValueError),
        (dict(seed=-1), ValueError),
        (dict(seed=True), TypeError),
    ],
)
def test_generator_validates(tmp_path, kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        generate_demo_dataset(tmp_path, **kwargs)
    with pytest.raises(TypeError, match="root"):
        generate_demo_dataset(3)  # type: ignore[arg-type]


def test_backbone_cifar_stem():
    net = build_demo_backbone("resnet18", cifar_stem=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert isinstance(build_demo_backbone(), SmallCNN)  # the demo's default, DEMO_CONFIG["backbone"]
    assert isinstance(build_demo_backbone(DEMO_CONFIG["backbone"]), SmallCNN)
    with pytest.raises(ValueError, match="backbone"):
        build_demo_backbone("not_a_model")
    with pytest.raises(ValueError, match="cifar-stem"):
        build_demo_backbone("mobilenet_v3_small", cifar_stem=True)


def test_small_cnn_shapes_and_validation():
    net = SmallCNN()
    assert net.num_features == 128
    assert 90_000 < sum(p.numel() for p in net.parameters()) < 110_000  # "0.1 M parameters"
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 128)
    assert net(torch.randn(2, 3, 23, 31)).shape == (2, 128)  # any size: global average pool
    small = SmallCNN(width=4, depth=2, in_channels=1)
    assert small.num_features == 8 and small(torch.randn(3, 1, 8, 8)).shape == (3, 8)
    assert [type(m).__name__ for m in small.features] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d", "BatchNorm2d", "ReLU"]
    with pytest.raises(ValueError, match="depth"):
        SmallCNN(depth=0)
    with pytest.raises(TypeError, match="width"):
        SmallCNN(width=2.5)  # type: ignore[arg-type]


@pytest.mark.slow
def test_full_demo_raises_knn_accuracy(tmp_path):
    """Issue 3, item 4: the shipped demo settings make kNN accuracy clearly higher than the random init's."""
    from byol_wrapper.train import main

    torch.set_num_threads(2)
    out = tmp_path / "demo"
    assert main(["--demo", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == DEMO_CONFIG["max_steps"]
    assert evals[-1]["knn_accuracy"] >= evals[0]["knn_accuracy"] + 0.10, evals


def test_reduced_run(tmp_path):
    torch.set_num_threads(1)
    config = dict(
        image_size=16,
        n_train_per_class=4,
        n_test_per_class=2,
        batch_size=8,
        max_steps=3,
        warmup_steps=1,
        projection_size=8,
        projection_hidden_size=16,
        augment_kwargs={"crop_scale": (0.5, 1.0)},
        knn_k=5,
    )
    result = run_demo_experiment(config, root=tmp_path, seed=0)
    assert result["steps"] == 3
    n_test = 2 * len(DEMO_CLASSES)
    for key in ("knn_before", "knn_after"):  # correct answers out of the 12 test images
        assert abs(result[key] * n_test - round(result[key] * n_test)) < 1e-6 and 0 <= round(result[key] * n_test) <= n_test
    for key in ("seconds", "final_loss"):
        assert math.isfinite(result[key])
    assert result["config"]["backbone"] == DEMO_CONFIG["backbone"]
    with pytest.raises(ValueError, match="unknown keys"):
        run_demo_experiment({"epochs": 1}, root=tmp_path)
    with pytest.raises(ValueError, match="optimizer"):
        run_demo_experiment({"optimizer": "lamb"}, root=tmp_path)


def test_demo_says_what_it_does_before_the_slow_parts(tmp_path, monkeypatch, capsys):
    """byol-train --demo prints a line before generating the data and before the first kNN (seconds each), so the
    first output comes at once instead of after a silent wait."""
    import byol_wrapper.cli.trainer as cli_trainer
    import byol_wrapper.demo as demo
    import byol_wrapper.evaluate as evaluate
    from byol_wrapper.train import main

    seen: dict[str, str] = {}
    real_generate, real_extract = demo.generate_demo_dataset, evaluate.extract_features

    def generate(*args, **kwargs):
        seen.setdefault("generate", capsys.readouterr().err)
        return real_generate(*args, n_train_per_class=3, n_test_per_class=2, image_size=16, seed=0)

    def extract(*args, **kwargs):
        seen.setdefault("knn", capsys.readouterr().err)
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(demo, "generate_demo_dataset", generate)
    monkeypatch.setattr(evaluate, "extract_features", extract)
    assert cli_trainer  # the trainer imports extract_features from byol_wrapper.evaluate when it evaluates
    out = tmp_path / "demo"
    argv = ["--demo", "--out", str(out), "--device", "cpu", "--no-progress", "--max-steps", "1", "--batch-size", "4",
            "--projection-size", "8", "--projection-hidden-size", "16", "--workers", "0"]
    assert main(argv) == 0
    assert seen["generate"].startswith("demo: preparing the synthetic data set in ")  # the first line, before the work
    assert "kNN evaluation of the random initialisation on 18 + 12 images" in seen["knn"]
    lines = []

    result = demo.run_demo_experiment(
        dict(image_size=16, n_train_per_class=2, n_test_per_class=1, batch_size=4, max_steps=1, warmup_steps=0,
             projection_size=8, projection_hidden_size=16, knn_k=3),
        root=tmp_path / "lib", log=lines.append,
    )
    assert result["steps"] == 1
    assert lines[0].startswith("data: generating 6 classes x 2 + 1 images of 16 px")  # before the data exists
    assert lines.index("kNN accuracy of the random initialisation ...") < next(
        i for i, line in enumerate(lines) if line.startswith("kNN accuracy before pretraining"))
