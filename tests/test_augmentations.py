"""Tests for byol_wrapper.augmentations: BYOL's two per-sample augmentation views (CPU, tiny images)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from kornia.color import rgb_to_hsv
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
)

from byol_wrapper import augmentations as aug
from byol_wrapper.augmentations import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BYOLView,
    blur_kernel_size,
    byol_views,
    to_float_image,
)
from byol_wrapper.augmentations import views as views_module
from byol_wrapper.augmentations.geometric import crop_boxes
from byol_wrapper.augmentations.intensity import color_jitter, hue, jitter_positions
from byol_wrapper.augmentations.params import ViewParams

# every op off, and a crop that is the whole (square) input: the view is the identity unless re-enabled
_OFF = dict(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip_p=0.0,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
    solarize_p=0.0,
    mean=None,
    std=None,
)


def only(image_size: int | tuple[int, int] = 8, **enabled) -> BYOLView:
    """A view with every op disabled except those in ``enabled``."""
    return BYOLView(image_size, **{**_OFF, **enabled})


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("image_size, expected", [(16, (16, 16)), ((12, 20), (12, 20))])
@pytest.mark.parametrize("in_hw", [(32, 32), (8, 8), (24, 40)])
def test_output_shape_and_dtype(image_size, expected, in_hw) -> None:
    x = torch.rand(5, 3, *in_hw)
    for view in byol_views(image_size):
        out = view(x)
        assert out.shape == (5, 3, *expected)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_output_in_unit_range_without_normalization() -> None:
    for view in byol_views(12, mean=None, std=None):
        out = view(torch.rand(32, 3, 20, 20))
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_normalization_is_applied_after_clamp() -> None:
    x = torch.rand(8, 3, 16, 16)
    torch.manual_seed(0)
    raw = BYOLView(12, mean=None, std=None)(x)
    torch.manual_seed(0)
    normed = BYOLView(12)(x)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normed, (raw - mean) / std)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_identity_when_every_op_is_off(interpolation) -> None:
    x = torch.rand(4, 3, 8, 8)
    out = only(8, interpolation=interpolation)(x)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_non_square_identity_crop() -> None:
    x = torch.rand(3, 3, 6, 10)
    out = only((6, 10), crop_ratio=(10 / 6, 10 / 6))(x)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_empty_batch() -> None:
    out = BYOLView(8)(torch.rand(0, 3, 16, 16))
    assert out.shape == (0, 3, 8, 8) and out.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- input handling


def test_to_float_image() -> None:
    u8 = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    torch.testing.assert_close(to_float_image(u8), torch.tensor([0.0, 0.2, 1.0]).view(1, 1, 1, 3))
    f32 = torch.rand(1, 3, 2, 2)
    assert to_float_image(f32) is f32
    assert to_float_image(f32.double()).dtype == torch.float32
    assert to_float_image(f32.half()).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.int8])
def test_to_float_image_rejects_other_dtypes(dtype) -> None:
    with pytest.raises(TypeError, match="uint8"):
        to_float_image(torch.zeros(1, 3, 2, 2, dtype=dtype))


def test_to_float_image_rejects_non_tensors_and_wrong_rank() -> None:
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        to_float_image([[0.5]])
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor of shape \(B, C, H, W\).*unsqueeze"):
        to_float_image(torch.rand(3, 8, 8))


def test_forward_rejects_bad_input() -> None:
    view = BYOLView(8)
    with pytest.raises(TypeError):
        view(torch.rand(2, 3, 8, 8).numpy())
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        view(torch.rand(3, 8, 8))
    with pytest.raises(TypeError):
        view(torch.zeros(2, 3, 8, 8, dtype=torch.int64))


def test_uint8_input_equals_float_input_divided_by_255() -> None:
    x = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8)
    for view in byol_views(8):
        torch.manual_seed(7)
        from_u8 = view(x)
        torch.manual_seed(7)
        from_float = view(x.float() / 255)
        torch.testing.assert_close(from_u8, from_float, atol=1e-6, rtol=0)


def test_output_never_requires_grad() -> None:
    x = torch.rand(4, 3, 10, 10, requires_grad=True)
    with torch.enable_grad():
        for view in byol_views(8):
            out = view(x)
            assert not out.requires_grad and out.grad_fn is None


def test_autocast_is_disabled_and_output_is_float32() -> None:
    x = torch.rand(6, 3, 12, 12)
    view = BYOLView(8)
    torch.manual_seed(3)
    plain = view(x)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = view(x)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain)
    assert view(x.to(torch.bfloat16)).dtype == torch.float32


def test_reproducible_with_manual_seed() -> None:
    x = torch.rand(8, 3, 16, 16)
    v1, v2 = byol_views(12)
    torch.manual_seed(42)
    a = (v1(x), v2(x))
    torch.manual_seed(42)
    b = (v1(x), v2(x))
    torch.manual_seed(43)
    c = v1(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_cpu_slices_give_the_same_views_as_the_whole_batch(monkeypatch, dtype) -> None:
    # On the CPU a view transforms the batch in slices (faster with glibc's malloc); the result must not change.
    x = torch.randint(0, 256, (10, 3, 12, 12), dtype=torch.uint8)
    x = x if dtype == torch.uint8 else (x / 255).to(dtype)
    for view in byol_views(8, solarize_p=0.5, blur_p=0.5):
        torch.manual_seed(11)
        whole = view(x)
        monkeypatch.setattr(views_module, "_CPU_CHUNK_VALUES", 3 * 3 * 8 * 8)  # slices of 3, 3, 3 and 1 samples
        torch.manual_seed(11)
        sliced = view(x)
        after = torch.rand(1)
        monkeypatch.undo()
        torch.manual_seed(11)
        view(x)
        assert torch.equal(sliced, whole)
        assert torch.equal(after, torch.rand(1))  # the same random numbers were consumed
        assert sliced.is_contiguous() and sliced.dtype == torch.float32


def test_default_cpu_slicing_at_224_px_matches_one_slice(monkeypatch) -> None:
    x = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8)
    view = byol_views(224)[1]
    assert views_module._cpu_chunk(x, 3 * 224 * 224) < x.shape[0]  # the default does slice a 224 px batch of 8
    torch.manual_seed(5)
    sliced = view(x)
    monkeypatch.setattr(views_module, "_CPU_CHUNK_VALUES", 1 << 40)
    torch.manual_seed(5)
    assert torch.equal(view(x), sliced)


# ---------------------------------------------------------------------------------------------- per-sample draws


def test_identical_images_get_different_views() -> None:
    x = torch.rand(1, 3, 16, 16).expand(16, -1, -1, -1)
    for view in byol_views(12):
        out = view(x).flatten(1)
        distance = torch.cdist(out, out)
        off_diagonal = distance[~torch.eye(16, dtype=torch.bool)]
        assert (off_diagonal > 1e-3).all()


def test_solarize_rate_view2_about_0_2_and_never_in_view1() -> None:
    # a constant 0.75 image stays 0.75 through crop, grayscale and blur; solarized it becomes 0.25
    x = torch.full((2000, 3, 4, 4), 0.75)
    view1, view2 = byol_views(4, mean=None, std=None, jitter_p=0.0)
    rate2 = (view2(x).mean(dim=(1, 2, 3)) < 0.5).float().mean().item()
    rate1 = (view1(x).mean(dim=(1, 2, 3)) < 0.5).float().mean().item()
    assert abs(rate2 - 0.2) < 0.04
    assert rate1 == 0.0


def test_solarize_threshold_is_exactly_one_half() -> None:
    values = torch.tensor([0.0, 0.25, 0.49, 0.5, 0.51, 0.75, 1.0])
    x = values.repeat(3, 7, 1).unsqueeze(0)  # (1, 3, 7, 7): every row is `values`
    out = only(7, solarize_p=1.0)(x)
    expected = torch.where(x >= 0.5, 1 - x, x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_grayscale_rate_about_0_2() -> None:
    x = torch.rand(1, 3, 4, 4).expand(2000, -1, -1, -1)
    out = only(4, grayscale_p=0.2)(x)
    gray = ((out[:, 0] - out[:, 1]).abs().amax(dim=(1, 2)) < 1e-6) & (
        (out[:, 1] - out[:, 2]).abs().amax(dim=(1, 2)) < 1e-6
    )
    assert abs(gray.float().mean().item() - 0.2) < 0.04
    torch.testing.assert_close(out[~gray], x[~gray], atol=1e-5, rtol=0)


def test_flip_rate_about_0_5_and_flip_is_a_mirror() -> None:
    x = torch.rand(1, 3, 4, 4).expand(2000, -1, -1, -1)
    out = only(4, flip_p=0.5)(x)
    same = (out - x).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (out - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((same ^ mirrored).all())
    assert abs(mirrored.float().mean().item() - 0.5) < 0.05


def test_crop_boxes_follow_torchvision_rule() -> None:
    params = ViewParams.draw(4000, torch.device("cpu"))
    top, left, h, w = crop_boxes(params, 30, 40, (0.08, 1.0), (3 / 4, 4 / 3))
    assert bool(((top >= 0) & (left >= 0) & (top + h <= 30) & (left + w <= 40)).all())
    assert torch.equal(top, top.round()) and torch.equal(w, w.round())
    area = h * w / (30 * 40)
    assert area.min() >= 0.06 and area.max() <= 1.0
    assert abs(area.mean().item() - 0.445) < 0.02  # torchvision's RandomResizedCrop gives ~0.445 here
    # no trial fits a 10x100 image at scale >= 0.9 with ratio <= 4/3: central crop, ratio clamped to 4/3
    top, left, h, w = crop_boxes(ViewParams.draw(3, torch.device("cpu")), 10, 100, (0.9, 1.0), (3 / 4, 4 / 3))
    assert h.tolist() == [10, 10, 10] and w.tolist() == [13, 13, 13] and left.tolist() == [43, 43, 43]


def test_random_resized_crop_zooms_in() -> None:
    # a smaller crop_scale shows a smaller part of the image: fewer distinct source pixels survive
    x = torch.arange(64.0).view(1, 1, 8, 8).expand(200, 3, -1, -1) / 64
    small = only(8, crop_scale=(0.1, 0.1), interpolation="bilinear")(x)
    assert (small.amax(dim=(1, 2, 3)) - small.amin(dim=(1, 2, 3))).max() < 0.6


# ---------------------------------------------------------------------------------------------- colour jitter


def _reference_jitter(image: torch.Tensor, order, factors) -> torch.Tensor:
    fns = (
        adjust_brightness_accumulative,
        adjust_contrast_with_mean_subtraction,
        adjust_saturation_with_gray_subtraction,
        lambda im, f: adjust_hue(im, f * 2 * math.pi),
    )
    for op in order:
        image = fns[op](image, factors[op])
    return image


def test_color_jitter_applies_each_samples_own_order_like_kornia_sequential() -> None:
    perms = list(itertools.permutations(range(4)))
    batch = 2 * len(perms)
    x = torch.rand(batch, 3, 6, 6)
    keys = torch.empty(batch, 4)
    for b in range(batch):  # keys whose argsort is the b-th permutation
        for position, op in enumerate(perms[b % 24]):
            keys[b, op] = (position + 0.5) / 4
    factors = [
        torch.empty(batch).uniform_(0.6, 1.4),
        torch.empty(batch).uniform_(0.6, 1.4),
        torch.empty(batch).uniform_(0.8, 1.2),
        torch.empty(batch).uniform_(-0.1, 0.1),
    ]
    apply = torch.arange(batch) % 5 != 0
    ops = [0, 1, 2, 3]
    positions = jitter_positions(keys, ops)
    assert torch.equal(positions.argsort(dim=1), keys.argsort(dim=1))
    out = color_jitter(x, apply, ops, factors, positions)
    for b in range(batch):
        if not apply[b]:
            assert torch.equal(out[b], x[b])  # untouched bit for bit
            continue
        expected = _reference_jitter(x[b : b + 1], perms[b % 24], [f[b : b + 1] for f in factors])
        torch.testing.assert_close(out[b : b + 1], expected, atol=1e-5, rtol=0)


def test_color_jitter_order_changes_the_result() -> None:
    image = torch.rand(1, 3, 6, 6).expand(2, -1, -1, -1)
    keys = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])  # forward vs reversed order
    factors = [torch.full((2,), 1.4), torch.full((2,), 0.6), torch.full((2,), 1.2), torch.full((2,), 0.1)]
    ops = [0, 1, 2, 3]
    out = color_jitter(image, None, ops, factors, jitter_positions(keys, ops))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_views_draw_every_order_of_the_four_ops() -> None:
    keys = BYOLView(8)._sample(1000, torch.device("cpu")).order
    positions = jitter_positions(keys, [0, 1, 2, 3])
    assert len({tuple(p) for p in positions.tolist()}) == 24
    # a subset keeps the relative order of the full permutation
    sub = jitter_positions(keys, [0, 1])
    assert torch.equal(sub[:, 0] < sub[:, 1], positions[:, 0] < positions[:, 1])


def test_brightness_factor_range_is_torchvision_0_6_to_1_4() -> None:
    x = torch.full((2000, 3, 4, 4), 0.5)
    out = only(4, jitter_p=1.0, jitter=(0.4, 0.0, 0.0, 0.0))(x)
    factor = out.mean(dim=(1, 2, 3)) / 0.5
    assert factor.min() >= 0.6 - 1e-5 and factor.max() <= 1.4 + 1e-5
    assert factor.min() < 0.62 and factor.max() > 1.38


def test_hue_matches_kornia_adjust_hue_including_edge_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 9, 9, generator=g)
    x[0] = 0.0  # black
    x[1] = 1.0  # white
    x[2] = 0.37  # gray: hue undefined, must stay gray
    x[3, :, :4] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # pure primaries and secondaries
    x[3, :, 4:] = torch.tensor([0.0, 1.0, 1.0]).view(3, 1, 1)
    x[4, 0], x[4, 1], x[4, 2] = 0.5, 0.5, 0.2  # ties between the maximal channels
    x[5, 1], x[5, 2] = x[5, 0], x[5, 0] * 0.3
    x[7] *= 1e-6  # near black, where kornia's saturation eps matters most
    turns = torch.linspace(-0.5, 0.5, 12)
    turns[6] = 0.0
    out = hue(x, turns)
    expected = adjust_hue(x, turns * 2 * math.pi)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(out[:3], x[:3], atol=1e-7, rtol=0)  # black, white, gray unchanged
    torch.testing.assert_close(out[6], x[6], atol=2e-6, rtol=0)  # zero shift is the identity


def test_hue_shift_is_in_turns_up_to_0_1() -> None:
    red = torch.tensor([0.8, 0.2, 0.2]).view(1, 3, 1, 1).expand(2000, 3, 4, 4)
    out = only(4, jitter_p=1.0, jitter=(0.0, 0.0, 0.0, 0.1))(red)
    hue = rgb_to_hsv(out)[:, 0, 0, 0]  # radians in [0, 2 pi)
    shift = torch.remainder(hue + math.pi, 2 * math.pi) - math.pi  # red is at 0
    assert shift.abs().max() <= 0.2 * math.pi + 1e-3  # 0.1 turn
    assert shift.abs().max() > 0.18 * math.pi


def test_jitter_rate_about_0_8() -> None:
    x = torch.full((2000, 3, 4, 4), 0.5)
    out = only(4, jitter_p=0.8, jitter=(0.4, 0.0, 0.0, 0.0))(x)
    changed = (out - x).abs().amax(dim=(1, 2, 3)) > 1e-6
    assert abs(changed.float().mean().item() - 0.8) < 0.04


# ---------------------------------------------------------------------------------------------- blur


@pytest.mark.parametrize("side, expected", [(224, 23), (32, 3), (96, 11), (64, 7), (1, 3), (128, 13)])
def test_blur_kernel_size_rule(side, expected) -> None:
    assert blur_kernel_size(side) == expected


def test_blur_kernel_size_is_always_odd_and_at_least_3() -> None:
    for side in range(1, 600):
        k = blur_kernel_size(side)
        assert k % 2 == 1 and k >= 3
        assert abs(k - 0.1 * side) <= 1.5 or k == 3


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-4, ValueError), (2.5, TypeError), (True, TypeError)])
def test_blur_kernel_size_rejects_bad_sides(bad, error) -> None:
    with pytest.raises(error, match="side"):
        blur_kernel_size(bad)


def test_non_square_views_use_per_dimension_kernels() -> None:
    view = BYOLView((20, 64))
    assert view.blur_kernel_size == (3, 7)
    assert BYOLView(224).blur_kernel_size == (23, 23)
    assert view(torch.rand(4, 3, 30, 70)).shape == (4, 3, 20, 64)


def test_blur_sigma_is_drawn_per_sample() -> None:
    checker = ((torch.arange(16).view(16, 1) + torch.arange(16).view(1, 16)) % 2).float()  # 1-px squares
    x = checker.expand(64, 3, -1, -1)
    out = only(16, blur_p=1.0, blur_sigma=(0.5, 2.0), blur_kernel_size=7)(x)
    contrast = out.std(dim=(1, 2, 3))
    assert (contrast < 0.9 * x.std()).all()  # every sample is blurred (sigma >= 0.5 is visible)
    assert contrast.max() > 10 * contrast.min()  # by very different amounts


def test_blur_off_and_blur_rate() -> None:
    x = torch.rand(1, 3, 8, 8).expand(2000, -1, -1, -1)
    torch.testing.assert_close(only(8, blur_p=0.0)(x), x, atol=1e-5, rtol=0)
    # sigma >= 0.5 blurs visibly, so every changed sample was blurred
    out = only(8, blur_p=0.1, blur_sigma=(0.5, 2.0))(x)
    changed = (out - x).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert abs(changed.float().mean().item() - 0.1) < 0.03


# ---------------------------------------------------------------------------------------------- channels


def test_one_channel_input_with_matching_stats() -> None:
    x = torch.rand(4, 1, 12, 12)
    for view in byol_views(8, mean=(0.5,), std=(0.5,)):
        out = view(x)
        assert out.shape == (4, 1, 8, 8) and out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6


def test_four_channel_input_with_matching_stats() -> None:
    x = torch.rand(4, 4, 12, 12)
    for view in byol_views(8, mean=(0.5,) * 4, std=(0.25,) * 4):
        assert view(x).shape == (4, 4, 8, 8)


@pytest.mark.parametrize("channels", [1, 4])
def test_rgb_only_ops_are_skipped_for_non_rgb(channels) -> None:
    x = torch.rand(6, channels, 8, 8)
    view = only(8, grayscale_p=1.0, jitter_p=1.0, jitter=(0.0, 0.0, 0.2, 0.1))  # saturation, hue, grayscale
    torch.testing.assert_close(view(x), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [1, 4])
def test_brightness_and_contrast_still_apply_for_non_rgb(channels) -> None:
    x = torch.full((200, channels, 4, 4), 0.5)
    out = only(4, jitter_p=1.0, jitter=(0.4, 0.4, 0.2, 0.1))(x)
    assert (out - x).abs().amax() > 0.1  # brightness
    ramp = torch.linspace(0.2, 0.8, 16).view(1, 1, 4, 4).expand(200, channels, -1, -1)
    out = only(4, jitter_p=1.0, jitter=(0.0, 0.4, 0.0, 0.0))(ramp)
    spread = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    assert spread.min() < 0.6 * 0.65 and spread.max() > 0.6 * 1.35  # contrast factor in [0.6, 1.4]


def test_stats_length_must_match_channels() -> None:
    with pytest.raises(ValueError, match="mean has 3 values but x has 1 channels"):
        BYOLView(8)(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="mean"):
        BYOLView(8, mean=(0.5,) * 4, std=(0.5,) * 4)(torch.rand(2, 3, 8, 8))
    assert BYOLView(8, mean=None, std=None)(torch.rand(2, 1, 8, 8)).shape == (2, 1, 8, 8)


# ---------------------------------------------------------------------------------------------- constructor


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(flip_p=1.5), ValueError, "flip_p"),
        (dict(jitter_p=-0.1), ValueError, "jitter_p"),
        (dict(grayscale_p="0.2"), TypeError, "grayscale_p"),
        (dict(blur_p=2.0), ValueError, "blur_p"),
        (dict(solarize_p=float("nan")), ValueError, "solarize_p"),
        (dict(crop_scale=(0.5, 0.2)), ValueError, "crop_scale"),
        (dict(crop_scale=(0.0, 1.0)), ValueError, "crop_scale"),
        (dict(crop_scale=(0.1, 1.5)), ValueError, "crop_scale"),
        (dict(crop_scale=0.5), TypeError, "crop_scale"),
        (dict(crop_ratio=(0.0, 1.0)), ValueError, "crop_ratio"),
        (dict(jitter=(0.4, 0.4, 0.2)), TypeError, "jitter"),
        (dict(jitter=(0.4, -0.4, 0.2, 0.1)), ValueError, "contrast"),
        (dict(jitter=(0.4, 0.4, 0.2, 0.6)), ValueError, "hue"),
        (dict(blur_sigma=(0.0, 2.0)), ValueError, "blur_sigma"),
        (dict(blur_kernel_size=4), ValueError, "blur_kernel_size"),
        (dict(blur_kernel_size="23"), TypeError, "blur_kernel_size"),
        (dict(solarize_threshold=1.5), ValueError, "solarize_threshold"),
        (dict(mean=(0.5, 0.5), std=(0.5,)), ValueError, "mean and std"),
        (dict(std=(0.2, 0.0, 0.2)), ValueError, "std"),
        (dict(mean="abc"), TypeError, "mean"),
        (dict(interpolation="nearest"), ValueError, "interpolation"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, name) -> None:
    with pytest.raises(error, match=name):
        BYOLView(16, **kwargs)


@pytest.mark.parametrize(
    "image_size, error", [(0, ValueError), (-3, ValueError), ((0, 5), ValueError), ("a", TypeError),
                          (3.5, TypeError), (True, TypeError), ((4, 4, 4), TypeError)]
)
def test_constructor_rejects_bad_image_size(image_size, error) -> None:
    with pytest.raises(error, match="image_size"):
        BYOLView(image_size)


def test_blur_kernel_must_fit_the_image() -> None:
    with pytest.raises(ValueError, match="blur_kernel_size"):
        BYOLView(2, blur_kernel_size=5)
    assert BYOLView(2, blur_kernel_size=5, blur_p=0.0).blur_kernel_size == (5, 5)


def test_constructor_accepts_tensor_stats_and_pairs() -> None:
    view = BYOLView([12, 16], mean=torch.tensor(IMAGENET_MEAN), std=list(IMAGENET_STD), blur_kernel_size=(3, 5))
    assert view.image_size == (12, 16) and view.mean == pytest.approx(IMAGENET_MEAN)
    assert view.blur_kernel_size == (3, 5)


# ---------------------------------------------------------------------------------------------- byol_views


def test_byol_views_follow_the_paper() -> None:
    view1, view2 = byol_views(224)
    assert (view1.blur_p, view1.solarize_p) == (1.0, 0.0)
    assert (view2.blur_p, view2.solarize_p) == (0.1, 0.2)
    for view in (view1, view2):
        assert view.image_size == (224, 224)
        assert view.crop_scale == (0.08, 1.0) and view.crop_ratio == pytest.approx((3 / 4, 4 / 3))
        assert view.flip_p == 0.5 and view.jitter == (0.4, 0.4, 0.2, 0.1) and view.jitter_p == 0.8
        assert view.grayscale_p == 0.2 and view.blur_sigma == (0.1, 2.0) and view.blur_kernel_size == (23, 23)
        assert view.solarize_threshold == 0.5
        assert view.mean == IMAGENET_MEAN and view.std == IMAGENET_STD


def test_byol_views_overrides_apply_to_both() -> None:
    view1, view2 = byol_views((16, 24), mean=None, std=None, flip_p=0.0, blur_p=0.5)
    for view in (view1, view2):
        assert view.flip_p == 0.0 and view.blur_p == 0.5 and view.mean is None and view.image_size == (16, 24)
    assert (view1.solarize_p, view2.solarize_p) == (0.0, 0.2)
    with pytest.raises(TypeError):
        byol_views(16, not_an_option=1)


def test_module_exports() -> None:
    assert set(aug.__all__) == {"IMAGENET_MEAN", "IMAGENET_STD", "BYOLView", "blur_kernel_size", "byol_views",
                                "to_float_image"}
    for name in aug.__all__:
        assert getattr(aug, name) is not None


# ---------------------------------------------------------------------------------------------- the package's layout


def test_view_params_are_one_uniform_draw_named_by_field() -> None:
    torch.manual_seed(3)
    params = ViewParams.draw(5, torch.device("cpu"))
    after = torch.rand(1)
    torch.manual_seed(3)
    uniform = torch.rand(5, ViewParams.columns())
    assert torch.equal(torch.rand(1), after)  # exactly one draw of (B, columns) numbers
    flat = torch.cat([f if f.ndim == 2 else f.unsqueeze(1) for f in params], dim=1)
    assert torch.equal(flat, uniform)  # the fields, in order, are the draw's columns
    assert params.area.shape == (5, 10) and params.order.shape == (5, 4) and params.flip.shape == (5,)
    part = params.narrow(1, 3)
    assert all(torch.equal(a, b[1:3]) for a, b in zip(part, params))


def test_a_view_is_replayable_from_its_params() -> None:
    view = byol_views(8)[1]
    x = torch.rand(6, 3, 12, 12)
    torch.manual_seed(4)
    out = view(x)
    torch.manual_seed(4)
    params = view._sample(6, x.device)
    assert torch.equal(view._transform(x, params), out)
    assert torch.equal(view._transform(x, params), out)  # the same params give the same view again


def test_one_torch_rand_per_view_forward(monkeypatch) -> None:
    calls = []
    real = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: calls.append(a) or real(*a, **k))
    for view in byol_views(8):
        view(torch.rand(4, 3, 12, 12))
    assert calls == [(4, 3, 12, 12), (4, ViewParams.columns()), (4, 3, 12, 12), (4, ViewParams.columns())]


def test_learner_checks_its_images_once_and_views_still_check_when_called_directly(monkeypatch, tiny_cnn) -> None:
    import byol_wrapper.byol as byol_module
    from byol_wrapper import BYOL

    counts = {"learner": 0, "view": 0}

    def counting(key, fn):
        def wrapped(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(byol_module, "check_image_dtype", counting("learner", byol_module.check_image_dtype))
    monkeypatch.setattr(views_module, "check_images", counting("view", views_module.check_images))
    learner = BYOL(tiny_cnn, image_size=8, hidden_layer="pool", projection_size=8, projection_hidden_size=16)
    learner(torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8))
    assert counts == {"learner": 1, "view": 0}
    learner.augment(torch.rand(4, 3, 12, 12))  # the public path checks, in each view
    assert counts == {"learner": 1, "view": 2}
    with pytest.raises(TypeError, match="uint8, uint16 or int16"):
        learner(torch.ones(4, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="uint8, uint16 or int16"):
        learner.augment1(torch.ones(4, 3, 8, 8, dtype=torch.int32))
    seen = []
    learner.augment2 = torch.nn.Identity()  # byol-pytorch code may replace a view with its own module
    learner.augment2.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    assert learner(x).ndim == 0
    assert torch.equal(seen[0], x / 255)  # it gets the checked float batch, as augment() gives it


def test_normalization_constants_are_defined_once() -> None:
    import pathlib

    import byol_wrapper
    from byol_wrapper import channels
    from byol_wrapper.augmentations import normalize

    assert channels.default_normalization(3) == (IMAGENET_MEAN, IMAGENET_STD)
    assert channels.default_normalization is normalize.default_normalization
    assert channels.LUMA_WEIGHTS is normalize.LUMA_WEIGHTS and byol_wrapper.IMAGENET_MEAN is normalize.IMAGENET_MEAN
    package = pathlib.Path(byol_wrapper.__file__).parent
    defining = sorted(
        str(path.relative_to(package)) for path in package.rglob("*.py")
        if any(f"{v[0]}, {v[1]}, {v[2]}" in path.read_text() for v in (IMAGENET_MEAN, IMAGENET_STD))
    )
    assert defining == ["augmentations/normalize.py"]


def test_no_speed_figures_in_the_augmentations_source() -> None:
    # figures that go stale belong in benchmarks/RESULTS.md, not in docstrings or comments
    import pathlib
    import re

    figure = re.compile(r"\d+(\.\d+)?(-\d+(\.\d+)?)?x (faster|slower)")
    for path in pathlib.Path(aug.__file__).parent.glob("*.py"):
        assert not figure.search(path.read_text()), path.name


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_runs_on_device_without_host_syncs() -> None:
    x = torch.randint(0, 256, (64, 3, 40, 40), dtype=torch.uint8, device="cuda")
    views = byol_views(32)
    for view in views:
        view(x)  # warm-up: builds the per-device normalization constants once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [view(x) for view in views]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for out in outs:
        assert out.device.type == "cuda" and out.dtype == torch.float32 and out.shape == (64, 3, 32, 32)
