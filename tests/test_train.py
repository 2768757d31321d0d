"""The byol-train command line end to end: outputs, resume, SIGKILL safety, bad input (CPU, 16 px, few steps)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import byol_wrapper
from byol_wrapper.checkpoint import load_checkpoint
from byol_wrapper.optim import warmup_cosine_lr
from byol_wrapper.train import _resolve_precision, apply_cifar_stem, build_backbone, main

REPO = Path(__file__).resolve().parents[1]

# A small, fast model with small checkpoints for most tests; the ResNet-18 + CIFAR stem path is covered once.
TINY = ["--backbone", "shufflenet_v2_x0_5", "--backbone-kwargs", '{"num_classes": 2}']
RESNET = ["--backbone", "resnet18", "--cifar-stem", "--backbone-kwargs", '{"num_classes": 2}']


def _write_images(root: Path, classes: int = 2, per_class: int = 6, size: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = (rng.random((size, size, 3)) * 80).astype(np.uint8)
            arr[..., c % 3] += 150  # a colour per class, so the kNN monitor has something to find
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("images")
    data = _write_images(base / "data")
    evald = base / "eval"
    _write_images(evald / "train", per_class=4, seed=1)
    _write_images(evald / "test", per_class=2, seed=2)
    return {"data": data, "eval": evald}


def _args(data: Path, out: Path, *extra: str, model: list[str] = TINY) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), *model, "--image-size", "16", "--batch-size", "4",
        "--projection-size", "16", "--projection-hidden-size", "32", "--workers", "0", "--device", "cpu",
        "--no-progress", "--log-every", "2", "--optimizer", "lars", "--lr", "0.1", *extra,
    ]


def _records(out: Path, event: str = "train") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _run(argv: list[str]) -> tuple[int, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(argv)
    return rc, [str(w.message) for w in caught]


def test_end_to_end_outputs_then_resume_with_more_steps(folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = _args(folders["data"], out, "--eval-data", str(folders["eval"]), model=RESNET)
    rc, _ = _run([*argv, "--max-steps", "2"])
    assert rc == 0
    for name in ("last.pt", "backbone.pt", "backbone_ema.pt", "metrics.jsonl", "metrics.png", "config.json"):
        assert (out / name).is_file(), name

    # every file loads with weights_only=True; the backbones load into a rebuilt backbone
    raw = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert raw["step"] == 2 and raw["config"]["backbone"] == "resnet18" and raw["config"]["cifar_stem"] is True
    assert {"torch", "python", "numpy"} <= set(raw["rng"]) and raw["learner"]["_extra_state"]["step"] == 2
    assert raw["optimizer"]["param_groups"][1]["lars_exclude"] is True
    online = torch.load(out / "backbone.pt", weights_only=True)
    ema = torch.load(out / "backbone_ema.pt", weights_only=True)
    fresh = build_backbone("resnet18", cifar_stem=True, num_classes=2)
    assert online.keys() == ema.keys() == fresh.state_dict().keys()
    fresh.load_state_dict(ema)
    assert not all(torch.equal(online[k], ema[k]) for k in online)  # the EMA lags behind the online weights
    del raw, online, ema, fresh

    evals = _records(out, "eval")
    assert [e["step"] for e in evals] == [0, 2]  # random init before training, then the end of training
    assert all(0.0 <= e["knn_accuracy"] <= 1.0 for e in evals)
    assert [r["step"] for r in _records(out)] == [1, 2]
    assert {"step", "epoch", "loss", "tau", "lr", "images_per_sec", "time"} <= _records(out)[0].keys()

    # re-running with more steps resumes: step counter, schedules and log continue
    rc, messages = _run([*argv, "--max-steps", "4"])
    assert rc == 0
    assert any("training length changed from 2 to 4" in m for m in messages)
    train = _records(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 4 and state["learner"]["_extra_state"]["step"] == 4
    assert state["learner"]["_extra_state"]["total_steps"] == 4
    assert (out / "last.prev.pt").is_file()
    warmup = state["config"]["warmup_steps"]
    for r in train[2:]:  # lr of step k (1-based) is the schedule's value at index k - 1 on the new length
        assert r["lr"] == pytest.approx(warmup_cosine_lr(r["step"] - 1, 4, warmup, 0.1))
    assert train[-1]["tau"] == pytest.approx(1 - (1 - 0.99) * (np.cos(np.pi * 3 / 4) + 1) / 2)
    assert [e["step"] for e in _records(out, "eval")] == [0, 2, 3, 4]  # epoch end (3 batches), then the end
    del state

    # a different model in the same --out is a clear error, before anything is built
    rc = main([*argv[: argv.index("--backbone")], "--backbone", "resnet34", *argv[argv.index("--cifar-stem") :], "--max-steps", "6"])
    assert rc == 2


def test_resume_reproduces_the_uninterrupted_run(folders: dict[str, Path], tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    argv = ["--max-steps", "5", "--checkpoint-every", "2", "--log-every", "1"]
    assert main(_args(folders["data"], straight, *argv)) == 0
    # last.prev.pt holds step 4 (mid-epoch: 3 batches per epoch); resume from it in a fresh folder
    resumed.mkdir()
    shutil.copy(straight / "last.prev.pt", resumed / "last.pt")
    assert load_checkpoint(resumed / "last.pt")["batch_in_epoch"] == 1
    assert main(_args(folders["data"], resumed, *argv)) == 0
    a = torch.load(straight / "backbone.pt", weights_only=True)
    b = torch.load(resumed / "backbone.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same data order, augmentations and updates
    assert [r["loss"] for r in _records(resumed)] == [r["loss"] for r in _records(straight)][4:]


def test_truncated_last_checkpoint_falls_back_to_previous(folders: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    argv = _args(folders["data"], out, "--checkpoint-every", "2", "--max-steps", "4")
    assert main(argv) == 0
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 3])
    rc, messages = _run(argv)
    assert rc == 0
    assert any("last.pt cannot be loaded" in m for m in messages)
    assert any("resuming from the previous checkpoint" in m for m in messages)
    assert "resuming from" in capsys.readouterr().err
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4]  # steps 3-4 redone from the step-2 checkpoint
    assert load_checkpoint(out / "last.pt")["step"] == 4
    # the same command once more: nothing left to train, backbones re-exported, log untouched
    log = (out / "metrics.jsonl").read_text()
    assert main(argv) == 0
    assert "already complete" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == log


def test_corrupt_image_is_skipped_and_counted_across_workers(tmp_path: Path) -> None:
    data = _write_images(tmp_path / "data", per_class=4)  # 8 good images
    (data / "class0" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")  # 9 files: 2 batches of 4
    out = tmp_path / "run"
    argv = _args(data, out, "--max-steps", "4", "--workers", "1")
    rc, messages = _run(argv)
    assert rc == 0
    skipped = _records(out)[-1]["skipped_images"]
    assert 1 <= skipped <= 2  # the broken file is in a trained batch in at least one of the two epochs
    assert any("unreadable image(s) in epoch" in m for m in messages)  # the main process' per-epoch summary
    assert load_checkpoint(out / "last.pt")["skipped_images"] == skipped


def test_sigkill_mid_training_then_resume(folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = _args(folders["data"], out, "--checkpoint-every", "1", "--log-every", "1")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "byol_wrapper.train", *argv, "--max-steps", "1000"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.prev.pt").exists():  # at least two checkpoints written: well into training
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # killed at any point of a save: a complete last.pt, or (between the two renames) only a complete last.prev.pt
    step = load_checkpoint(out / "last.pt" if (out / "last.pt").exists() else out / "last.prev.pt")["step"]
    assert step >= 1
    rc, messages = _run([*argv, "--max-steps", str(step + 2)])
    assert rc == 0
    assert [r["step"] for r in _records(out)] == list(range(1, step + 3))  # no gap, no duplicate
    assert load_checkpoint(out / "last.pt")["step"] == step + 2
    assert not list(out.glob(".tmp-*"))  # a temporary file from the killed save is cleaned up


def test_sigterm_saves_a_checkpoint_and_stops(folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    running = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *a: None)  # a late signal must not kill the test process

    def send_sigterm() -> None:
        while running.is_set() and not (out / "last.pt").exists():
            time.sleep(0.02)
        if running.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    running.set()
    watcher = threading.Thread(target=send_sigterm, daemon=True)
    watcher.start()
    try:
        rc = main(_args(folders["data"], out, "--checkpoint-every", "1", "--max-steps", "1000"))
    finally:
        running.clear()
        watcher.join(timeout=10)
        signal.signal(signal.SIGTERM, previous)
    assert rc == 128 + signal.SIGTERM
    state = load_checkpoint(out / "last.pt")
    assert 1 <= state["step"] < 1000 and state["step"] == _records(out)[-1]["step"]  # saved at the stop step
    assert (out / "metrics.png").is_file()


def test_demo_flag_uses_the_demo_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def generate_demo_dataset(root: Path, *, seed: int = 0, **sizes: int) -> Path:
        calls.append((seed, sizes))
        _write_images(Path(root) / "train", per_class=4)
        _write_images(Path(root) / "test", per_class=2, seed=1)
        return Path(root)

    demo = types.ModuleType("byol_wrapper.demo")
    demo.generate_demo_dataset = generate_demo_dataset
    demo.DEMO_CONFIG = {
        "backbone": "shufflenet_v2_x0_5", "backbone_kwargs": {"num_classes": 2}, "image_size": 16, "batch_size": 4,
        "epochs": 1, "projection_size": 16, "projection_hidden_size": 32, "workers": 0, "num_classes": 2,
        "n_train_per_class": 4, "data_seed": 7,
    }
    monkeypatch.setitem(sys.modules, "byol_wrapper.demo", demo)
    monkeypatch.setattr(byol_wrapper, "demo", demo, raising=False)
    out = tmp_path / "demo"
    argv = ["--demo", "--out", str(out), "--device", "cpu", "--no-progress", "--batch-size", "8"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == "shufflenet_v2_x0_5" and config["image_size"] == 16
    assert config["batch_size"] == 8  # the user's flag wins over DEMO_CONFIG
    assert config["data"] == str(out / "demo_data" / "train") and config["eval_data"] == str(out / "demo_data")
    assert [e["step"] for e in _records(out, "eval")] == [0, 1]
    # the data set is generated with the config's sizes and data seed, not with --seed
    assert calls == [(7, {"n_train_per_class": 4, "image_size": 16})]
    assert main(argv) == 0 and len(calls) == 2  # generate_demo_dataset decides itself whether to reuse


def test_real_demo_settings_reduced(tmp_path: Path, capsys) -> None:
    """``--demo`` with the real DEMO_CONFIG (SmallCNN, its augmentations), shortened by the user's flags."""
    from byol_wrapper.demo import DEMO_CONFIG

    out = tmp_path / "demo"
    argv = ["--demo", "--out", str(out), "--device", "cpu", "--no-progress", "--max-steps", "3", "--warmup-steps", "1", "--workers", "0"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == "byol_wrapper.demo:SmallCNN" and config["hidden_layer"] == "pool"
    assert config["augment_kwargs"] == DEMO_CONFIG["augment_kwargs"] and config["image_size"] == DEMO_CONFIG["image_size"]
    assert config["total_steps"] == 3 and config["lr"] == DEMO_CONFIG["lr"]
    meta = json.loads((out / "demo_data" / "demo_dataset.json").read_text())
    assert meta["n_train_per_class"] == DEMO_CONFIG["n_train_per_class"] and meta["image_size"] == DEMO_CONFIG["image_size"]
    evals = _records(out, "eval")
    assert [e["step"] for e in evals] == [0, 3]
    lines = capsys.readouterr().err.splitlines()
    summary = [line for line in lines if line.startswith("kNN accuracy:")]
    assert summary == [
        f"kNN accuracy: {100 * evals[0]['knn_accuracy']:.2f}% with random weights (step 0) -> "
        f"{100 * evals[1]['knn_accuracy']:.2f}% after 3 steps of BYOL "
        f"({100 * (evals[1]['knn_accuracy'] - evals[0]['knn_accuracy']):+.2f} points)"
    ]
    from byol_wrapper.demo import SmallCNN

    net = SmallCNN()
    net.load_state_dict(torch.load(out / "backbone.pt", weights_only=True))


def test_own_backbone_and_augment_kwargs(folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "own"
    model = ["--backbone", "byol_wrapper.demo:SmallCNN", "--backbone-kwargs", '{"width": 4, "depth": 2}', "--hidden-layer", "pool"]
    aug = ["--augment-kwargs", '{"crop_scale": [0.5, 1.0], "grayscale_p": 0.5}']
    assert main(_args(folders["data"], out, "--max-steps", "2", *aug, model=model)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["augment_kwargs"] == {"crop_scale": [0.5, 1.0], "grayscale_p": 0.5}
    weights = torch.load(out / "backbone.pt", weights_only=True)
    assert weights["features.0.weight"].shape == (4, 3, 3, 3) and weights["features.4.weight"].shape == (8, 4, 3, 3)
    net = build_backbone("byol_wrapper.demo:SmallCNN", width=4, depth=2)
    net.load_state_dict(weights)
    # the same command with more steps resumes from the checkpoint
    with pytest.warns(RuntimeWarning, match="training length changed from 2 to 3"):
        assert main(_args(folders["data"], out, "--max-steps", "3", *aug, model=model)) == 0
    assert [r["step"] for r in _records(out)] == [1, 2, 3]


def test_own_backbone_module_in_the_current_folder(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`byol-train --backbone mynets:Net` run next to mynets.py works like `python -m`, also as a console script."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "byol_test_nets.py").write_text(
        "from torch import nn\n"
        "class Net(nn.Sequential):\n"
        "    def __init__(self, width=4):\n"
        "        super().__init__(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
    )
    monkeypatch.chdir(code)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(code), ".")])  # as in a console script
    monkeypatch.delitem(sys.modules, "byol_test_nets", raising=False)
    out = tmp_path / "out"
    model = ["--backbone", "byol_test_nets:Net", "--backbone-kwargs", '{"width": 6}', "--hidden-layer", "-1"]
    assert main(_args(folders["data"], out, "--max-steps", "1", model=model)) == 0
    assert torch.load(out / "backbone.pt", weights_only=True)["0.weight"].shape == (6, 3, 3, 3)
    assert str(code) not in sys.path  # the folder was only added for the import


def test_augment_kwargs_reach_the_views(folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import byol_wrapper.train as train_module

    seen = {}
    real = train_module.BYOL

    def spy(*args, **kwargs):
        learner = real(*args, **kwargs)
        seen["views"] = (learner.augment1, learner.augment2)
        return learner

    monkeypatch.setattr(train_module, "BYOL", spy)
    aug = ["--augment-kwargs", '{"crop_scale": [0.5, 1.0], "grayscale_p": 0.5}']
    assert main(_args(folders["data"], tmp_path / "o", "--max-steps", "1", *aug)) == 0
    for view in seen["views"]:
        assert view.crop_scale == (0.5, 1.0) and view.grayscale_p == 0.5
    assert seen["views"][0].blur_p == 1.0 and seen["views"][1].solarize_p == 0.2  # the rest stays the paper's


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda p: p / "missing", [], "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", [], "contains no image files"),
        (None, ["--batch-size", "64"], "larger than the 12 images"),
        (None, ["--backbone", "resnet19"], "did you mean"),
        (None, ["--backbone", "mobilenet_v3_small", "--cifar-stem"], "--cifar-stem needs a ResNet"),
        (None, ["--hidden-layer", "layer9"], "hidden"),
        (None, ["--eval-data", "EMPTY"], "--eval-data must hold train"),
        (None, ["--backbone", "no_such_module_xyz:Net"], "cannot import module 'no_such_module_xyz'"),
        (None, ["--backbone", "byol_wrapper.demo:SmalCNN"], "did you mean SmallCNN"),
        (None, ["--backbone", "byol_wrapper.demo:DEMO_CONFIG"], "not a class or function"),
        (None, ["--backbone", "builtins:dict"], "returned a dict, not a torch.nn.Module"),
        (None, ["--backbone", "byol_wrapper.demo:SmallCNN", "--backbone-kwargs", '{"widht": 4}'], "widht"),
        (None, ["--backbone", "a:b:c"], "one colon"),
        (None, ["--augment-kwargs", '{"crop_scal": [0.5, 1]}'], "crop_scal"),
        (None, ["--augment-kwargs", '{"crop_scale": [0.5, 2]}'], "crop_scale must satisfy"),
        (None, ["--backbone", "timm:resnet18"] if importlib.util.find_spec("timm") is None else ["--backbone", "timm:not_a_model_x"], "timm"),
    ],
)
def test_bad_input_exits_2_with_a_message(folders: dict[str, Path], tmp_path: Path, capsys, make, extra, message) -> None:
    data = make(tmp_path) if make else folders["data"]
    extra = [str(tmp_path) if e == "EMPTY" else e for e in extra]
    assert main([*_args(data, tmp_path / "out", "--max-steps", "1"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("byol-train: error:") and message in err
    assert not (tmp_path / "out" / "last.pt").exists()


def test_cli_parsing_help_and_missing_data(capsys) -> None:
    assert main(["--help"]) == 0
    assert "--checkpoint-every" in capsys.readouterr().out
    assert main(["--optimizer", "adam"]) == 2  # argparse error
    assert main(["--out", "/tmp/never-created-byol"]) == 2
    assert "--data DIR is required" in capsys.readouterr().err


def test_cifar_stem_and_precision_fallback() -> None:
    net = apply_cifar_stem(build_backbone("resnet18"))
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and isinstance(net.maxpool, torch.nn.Identity)
    assert net(torch.rand(2, 3, 16, 16)).shape == (2, 1000)
    with pytest.raises(ValueError, match="cifar-stem"):
        apply_cifar_stem(torch.nn.Linear(2, 2))
    with pytest.warns(RuntimeWarning, match="fp16"):
        assert _resolve_precision("fp16", torch.device("cpu")) == "32"
    assert _resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_plot_is_skipped_with_a_warning_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from byol_wrapper.train import plot_metrics

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"event": "train", "step": 1, "loss": 3.0}\n{"event": "eval", "step": 1, "knn_accuracy": 0.5}\n{"cut')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(RuntimeWarning, match="matplotlib is not installed"):
        assert plot_metrics(metrics, tmp_path / "m.png") is False
    assert not (tmp_path / "m.png").exists()


def test_channels_last_and_compile_flags(folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from byol_wrapper.train import _Trainer, build_parser

    compiled: list[torch.nn.Module] = []
    calls: list[int] = []

    def fake_compile(module: torch.nn.Module, **kwargs):  # stands in for inductor (minutes on this CPU)
        compiled.append(module)

        def forward(x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[0])
            return module(x)

        return forward

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "run"
    args = build_parser().parse_args(_args(folders["data"], out, "--channels-last", "--compile", "--max-steps", "2", model=RESNET))
    trainer = _Trainer(args)
    assert compiled == [trainer.learner]  # the whole learner forward is compiled, once
    conv = trainer.learner.net.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert trainer.run() == 0
    assert calls == [4, 4]  # every training step went through the compiled forward
    config = json.loads((out / "config.json").read_text())
    assert config["channels_last"] is True and config["compile"] is True
    assert set(load_checkpoint(out / "last.pt")["learner"]) == set(trainer.learner.state_dict())  # plain keys


@pytest.mark.slow
def test_compile_flag_with_inductor(folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = _args(folders["data"], out, "--compile", "--max-steps", "2", model=["--backbone", "byol_wrapper.demo:SmallCNN", "--hidden-layer", "pool"])
    assert main(argv) == 0
    assert [r["step"] for r in _records(out)] == [1, 2] and all(np.isfinite(r["loss"]) for r in _records(out))
