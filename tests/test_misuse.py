"""Silent misuse of the learner gets one warning or an error that shows the fix (issue 15, item 5).

- training forwards that go on without ``update_moving_average()`` while the target is in use: one warning (that
  the counter leaves torch.compile's single graph alone is checked in test_precision_compile.py);
- ``x`` given as a PIL image or a NumPy array (or a list of them): a ``TypeError`` with the conversion, whose
  code is run here to check that it gives a batch the learner takes;
- a batch whose channel count is not the learner's: the error names ``channels=`` and the backbone's first
  convolution, with the fix.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from byol_wrapper import BYOL
from byol_wrapper.augmentations import byol_views, to_float_image

from .conftest import SMALL_HEADS, TinyCNN

MISSING_UPDATE = "without learner.update_moving_average"


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def cheap_learner(**kwargs) -> BYOL:
    """A learner whose forward costs well under a millisecond (custom identity views, a 4-filter CNN)."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    kwargs.setdefault("augment_fn", identity)
    return BYOL(net, 4, hidden_layer=-1, projection_size=4, projection_hidden_size=8, **kwargs)


def missing_update_warnings(record: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in record if MISSING_UPDATE in str(w.message)]


def run_forwards(learner: nn.Module, n: int, x: torch.Tensor | None = None, **kwargs) -> list[warnings.WarningMessage]:
    """``n`` forwards, recording every warning (each time, not once per location)."""
    x = torch.rand(2, 3, 4, 4) if x is None else x
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(n):
            learner(x, **kwargs)
    return record


# ---------------------------------------------------------------------------------------------- (a) EMA updates
def test_forgotten_update_warns_once_at_the_documented_count() -> None:
    learner = cheap_learner()
    assert BYOL.max_forwards_without_update == 256  # the documented number (README, forward's docstring)
    assert not missing_update_warnings(run_forwards(learner, 256))
    record = missing_update_warnings(run_forwards(learner, 1))
    assert len(record) == 1
    message = str(record[0].message)
    assert "more than 256 training forwards" in message and "still the copy made at construction" in message
    assert "after each optimizer.step()" in message and "max_forwards_without_update" in message
    assert record[0].filename == __file__  # points at the user's learner(x) line
    assert not missing_update_warnings(run_forwards(learner, 50))  # once per learner


def test_forgotten_update_warns_with_the_builtin_views_too(tiny_cnn) -> None:
    learner = BYOL(tiny_cnn, 8, hidden_layer="pool", **SMALL_HEADS)
    learner.max_forwards_without_update = 2
    record = missing_update_warnings(run_forwards(learner, 3, torch.rand(2, 3, 8, 8)))
    assert len(record) == 1 and "more than 2 training forwards" in str(record[0].message)


@pytest.mark.parametrize("micro_batches", [4, 256])
def test_gradient_accumulation_does_not_warn(micro_batches: int) -> None:
    learner = cheap_learner()
    opt = torch.optim.SGD(learner.parameters(), lr=0.01)
    x = torch.rand(2, 3, 4, 4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(max(2, 300 // micro_batches)):  # past the threshold in all
            for _ in range(micro_batches):
                (learner(x) / micro_batches).backward()
            opt.step()
            opt.zero_grad()
            learner.update_moving_average()
    assert not missing_update_warnings(record)


def test_updates_that_stop_warn_naming_the_last_update() -> None:
    learner = cheap_learner()
    learner.max_forwards_without_update = 10
    for _ in range(4):
        assert not missing_update_warnings(run_forwards(learner, 10))
        learner.update_moving_average()
    record = missing_update_warnings(run_forwards(learner, 11))
    assert len(record) == 1 and "has not moved since update 4" in str(record[0].message)


def test_no_warning_without_a_target_or_outside_training() -> None:
    simsiam = cheap_learner(use_momentum=False)
    simsiam.max_forwards_without_update = 2
    assert not missing_update_warnings(run_forwards(simsiam, 20))  # use_momentum=False: no target to update
    learner = cheap_learner()
    learner.max_forwards_without_update = 2
    with torch.no_grad():  # e.g. a validation loss in training mode: no optimizer step can follow
        assert not missing_update_warnings(run_forwards(learner, 20))
    assert not missing_update_warnings(run_forwards(learner, 20, return_embedding=True))
    learner.eval()
    assert not missing_update_warnings(run_forwards(learner, 20))
    assert not missing_update_warnings(run_forwards(learner, 20, return_embedding=True))
    learner.train()
    assert len(missing_update_warnings(run_forwards(learner, 3))) == 1  # none of the above was counted


def test_warning_can_be_turned_off() -> None:
    learner = cheap_learner()
    learner.max_forwards_without_update = None
    assert not missing_update_warnings(run_forwards(learner, 260))


# ---------------------------------------------------------------------------------------------- (b) PIL / NumPy
def _conversion(message: str) -> str:
    """The code after "convert with" in an error message (up to the note in parentheses, or the end)."""
    note = r" \((?:uint8|channels first)(?:[^()]|\([^()]*\))*\)"  # "(uint8 (1, C, H, W))", "(channels first, ...)"
    match = re.search(rf"convert with (.+?)(?:{note})?(?:;|, or give|$)", message)
    assert match, message
    return match.group(1)


def _apply(code: str, given) -> torch.Tensor:
    names = {"torch": torch, "torchvision": torchvision, "np": np}
    names.update(img=given, arr=given, images=given, arrays=given)
    return eval(code, names)  # noqa: S307 - the conversion the error message shows


def _rgb_image(size: int = 8) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _embedding_learner(channels: int = 3) -> BYOL:
    return BYOL(TinyCNN(channels), 8, hidden_layer="pool", **SMALL_HEADS)


@pytest.mark.parametrize("return_embedding", [False, True])
def test_pil_image_gets_the_conversion(return_embedding: bool) -> None:
    learner = _embedding_learner()
    img = _rgb_image()
    with pytest.raises(TypeError, match=re.escape("torchvision.transforms.functional.pil_to_tensor(img).unsqueeze(0)")):
        learner(img, return_embedding=return_embedding)
    with pytest.raises(TypeError) as info:
        learner(img, return_embedding=return_embedding)
    x = _apply(_conversion(str(info.value)), img)
    assert x.shape == (1, 3, 8, 8) and x.dtype == torch.uint8
    assert learner.eval()(x, return_embedding=True)[1].shape == (1, 16)


def test_list_of_pil_images_and_a_grayscale_image_into_rgb() -> None:
    learner = _embedding_learner()
    images = [_rgb_image(), _rgb_image()]
    with pytest.raises(TypeError, match="list of 2 PIL images") as info:
        learner(images)
    x = _apply(_conversion(str(info.value)), images)
    assert x.shape == (2, 3, 8, 8) and learner(x).ndim == 0  # the loss of the converted batch
    gray = _rgb_image().convert("L")
    with pytest.raises(TypeError, match=re.escape('pil_to_tensor(img.convert("RGB"))')) as info:
        learner(gray, return_embedding=True)
    assert _apply(_conversion(str(info.value)), gray).shape == (1, 3, 8, 8)


@pytest.mark.parametrize(
    "array, channels, shape",
    [
        (np.zeros((8, 8, 3), np.uint8), 3, (1, 3, 8, 8)),  # one HWC image (PIL/OpenCV/imageio layout)
        (np.zeros((4, 8, 8, 3), np.uint8), 3, (4, 3, 8, 8)),  # a batch, channels last
        (np.zeros((4, 3, 8, 8), np.float32), 3, (4, 3, 8, 8)),  # a batch, channels first
        (np.zeros((3, 8, 8), np.float64), 3, (1, 3, 8, 8)),  # one CHW image
        (np.zeros((8, 8), np.uint16), 1, (1, 1, 8, 8)),  # one 16-bit grayscale image
        (np.zeros((5, 8, 8), np.uint16), 1, (5, 1, 8, 8)),  # a batch of grayscale images
        (np.zeros((8, 8, 3), np.uint8)[:, ::-1], 3, (1, 3, 8, 8)),  # a flipped view (negative strides)
    ],
)
@pytest.mark.parametrize("return_embedding", [False, True])
def test_numpy_array_gets_the_conversion(array: np.ndarray, channels: int, shape, return_embedding: bool) -> None:
    learner = _embedding_learner(channels)
    with pytest.raises(TypeError, match=r"NumPy array \(shape .*torch\.from_numpy\(") as info:
        learner(array, return_embedding=return_embedding)
    x = _apply(_conversion(str(info.value)), array)
    assert x.shape == shape
    assert learner.eval()(x, return_embedding=True)[1].shape == (shape[0], 16)


def test_list_of_numpy_arrays_and_the_channels_first_hint() -> None:
    learner = _embedding_learner()
    arrays = [np.zeros((8, 8, 3), np.uint8)] * 3
    with pytest.raises(TypeError, match=re.escape("torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)")) as info:
        learner(arrays)
    assert _apply(_conversion(str(info.value)), arrays).shape == (3, 3, 8, 8)
    with pytest.raises(TypeError, match="then make the dtype uint8, uint16 or float"):
        learner(np.zeros((2, 3, 8, 8), np.int64))


def test_views_and_to_float_image_give_the_conversion_too() -> None:
    view, _ = byol_views(8)
    with pytest.raises(TypeError, match=re.escape("torch.from_numpy(arr).permute(0, 3, 1, 2)")):
        view(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(TypeError, match="pil_to_tensor"):
        to_float_image(_rgb_image())
    with pytest.raises(TypeError, match=re.escape("torch.stack(x)")):
        to_float_image([torch.rand(3, 8, 8)] * 2)


# ---------------------------------------------------------------------------------------------- (c) channels
@pytest.mark.parametrize("return_embedding", [False, True])
def test_grayscale_batch_into_an_rgb_learner_names_channels_and_the_first_conv(return_embedding: bool) -> None:
    net = torchvision.models.resnet18(num_classes=4)
    learner = BYOL(net, 16, hidden_layer="avgpool", **SMALL_HEADS)
    x = torch.rand(2, 1, 16, 16)
    with pytest.raises(ValueError) as info:
        learner(x, return_embedding=return_embedding)
    message = str(info.value)
    assert "channels=3" in message and "first convolution 'conv1' (nn.Conv2d, in_channels=3)" in message
    assert "got 1 channel, shape (2, 1, 16, 16)" in message
    assert "x.expand(-1, 3, -1, -1)" in message and "adapt_first_conv(net, 1)" in message
    assert learner(x.expand(-1, 3, -1, -1), return_embedding=return_embedding) is not None  # the fix works


def test_rgb_batch_into_a_grayscale_learner() -> None:
    learner = BYOL(TinyCNN(channels=1), 8, hidden_layer="pool", **SMALL_HEADS)
    with pytest.raises(ValueError, match=r"channels=1, read from the backbone's first convolution 'features\.0' "
                       r"\(nn\.Conv2d, in_channels=1\); got 3 channels.*kornia\.color\.rgb_to_grayscale\(x\)"):
        learner(torch.rand(2, 3, 8, 8))


def test_channels_last_batch_keeps_its_hint() -> None:
    learner = BYOL(TinyCNN(), 8, hidden_layer="pool", **SMALL_HEADS)
    with pytest.raises(ValueError, match=r"channels=3.*'features\.0'.*channels-last.*x\.permute\(0, 3, 1, 2\)"):
        learner(torch.rand(2, 8, 8, 3))


def test_channel_mismatch_without_a_convolution_and_with_an_explicit_channels() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 8))
    learner = BYOL(mlp, 8, hidden_layer=-1, **SMALL_HEADS)
    with pytest.raises(ValueError, match=r"channels=3 \(the channels= given to BYOL.*pass channels=1 to BYOL"):
        learner(torch.rand(2, 1, 8, 8))
    # channels= given against the first convolution (hidden_dim= skips the probe that would fail on it)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    learner = BYOL(conv, 8, hidden_layer=-1, channels=4, hidden_dim=4, **SMALL_HEADS)
    with pytest.raises(ValueError, match=r"channels=4 as given to BYOL, while the backbone's first convolution is "
                       r"'0' \(nn\.Conv2d, in_channels=3\); got 3 channels.*without channels= \(or with channels=3\)"):
        learner(torch.rand(2, 3, 8, 8))
