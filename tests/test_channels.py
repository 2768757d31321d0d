"""Part A of issue 12: grayscale, 16-bit and multi-channel images with the defaults and from byol-train."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from byol_wrapper import BYOL
from byol_wrapper.augmentations import IMAGENET_MEAN, IMAGENET_STD, BYOLView, byol_views, to_float_image
from byol_wrapper.channels import adapt_first_conv, default_normalization
from byol_wrapper.data import ImageFolderDataset, collate_skip_none
from byol_wrapper.image_io import ChannelMismatchError, load_image
from byol_wrapper.train import build_backbone, main

UINT16 = getattr(torch, "uint16", None)


def _small_cnn(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def only(size: int, **kw) -> BYOLView:
    """A view with every op off except those in ``kw``, no normalization."""
    base = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    base.update(kw)
    return BYOLView(size, mean=None, std=None, **base)


# ------------------------------------------------------------------------------------------ default statistics


def test_default_normalization_per_channel_count() -> None:
    assert default_normalization(3) == (IMAGENET_MEAN, IMAGENET_STD)
    mean, std = default_normalization(1)
    # the ITU-R 601 luma of the ImageNet statistics
    assert mean == (round(0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406, 3),) == (0.459,)
    assert std == (round(0.299 * 0.229 + 0.587 * 0.224 + 0.114 * 0.225, 3),) == (0.226,)
    assert default_normalization(5) == ((0.459,) * 5, (0.226,) * 5)
    with pytest.raises(ValueError, match="channels"):
        default_normalization(0)


@pytest.mark.parametrize("channels", [1, 2, 4, 13])
def test_learner_defaults_fit_a_non_rgb_first_conv(channels: int) -> None:
    # Before issue 12: "ValueError: mean has 3 values but x has 1 channels" on the first forward.
    learner = BYOL(_small_cnn(channels), image_size=16, hidden_layer=-1, projection_size=8, projection_hidden_size=16)
    assert learner.channels == channels
    assert learner.augment1.mean == (0.459,) * channels and learner.augment2.std == (0.226,) * channels
    loss = learner(torch.rand(4, channels, 20, 20))
    assert torch.isfinite(loss)
    emb = learner.eval()(torch.rand(2, channels, 16, 16), return_embedding=True, return_projection=False)
    assert emb.shape == (2, 8)


def test_torchvision_and_timm_one_channel_backbones_with_defaults() -> None:
    timm = pytest.importorskip("timm")
    resnet = torchvision.models.resnet18(num_classes=4)
    resnet.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    for net, layer in ((resnet, "avgpool"), (timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1), -1)):
        learner = BYOL(net, image_size=32, hidden_layer=layer, projection_size=8, projection_hidden_size=16)
        assert learner.channels == 1
        assert torch.isfinite(learner(torch.rand(2, 1, 32, 32)))


def test_explicit_wrong_length_stats_still_raise() -> None:
    learner = BYOL(_small_cnn(1), image_size=8, hidden_layer=-1, projection_size=8, projection_hidden_size=16,
                   mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="mean has 3 values but x has 1 channels"):
        learner(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="same length"):
        BYOL(_small_cnn(4), image_size=8, hidden_layer=-1, projection_size=8, projection_hidden_size=16,
             mean=(0.5,) * 4, std=(0.25,))
    # mean and std given explicitly with the right length are used as given
    learner = BYOL(_small_cnn(1), image_size=8, hidden_layer=-1, projection_size=8, projection_hidden_size=16, mean=(0.1,), std=(0.3,))
    assert learner.augment1.mean == (0.1,) and learner.augment1.std == (0.3,)


# ------------------------------------------------------------------------------------------ bit depth


@pytest.mark.skipif(UINT16 is None, reason="torch.uint16 needs torch >= 2.3")
def test_uint16_and_int16_are_scaled_by_their_range() -> None:
    u16 = torch.tensor([0, 13107, 65535], dtype=torch.int32).to(UINT16).view(1, 1, 1, 3)
    torch.testing.assert_close(to_float_image(u16), torch.tensor([0.0, 0.2, 1.0]).view(1, 1, 1, 3))
    i16 = torch.tensor([-32768, 0, 32767], dtype=torch.int16).view(1, 1, 1, 3)
    torch.testing.assert_close(to_float_image(i16), torch.tensor([0.0, 32768 / 65535, 1.0]).view(1, 1, 1, 3))
    # the learner and the views take them like uint8
    x = torch.randint(0, 65536, (4, 1, 12, 12), dtype=torch.int32)
    view = only(12)
    torch.testing.assert_close(view(x.to(UINT16)), x.float() / 65535, atol=1e-5, rtol=0)
    learner = BYOL(_small_cnn(1), image_size=8, hidden_layer=-1, projection_size=8, projection_hidden_size=16)
    assert torch.isfinite(learner(x.to(UINT16))) and torch.isfinite(learner((x - 32768).to(torch.int16)))


# ------------------------------------------------------------------------------------------ statistics, 1 and 4 channels


@pytest.mark.parametrize("channels", [1, 4])
def test_flip_rate_and_mirror_for_non_rgb(channels: int) -> None:
    x = torch.rand(1, channels, 4, 4).expand(2000, -1, -1, -1)
    out = only(4, flip_p=0.5)(x)
    same = (out - x).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (out - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((same ^ mirrored).all()) and abs(mirrored.float().mean().item() - 0.5) < 0.05


@pytest.mark.parametrize("channels", [1, 4])
def test_solarize_rates_for_non_rgb(channels: int) -> None:
    x = torch.full((2000, channels, 4, 4), 0.75)
    view1, view2 = byol_views(4, mean=None, std=None, jitter_p=0.0)
    assert abs((view2(x).mean(dim=(1, 2, 3)) < 0.5).float().mean().item() - 0.2) < 0.04
    assert (view1(x).mean(dim=(1, 2, 3)) < 0.5).float().mean().item() == 0.0


@pytest.mark.parametrize("channels", [1, 4])
def test_jitter_rate_and_brightness_range_for_non_rgb(channels: int) -> None:
    x = torch.full((2000, channels, 4, 4), 0.5)
    out = only(4, jitter_p=0.8, jitter=(0.4, 0.0, 0.0, 0.0))(x)
    changed = (out - x).abs().amax(dim=(1, 2, 3)) > 1e-6
    assert abs(changed.float().mean().item() - 0.8) < 0.04
    factor = out[changed].mean(dim=(1, 2, 3)) / 0.5
    assert factor.min() >= 0.6 - 1e-5 and factor.max() <= 1.4 + 1e-5 and factor.min() < 0.65 and factor.max() > 1.35
    # every channel of a sample gets the same factor
    assert bool(((out - out[:, :1]).abs() < 1e-6).all())


@pytest.mark.parametrize("channels", [1, 4])
def test_blur_rate_for_non_rgb(channels: int) -> None:
    checker = (torch.arange(8).view(1, 8) + torch.arange(8).view(8, 1)) % 2
    x = checker.float().expand(1000, channels, 8, 8)
    out = only(8, blur_p=0.1, blur_sigma=(1.0, 2.0))(x)
    blurred = (out - x).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert abs(blurred.float().mean().item() - 0.1) < 0.03


@pytest.mark.parametrize("channels", [1, 4])
def test_crop_zooms_in_for_non_rgb(channels: int) -> None:
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(500, channels, 32, 32)
    out = only(16, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3))(ramp)
    span = out[:, 0, 8, -1] - out[:, 0, 8, 0]
    assert span.min() < 0.5 and span.max() > 0.85  # crops of different widths, on every channel alike
    assert bool(((out - out[:, :1]).abs() < 1e-6).all())


def test_full_recipe_on_four_channels_keeps_channels_distinct() -> None:
    # no op mixes channels for C != 3 (grayscale and hue are skipped): a 4-channel image keeps 4 distinct planes
    x = torch.arange(4.0).div(4).add(0.1).view(1, 4, 1, 1).expand(64, 4, 8, 8)
    for view in byol_views(8, mean=None, std=None, blur_p=1.0, solarize_p=0.0):
        out = view(x)
        assert bool((out[:, 1:].mean(dim=(2, 3)) > out[:, :-1].mean(dim=(2, 3))).all())


# ------------------------------------------------------------------------------------------ first convolution


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_adapt_first_conv_follows_timms_rule(channels: int) -> None:
    timm = pytest.importorskip("timm")
    from timm.models import adapt_input_conv

    net = torchvision.models.resnet18()
    old = net.conv1.weight.detach().clone()
    adapt_first_conv(net, channels)
    assert net.conv1.in_channels == channels and net.conv1.stride == (2, 2) and net.conv1.padding == (3, 3)
    torch.testing.assert_close(net.conv1.weight.detach(), adapt_input_conv(channels, old))
    assert net.eval()(torch.rand(1, channels, 32, 32)).shape == (1, 1000)
    assert timm  # noqa: S101


def test_build_backbone_channels() -> None:
    assert build_backbone("resnet18", channels=1, cifar_stem=True).conv1.in_channels == 1
    assert build_backbone("shufflenet_v2_x0_5", channels=4).conv1[0].in_channels == 4
    pytest.importorskip("timm")
    assert build_backbone("timm:resnet18", channels=5, num_classes=0).conv1.in_channels == 5


# ------------------------------------------------------------------------------------------ decoding


def _png16(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array.astype(np.uint16)).save(path)  # mode I;16: a 16-bit grayscale PNG


def test_sixteen_bit_png_keeps_full_precision_and_one_channel(tmp_path: Path) -> None:
    values = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 7 + 1  # distinct values, none a multiple of 257
    _png16(tmp_path / "a.png", values)
    image = load_image(tmp_path / "a.png", 16, 1)
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    torch.testing.assert_close(image[0], torch.from_numpy(values.astype(np.float32) / 65535), atol=1e-7, rtol=0)
    assert len(torch.unique(image)) == 256  # 8-bit decoding would merge them into a few levels


def test_multichannel_tiff_and_npy(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    planes = rng.integers(0, 65536, (4, 12, 20), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "pages.tif", planes, photometric="minisblack")  # one page per channel
    tifffile.imwrite(tmp_path / "samples.tif", np.moveaxis(planes, 0, -1), photometric="minisblack", planarconfig="contig")
    np.save(tmp_path / "chw.npy", planes)
    np.save(tmp_path / "hwc.npy", np.moveaxis(planes, 0, -1).astype(np.float32) / 65535)
    expected = torch.from_numpy(planes.astype(np.float32) / 65535)[:, :, 4:16]  # the central 12x12 crop
    for name in ("pages.tif", "samples.tif", "chw.npy", "hwc.npy"):
        torch.testing.assert_close(load_image(tmp_path / name, 12, 4), expected, atol=1e-6, rtol=0, msg=name)


def test_mixed_channel_counts_convert_with_a_warning_or_skip_naming_the_file(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "rgb.png")
    Image.new("L", (8, 8), 128).save(tmp_path / "gray.png")
    np.save(tmp_path / "five.npy", np.zeros((5, 8, 8), np.uint8))
    with pytest.warns(RuntimeWarning, match="rgb.png.*3 channel.*grayscale"):
        gray = load_image(tmp_path / "rgb.png", 8, 1)
    torch.testing.assert_close(gray, torch.full((1, 8, 8), 0.299))
    with pytest.warns(RuntimeWarning, match="gray.png.*copied"):
        assert load_image(tmp_path / "gray.png", 8, 3).shape == (3, 8, 8)
    with pytest.raises(ChannelMismatchError, match="five.npy' has 5 channels"):
        load_image(tmp_path / "five.npy", 8, 3)
    ds = ImageFolderDataset(tmp_path, 8, channels=3)
    assert len(ds) == 3  # .npy files are scanned when channels is set
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, _, skipped = collate_skip_none([ds[i] for i in range(len(ds))])
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32 and skipped == 1
    assert any("skipping unreadable image" in str(w.message) and "five.npy" in str(w.message) for w in caught)
    assert len(ImageFolderDataset(tmp_path, 8)) == 2  # the default 8-bit RGB path ignores .npy


# ------------------------------------------------------------------------------------------ byol-train


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), "--image-size", "16", "--batch-size", "4",
        "--projection-size", "16", "--projection-hidden-size", "32", "--workers", "0", "--device", "cpu",
        "--no-progress", "--log-every", "1", "--optimizer", "lars", "--lr", "0.1", *extra,
    ]


def _gray16_folder(root: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n // 2):
                _png16(root / split / c / f"{i}.png", rng.integers(0, 65536, (20, 20)))
    return root


@pytest.mark.parametrize(
    "backbone",
    [
        ["--backbone", "resnet18", "--cifar-stem", "--backbone-kwargs", '{"num_classes": 2}'],
        ["--backbone", "timm:resnet18", "--backbone-kwargs", '{"num_classes": 0}', "--hidden-layer", "-1"],
    ],
    ids=["torchvision", "timm"],
)
def test_cli_trains_on_16_bit_grayscale_pngs_resumes_and_exports_a_one_channel_backbone(
    tmp_path: Path, backbone: list[str]
) -> None:
    if backbone[1].startswith("timm:"):
        pytest.importorskip("timm")
    data = _gray16_folder(tmp_path / "data")
    out = tmp_path / "run"
    argv = _args(data / "train", out, *backbone, "--channels", "1", "--eval-data", str(data), "--knn-k", "3", "--eval-every", "2")
    assert main([*argv, "--max-steps", "2"]) == 0
    assert json.loads((out / "config.json").read_text())["channels"] == 1
    assert main([*argv, "--max-steps", "4"]) == 0  # resumes from last.pt
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4]
    assert any(r["event"] == "eval" for r in records)  # the kNN monitor ran on the 1-channel folders
    state = torch.load(out / "backbone.pt", weights_only=True)
    assert state["conv1.weight"].shape[1] == 1
    net = build_backbone(backbone[1], channels=1, cifar_stem="--cifar-stem" in backbone, **json.loads(backbone[backbone.index("--backbone-kwargs") + 1]))
    net.load_state_dict(state)
    # resuming with another channel count is refused (exit 2)
    assert main([*_args(data / "train", out, *backbone, "--channels", "3"), "--max-steps", "6"]) == 2
    if backbone[1] == "resnet18":  # examples/finetune.py takes the 1-channel ResNet-18 and the 16-bit folders
        finetune = _import_example("finetune")
        for mode in ("finetune", "linear"):
            results = finetune.main(["--backbone", str(out / "backbone.pt"), "--data", str(data), "--channels", "1",
                                     "--mode", mode, "--epochs", "1", "--batch-size", "4", "--image-size", "16",
                                     "--threads", "1", "--device", "cpu"])
            assert 0.0 <= results["test_top1"] <= 1.0
        with pytest.raises(SystemExit, match="takes 1 input channels but --channels is 3"):
            finetune.main(["--backbone", str(out / "backbone.pt"), "--data", str(data), "--channels", "3", "--epochs", "1"])


def _import_example(name: str):
    import importlib
    import sys

    examples = str(Path(__file__).resolve().parents[1] / "examples")
    sys.path.insert(0, examples)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(examples)


@pytest.mark.parametrize("kind", ["tiff", "npy"])
def test_cli_trains_on_four_channel_files_resumes_and_exports_a_four_channel_backbone(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(2)
    data = tmp_path / "data"
    data.mkdir()
    if kind == "tiff":
        tifffile = pytest.importorskip("tifffile")
    for i in range(8):
        planes = rng.integers(0, 65536, (4, 20, 20), dtype=np.uint16)
        if kind == "tiff":
            tifffile.imwrite(data / f"{i}.tif", planes, photometric="minisblack")
        else:
            np.save(data / f"{i}.npy", planes)
    out = tmp_path / "run"
    argv = _args(data, out, "--backbone", "shufflenet_v2_x0_5", "--backbone-kwargs", '{"num_classes": 2}', "--channels", "4")
    assert main([*argv, "--max-steps", "2"]) == 0
    assert main([*argv, "--max-steps", "3"]) == 0
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 3
    state = torch.load(out / "backbone.pt", weights_only=True)
    assert state["conv1.0.weight"].shape[1] == 4
    build_backbone("shufflenet_v2_x0_5", channels=4, num_classes=2).load_state_dict(state)


def test_cli_mixed_channel_folder_never_crashes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        _png16(data / f"{i}.png", np.full((20, 20), 1000 * i))
    Image.new("RGB", (20, 20), (10, 20, 30)).save(data / "colour.png")  # converted to 1 channel with a warning
    np.save(data / "stack.npy", np.zeros((5, 20, 20), np.uint8))  # refused (skipped) with the file named
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main([*_args(data, tmp_path / "run", "--backbone", "shufflenet_v2_x0_5", "--channels", "1",
                          "--backbone-kwargs", '{"num_classes": 2}'), "--max-steps", "2"])
    assert rc == 0
    messages = [str(w.message) for w in caught]
    assert any("colour.png" in m and "grayscale" in m for m in messages)
    assert any("stack.npy" in m and "5 channels" in m for m in messages)
