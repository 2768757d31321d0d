"""An offline BYOL demo: a procedurally generated shapes data set and a small reference training loop.

:func:`generate_demo_dataset` writes an ImageFolder tree (``root/train/<class>/*.png``, ``root/test/<class>/*.png``)
of synthetic images drawn with numpy and PIL only (no download, deterministic from the seed). Each image shows one
shape (the class: circle, square, triangle, cross, ring or star) at a random position, scale and rotation, bright on
a dark, low-contrast textured background (smooth blobs, a gradient or soft stripes), the whole image tinted with a
random colour and covered with pixel noise. The tint, the brightness levels and the position are nuisances inside the
family of BYOL's augmentations (colour jitter, grayscale, random resized crop); the shape is what two views share.

:data:`DEMO_CONFIG` holds the settings the ``byol-train --demo`` command uses, and :func:`run_demo_experiment` is a
plain-python reference loop (generate data, build the backbone, kNN before, train, kNN after) that does not depend on
the command line, so tests can run it with a reduced configuration.

Example:
    >>> from byol_wrapper.demo import DEMO_CONFIG, run_demo_experiment
    >>> result = run_demo_experiment(DEMO_CONFIG, seed=0)  # doctest: +SKIP
    >>> result["knn_before"], result["knn_after"], result["seconds"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from .backbones import SmallCNN, build_backbone
from .optim import OPTIMIZERS
from .utils.checks import check_choice, check_dir, check_int

__all__ = [
    "DEMO_CLASSES",
    "DEMO_CONFIG",
    "SmallCNN",
    "build_demo_backbone",
    "generate_demo_dataset",
    "load_demo_split",
    "run_demo_experiment",
]

#: Class names of the demo data set, in label order (ImageFolder sorts class folders alphabetically: this is that order).
DEMO_CLASSES: tuple[str, ...] = ("circle", "cross", "ring", "square", "star", "triangle")

#: Settings of ``byol-train --demo`` and of :func:`run_demo_experiment` (run times: ``benchmarks/RESULTS.md``, "Offline demo").
#:
#: The demo trains :class:`SmallCNN` (three conv-BN-ReLU blocks, 0.1 M parameters) on 16 px images, so that the
#: 2000 optimizer steps BYOL needs to get well past its first phase (in which kNN accuracy can dip below the random
#: initialisation's before rising) fit in the time budget. A ResNet-18 on 32 px images manages about 300 steps in
#: the same time, after which its kNN accuracy on this data is still below the random initialisation's. The
#: crop is milder (``crop_scale`` from 0.3, not 0.08: at 16 px a crop of 8% of the area is 4 x 4 pixels) and the
#: colour jitter and grayscale stronger than the paper's, because the generated images vary in colour much more
#: than photographs do.
#:
#: Keys: ``backbone`` (a :func:`byol_wrapper.backbones.build_backbone` name: torchvision, ``timm:NAME`` or
#: ``MODULE:CALLABLE``), ``cifar_stem``, ``hidden_layer``, ``image_size`` (of the generated images and of the views),
#: ``n_train_per_class``/``n_test_per_class``/``data_seed`` (the data set), ``batch_size``, ``max_steps`` (optimizer
#: steps), ``optimizer`` (``"lars"``, ``"adamw"`` or ``"sgd"``), ``lr``, ``weight_decay`` (biases and norm parameters
#: excluded), ``warmup_steps`` (linear warm-up, then cosine decay to 0), ``projection_size``,
#: ``projection_hidden_size``, ``moving_average_decay`` (base tau; the cosine schedule to 1 over ``max_steps`` is
#: used), ``augment_kwargs`` (overrides for both views, see :func:`byol_wrapper.augmentations.byol_views`),
#: ``knn_k``, ``knn_temperature``; and, used by the command only, ``workers`` (DataLoader processes; 0, because
#: decoding 16 px PNGs in the training process is cheaper than a worker competing with it for two cores; figures in
#: ``benchmarks/RESULTS.md``) and ``eval_every`` (kNN evaluation every N epochs).
DEMO_CONFIG: dict[str, Any] = {
    "backbone": "byol_wrapper.demo:SmallCNN",
    "cifar_stem": False,
    "hidden_layer": "pool",
    "image_size": 16,
    "n_train_per_class": 500,
    "n_test_per_class": 100,
    "data_seed": 0,
    "batch_size": 64,
    "max_steps": 2000,
    "optimizer": "adamw",
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "warmup_steps": 20,
    "projection_size": 128,
    "projection_hidden_size": 512,
    "moving_average_decay": 0.99,
    "augment_kwargs": {"crop_scale": [0.3, 1.0], "jitter": [0.4, 0.4, 0.8, 0.5], "grayscale_p": 0.4},
    "knn_k": 20,
    "knn_temperature": 0.1,
    "workers": 0,
    "eval_every": 10,
}

_SPLITS = ("train", "test")
_MARKER = "demo_dataset.json"
_FORMAT_VERSION = 1
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down (anti-aliasing)


# ----------------------------------------------------------------------------------------------------------
# rendering


def _shape_outline(name: str) -> np.ndarray:
    """Vertices ``(N, 2)`` of a class's outline, centred at 0 and within the unit disc."""
    if name == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.72
    if name == "triangle":
        a = np.deg2rad([90.0, 210.0, 330.0])
        return np.stack([np.cos(a), np.sin(a)], axis=1)
    if name == "cross":
        w = 0.33
        return np.array(
            [[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w]],
            dtype=np.float64,
        ) * 0.95
    if name == "star":
        a = np.deg2rad(90.0 + 36.0 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
    if name in ("circle", "ring"):
        a = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(a), np.sin(a)], axis=1) * 0.85
    raise ValueError(f"unknown demo class {name!r}; expected one of {DEMO_CLASSES}")


def _shape_mask(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """Anti-aliased ``(size, size)`` float mask in [0, 1] of one shape at a random position, scale and rotation."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    radius = rng.uniform(0.22, 0.42) * big
    angle = rng.uniform(0.0, 2.0 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = rng.uniform(0.8 * radius, big - 0.8 * radius, size=2)
    outline = _shape_outline(name) @ rot.T
    draw.polygon([tuple(p) for p in outline * radius + centre], fill=255)
    if name == "ring":
        draw.polygon([tuple(p) for p in outline * (0.5 * radius) + centre], fill=0)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``(size, size)`` texture in [0, 1]: smooth blobs, a linear gradient or soft stripes."""
    kind = int(rng.integers(3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    if kind == 0:
        grid = int(rng.integers(2, 6))
        coarse = (rng.random((grid, grid)) * 255).astype(np.uint8)
        tex = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    elif kind == 1:
        theta = rng.uniform(0.0, 2.0 * math.pi)
        tex = np.cos(theta) * (xx - 0.5) + np.sin(theta) * (yy - 0.5)
    else:
        theta = rng.uniform(0.0, math.pi)
        freq = rng.uniform(1.5, 4.0) * 2.0 * math.pi
        tex = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + rng.uniform(0.0, 2.0 * math.pi))
    tex = tex - tex.min()
    return tex / max(float(tex.max()), 1e-6)


def _render_image(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 image of class ``name``."""
    mask = _shape_mask(rng, name, size)
    dark = rng.uniform(0.0, 0.25)
    background = dark + rng.uniform(0.05, 0.25) * _background_texture(rng, size)
    luminance = background * (1.0 - mask) + rng.uniform(0.65, 1.0) * mask
    tint = rng.uniform(0.15, 1.0, size=3)
    tint /= tint.max()
    image = luminance[..., None] * tint + rng.normal(0.0, 0.02, size=(size, size, 3))
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _image_rng(seed: int, split: int, label: int, index: int) -> np.random.Generator:
    # One independent stream per image: image i of a class is the same whatever the requested counts.
    return np.random.default_rng([seed, split, label, index])


def _expected_files(n: int, name: str) -> list[str]:
    return [f"{name}_{i:05d}.png" for i in range(n)]


def _is_complete(root: Path, meta: dict[str, Any], counts: dict[str, int]) -> bool:
    marker = root / _MARKER
    try:
        if json.loads(marker.read_text()) != meta:
            return False
    except (OSError, ValueError):
        return False
    for split, n in counts.items():
        for name in DEMO_CLASSES:
            folder = root / split / name
            if not folder.is_dir() or sorted(p.name for p in folder.glob("*.png")) != _expected_files(n, name):
                return False
    return True


def generate_demo_dataset(
    root: str | Path,
    *,
    n_train_per_class: int = 200,
    n_test_per_class: int = 50,
    image_size: int = 32,
    seed: int = 0,
) -> Path:
    """Writes the synthetic shapes data set as an ImageFolder tree, or reuses a complete one.

    The tree is ``root/train/<class>/<class>_00000.png ...`` and ``root/test/<class>/...`` for the classes of
    :data:`DEMO_CLASSES`, RGB PNGs of ``image_size`` x ``image_size`` pixels, plus ``root/demo_dataset.json``
    describing it. Every image comes from its own random stream seeded by ``(seed, split, class, index)``, so the
    output is deterministic and image ``i`` of a class does not depend on the counts. If ``root`` already holds a
    complete data set with the same parameters nothing is written; otherwise the images are (re)written and PNGs
    left over from other counts in the class folders are deleted.

    Args:
        root: Folder to write into (created if needed).
        n_train_per_class: Training images per class (>= 1).
        n_test_per_class: Test images per class (>= 1).
        image_size: Side of the square images in pixels (>= 8).
        seed: Seed of the generator (>= 0).

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: If ``root`` is not a path or a count, size or seed is not an int.
        ValueError: If a count, the size or the seed is out of range.
    """
    root = check_dir("root", root, must_exist=False, what="a folder to write the data set into")
    counts = {
        "train": check_int("n_train_per_class", n_train_per_class, 1),
        "test": check_int("n_test_per_class", n_test_per_class, 1),
    }
    image_size = check_int("image_size", image_size, 8)
    seed = check_int("seed", seed, 0)
    meta = {
        "format": _FORMAT_VERSION,
        "classes": list(DEMO_CLASSES),
        "n_train_per_class": counts["train"],
        "n_test_per_class": counts["test"],
        "image_size": image_size,
        "seed": seed,
    }
    if _is_complete(root, meta, counts):
        return root
    marker = root / _MARKER
    if marker.exists():
        marker.unlink()  # incomplete while we write
    for split_index, split in enumerate(_SPLITS):
        for label, name in enumerate(DEMO_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            expected = _expected_files(counts[split], name)
            keep = set(expected)
            for stale in folder.glob("*.png"):
                if stale.name not in keep:
                    stale.unlink()
            for index, filename in enumerate(expected):
                pixels = _render_image(_image_rng(seed, split_index, label, index), name, image_size)
                Image.fromarray(pixels, mode="RGB").save(folder / filename, optimize=False)
    marker.write_text(json.dumps(meta, indent=2))
    return root


def load_demo_split(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads one split of an ImageFolder tree into memory.

    Classes are the sub-folders of ``root/split`` in sorted order (torchvision ``ImageFolder``'s labels), images the
    ``*.png`` files of each in sorted order.

    Args:
        root: The data set folder (as returned by :func:`generate_demo_dataset`).
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(images, labels)``: uint8 ``(N, 3, H, W)`` and int64 ``(N,)``.

    Raises:
        TypeError: If ``root`` is not a path.
        ValueError: If ``split`` is unknown, the folder has no class folders or images, or image sizes differ.
    """
    root = check_dir("root", root, must_exist=False, what="the folder generate_demo_dataset wrote")
    split = check_choice("split", split, _SPLITS)
    folder = root / split
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not classes:
        raise ValueError(f"root has no class folders under {folder}; call generate_demo_dataset(root) first")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).glob("*.png")):
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
            labels.append(label)
    if not images:
        raise ValueError(f"root has no PNG images under {folder}; call generate_demo_dataset(root) first")
    if len({im.shape for im in images}) != 1:
        raise ValueError(f"images under {folder} have different sizes; regenerate the data set")
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return stacked, torch.tensor(labels, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------
# model and training


def build_demo_backbone(backbone: str = "byol_wrapper.demo:SmallCNN", cifar_stem: bool = False) -> nn.Module:
    """A randomly initialised backbone, built as ``byol-train --backbone`` builds it.

    Args:
        backbone: A torchvision model name (e.g. ``"resnet18"``), ``"timm:NAME"`` or ``"MODULE:CALLABLE"`` (see
            :func:`byol_wrapper.backbones.build_backbone`).
        cifar_stem: Replace the ResNet stem (7x7 stride-2 convolution and max-pool) by a 3x3 stride-1 convolution
            and no pooling, for small images.

    Returns:
        The model (weights random, no download).

    Raises:
        TypeError: If ``backbone`` is not a str.
        ValueError: If the name is unknown, or ``cifar_stem`` is asked for a model without ``conv1``/``maxpool``.
    """
    return build_backbone(backbone, cifar_stem=cifar_stem)


def _merge_config(config: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict like DEMO_CONFIG; got {type(config).__name__}")
    unknown = sorted(set(config) - set(DEMO_CONFIG))
    if unknown:
        raise ValueError(f"config has unknown keys {unknown}; the keys are those of DEMO_CONFIG: {sorted(DEMO_CONFIG)}")
    merged = {**DEMO_CONFIG, **config}
    if merged["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"config['optimizer'] must be one of {OPTIMIZERS}; got {merged['optimizer']!r}")
    for key in ("batch_size", "max_steps", "image_size", "n_train_per_class", "n_test_per_class", "knn_k"):
        check_int(f"config[{key!r}]", merged[key], 2 if key == "batch_size" else 1)
    check_int("config['warmup_steps']", merged["warmup_steps"], 0)
    return merged


def run_demo_experiment(
    config: Mapping[str, Any] = DEMO_CONFIG,
    root: str | Path | None = None,
    seed: int = 0,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Reference loop of the demo: data, kNN of the random backbone, BYOL training, kNN again.

    The kNN classifier (:func:`byol_wrapper.evaluate.knn_accuracy`) runs on the backbone's ``hidden_layer``
    features of the unaugmented images (ImageNet-normalised, BatchNorm in eval mode), train split as memory bank
    and test split as queries.

    Args:
        config: Settings; keys missing from it are taken from :data:`DEMO_CONFIG` (so a test can pass only the few
            it reduces). Unknown keys raise ``ValueError``.
        root: Folder for the data set; ``None`` uses a temporary folder removed afterwards.
        seed: Seed of torch's RNG (backbone and head initialisation, augmentations, batch order). The data set uses
            ``config["data_seed"]``.
        log: Called with progress lines (e.g. ``print``); ``None`` is silent.

    Returns:
        ``{"knn_before", "knn_after", "seconds", "seconds_data", "seconds_knn", "seconds_train", "steps",
        "final_loss", "config"}``: accuracies in [0, 1], wall-clock seconds (total and parts), the optimizer steps
        done, the mean loss of the last 10 steps and the merged configuration.

    Raises:
        TypeError: If ``config`` is not a mapping, ``seed`` not an int or ``root`` not a path.
        ValueError: If a setting is unknown or out of range.
    """
    from .byol import BYOL
    from .evaluate import knn_accuracy
    from .engine import Schedule, train_step
    from .optim import build_optimizer

    cfg = _merge_config(config)
    seed = check_int("seed", seed, 0)
    say = log if log is not None else (lambda _msg: None)
    start = time.perf_counter()

    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="byol_demo_")) if root is None else root
        say(f"data: generating {len(DEMO_CLASSES)} classes x {cfg['n_train_per_class']} + {cfg['n_test_per_class']} "
            f"images of {cfg['image_size']} px ...")
        data_root = generate_demo_dataset(
            folder,
            n_train_per_class=cfg["n_train_per_class"],
            n_test_per_class=cfg["n_test_per_class"],
            image_size=cfg["image_size"],
            seed=check_int("config['data_seed']", cfg["data_seed"], 0),
        )
        train = load_demo_split(data_root, "train")
        test = load_demo_split(data_root, "test")
    seconds_data = time.perf_counter() - start
    say(f"data: {len(train[1])} train / {len(test[1])} test images, {len(DEMO_CLASSES)} classes ({seconds_data:.1f}s)")

    torch.manual_seed(seed)
    net = build_demo_backbone(cfg["backbone"], bool(cfg["cifar_stem"]))
    learner = BYOL(
        net,
        cfg["image_size"],
        hidden_layer=cfg["hidden_layer"],
        projection_size=cfg["projection_size"],
        projection_hidden_size=cfg["projection_hidden_size"],
        moving_average_decay=cfg["moving_average_decay"],
        total_steps=cfg["max_steps"],
        augment_kwargs=dict(cfg["augment_kwargs"] or {}),
    )

    def knn() -> float:
        learner.eval()
        try:
            with torch.no_grad():
                return knn_accuracy(
                    lambda x: learner(x, return_embedding=True, return_projection=False),
                    train,
                    test,
                    k=cfg["knn_k"],
                    temperature=cfg["knn_temperature"],
                )
        finally:
            learner.train()

    say("kNN accuracy of the random initialisation ...")
    t = time.perf_counter()
    knn_before = knn()
    seconds_knn = time.perf_counter() - t
    say(f"kNN accuracy before pretraining: {100 * knn_before:.1f}%")

    optimizer = build_optimizer(cfg["optimizer"], learner, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    total = cfg["max_steps"]
    schedule = Schedule(total, cfg["lr"], min(cfg["warmup_steps"], total), base_tau=cfg["moving_average_decay"])

    images = train[0]
    batch = min(cfg["batch_size"], images.shape[0])
    generator = torch.Generator().manual_seed(seed)
    losses: list[torch.Tensor] = []  # detached, fetched from the device only when logged (no sync per step)
    t = time.perf_counter()
    learner.train()
    while len(losses) < total:
        order = torch.randperm(images.shape[0], generator=generator)
        for i in range(0, images.shape[0] - batch + 1, batch):  # drop the last partial batch (BatchNorm)
            losses.append(train_step(learner, optimizer, images[order[i : i + batch]], schedule=schedule).loss)
            if log is not None and len(losses) % max(1, total // 5) == 0:
                recent = float(torch.stack(losses[-10:]).mean())
                say(f"step {len(losses)}/{total}  loss {recent:.3f}  ({time.perf_counter() - t:.0f}s)")
            if len(losses) >= total:
                break
    seconds_train = time.perf_counter() - t

    t = time.perf_counter()
    knn_after = knn()
    seconds_knn += time.perf_counter() - t
    say(f"kNN accuracy after pretraining: {100 * knn_after:.1f}%")
    return {
        "knn_before": knn_before,
        "knn_after": knn_after,
        "seconds": time.perf_counter() - start,
        "seconds_data": seconds_data,
        "seconds_knn": seconds_knn,
        "seconds_train": seconds_train,
        "steps": len(losses),
        "final_loss": float(torch.stack(losses[-10:]).mean()),
        "config": cfg,
    }
