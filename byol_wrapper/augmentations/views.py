"""Per-sample GPU augmentations for BYOL, after Grill et al. 2020 (arXiv:2006.07733).

BYOL builds two *asymmetric* views of every image (paper, Section 3.3 and Appendix B, Table 6). Both views
apply, in this order:

1. a random resized crop, scale ``(0.08, 1.0)``, aspect ratio ``(3/4, 4/3)``, resized to the output size
   with bicubic interpolation;
2. a random horizontal flip, ``p = 0.5``;
3. colour jitter with ``p = 0.8``: brightness ``0.4``, contrast ``0.4``, saturation ``0.2``, hue ``0.1``,
   the four operations applied in a random order;
4. a conversion to grayscale, ``p = 0.2``;
5. a Gaussian blur, kernel 23x23 at 224 px (about 10% of the side), sigma uniform in ``(0.1, 2.0)``;
   ``p = 1.0`` for view 1 and ``p = 0.1`` for view 2;
6. solarization ``x -> 1 - x`` where ``x >= 0.5``; ``p = 0.0`` for view 1 and ``p = 0.2`` for view 2;

followed by a clamp to ``[0, 1]`` and a per-channel normalization (ImageNet statistics by default).

Every random quantity is drawn independently for each image of the batch -- the crop, the flip, whether and
how the colours are jittered (including the order of the four jitter operations), grayscale, the blur and its
sigma, and solarization -- with torch's global random number generator on the input's device (one
``torch.rand`` call per forward pass). The whole batch is transformed with batched tensor operations: there
is no Python loop over samples, no host-device synchronization and no host-to-device copy on the hot path,
so the views run at full speed on a GPU. On the CPU (in eager mode) the batch goes through in slices of about
a million output values, e.g. 6 images at 224 px: the same result bit for bit, but the intermediate tensors
stay small enough for the memory allocator to reuse, which makes 224 px views 1.3-2.6x faster there.

Implementation notes. Kornia supplies the image operations: :func:`kornia.color.rgb_to_grayscale`,
:func:`kornia.filters.get_gaussian_kernel1d` (one kernel per sample) and
:func:`kornia.filters.filter2d_separable` (a grouped depthwise convolution, so each sample is blurred with its
own sigma). The hue shift is :func:`kornia.enhance.adjust_hue`'s HSV rotation in a closed form that needs fewer
passes over the image (see :func:`_hue`; tested equal to kornia's). The random parameters are drawn here rather
than by ``kornia.augmentation`` modules, because those draw on the module's RNG device (the CPU unless the module
was moved) and copy the parameters to the input's device, ``ColorJitter`` draws one order of its four ops per
batch rather than per sample, ``RandomSolarize`` also randomizes the threshold and adds a random brightness
shift, and ``gaussian_blur2d`` reads a tensor ``sigma`` back to the host to validate it. The crop and the flip are one
``grid_sample`` pass; brightness, contrast and saturation use the formulas of kornia's
``adjust_brightness_accumulative``, ``adjust_contrast_with_mean_subtraction`` and
``adjust_saturation_with_gray_subtraction`` (torchvision's), fused so that each sample's own order costs a
few cheap passes over the batch (see :func:`_color_jitter`).

Example:
    >>> view1, view2 = byol_views(32)
    >>> images = torch.rand(8, 3, 40, 40)
    >>> one, two = view1(images), view2(images)
    >>> one.shape, one.dtype
    (torch.Size([8, 3, 32, 32]), torch.float32)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.filters import filter2d_separable, get_gaussian_kernel1d
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BYOLView",
    "blur_kernel_size",
    "byol_views",
    "to_float_image",
]

#: Per-channel RGB mean of ImageNet, the normalization used by the paper's ResNets.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: Per-channel RGB standard deviation of ImageNet.
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Indices of the four colour-jitter operations, in the order of the ``jitter`` argument.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3
_JITTER_NAMES = ("brightness", "contrast", "saturation", "hue")
_INTERPOLATIONS = ("bilinear", "bicubic")

# Columns of the single (B, _N_RAND) uniform draw that parameterizes one forward pass.
_N_TRIALS = 10  # crop trials per sample, as torchvision's RandomResizedCrop.get_params
_C_AREA = slice(0, _N_TRIALS)
_C_RATIO = slice(_N_TRIALS, 2 * _N_TRIALS)
_C_TOP = 2 * _N_TRIALS
_C_LEFT = _C_TOP + 1
_C_FLIP = _C_LEFT + 1
_C_JITTER = _C_FLIP + 1
_C_FACTORS = slice(_C_JITTER + 1, _C_JITTER + 5)
_C_ORDER = slice(_C_JITTER + 5, _C_JITTER + 9)
_C_GRAY = _C_JITTER + 9
_C_BLUR = _C_GRAY + 1
_C_SIGMA = _C_BLUR + 1
_C_SOLARIZE = _C_SIGMA + 1
_N_RAND = _C_SOLARIZE + 1


# Integer image dtypes accepted like uint8 and scaled by their range (torch.uint16 exists from torch 2.3).
_INTEGER_IMAGE_DTYPES = tuple(d for d in (torch.uint8, getattr(torch, "uint16", None), torch.int16) if d is not None)


def to_float_image(x: torch.Tensor) -> torch.Tensor:
    """Convert a batch of images to float32 in ``[0, 1]``.

    Integer images are scaled by their dtype's range: ``uint8`` divided by 255, ``uint16`` (16-bit PNG/TIFF)
    divided by 65535, ``int16`` mapped from ``[-32768, 32767]`` to ``[0, 1]``. Floating-point images of any precision are cast to float32 and are
    assumed to hold values in ``[0, 1]`` already (they are not rescaled or clamped). A float32 input is
    returned as is, without a copy.

    Args:
        x: Images of shape ``(B, C, H, W)``, ``uint8``, ``uint16``, ``int16`` or floating point.

    Returns:
        The images as float32, same shape and device.

    Raises:
        TypeError: If ``x`` is not a tensor, or its dtype is neither one of those integers nor floating point.
        ValueError: If ``x`` is not 4-D.
    """
    _check_images(x)
    if x.dtype in _INTEGER_IMAGE_DTYPES:
        # Scaled by the dtype's range: uint8 / 255, uint16 / 65535, int16 (x + 32768) / 65535.
        info = torch.iinfo(x.dtype)
        x = x.to(torch.float32)
        if info.min:
            x = x.sub_(info.min)
        return x.div_(float(info.max - info.min))
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def _check_images(x: Any) -> None:
    """Raise unless ``x`` is a 4-D ``uint8`` or floating-point tensor (see :func:`to_float_image`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of images of shape (B, C, H, W); got {type(x).__name__}")
    if x.ndim != 4:
        hint = "; add a batch dimension with x.unsqueeze(0)" if x.ndim == 3 else ""
        raise ValueError(f"x must be a 4-D tensor of shape (B, C, H, W); got shape {tuple(x.shape)}{hint}")
    if x.dtype not in _INTEGER_IMAGE_DTYPES and not x.dtype.is_floating_point:
        raise TypeError(
            f"x must be uint8, uint16 or int16 (scaled by the dtype's range) or floating point (values in [0, 1]); "
            f"got dtype {x.dtype}. Convert it first, e.g. x.float() / x.max() or x.to(torch.uint8)"
        )


def blur_kernel_size(side: int, fraction: float = 0.1) -> int:
    """The side of BYOL's Gaussian blur kernel for an image side of ``side`` pixels.

    The paper blurs 224x224 crops with a 23x23 kernel, i.e. about 10% of the side (Appendix B). The rule is
    ``k = round_half_up(fraction * side)``, then ``k + 1`` if ``k`` is even, and at least 3: 224 -> 23,
    96 -> 11, 64 -> 7, 32 -> 3. The result is always odd, so the kernel has a centre tap.

    Args:
        side: Image side in pixels, a positive int.
        fraction: Kernel side as a fraction of the image side, a positive float.

    Returns:
        An odd kernel side ``>= 3``.

    Raises:
        TypeError: If ``side`` is not an int or ``fraction`` not a real number.
        ValueError: If ``side`` or ``fraction`` is not positive.
    """
    if isinstance(side, bool) or not isinstance(side, numbers.Integral):
        raise TypeError(f"side must be a positive int (image side in pixels); got {side!r}")
    if side <= 0:
        raise ValueError(f"side must be a positive int (image side in pixels); got {side}")
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise TypeError(f"fraction must be a positive float such as 0.1; got {fraction!r}")
    if not (math.isfinite(fraction) and fraction > 0):
        raise ValueError(f"fraction must be a positive float such as 0.1; got {fraction}")
    k = int(math.floor(fraction * int(side) + 0.5))
    if k % 2 == 0:
        k += 1
    return max(k, 3)


# ----------------------------------------------------------------------------------------------------------
# argument validation


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_probability(name: str, value: Any) -> float:
    if not _is_real(value):
        raise TypeError(f"{name} must be a probability, a float in [0, 1]; got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (0 disables the op, 1 always applies it); got {value}")
    return float(value)


def _check_pair(name: str, value: Any, what: str) -> tuple[float, float]:
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or len(value) != 2
        or not all(_is_real(v) for v in value)
    ):
        raise TypeError(f"{name} must be a (low, high) pair of floats, {what}; got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} must hold finite numbers, {what}; got {value!r}")
    return low, high


def _check_image_size(image_size: Any) -> tuple[int, int]:
    def is_int(v: Any) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if is_int(image_size):
        size = (int(image_size), int(image_size))
    elif (
        isinstance(image_size, Sequence)
        and not isinstance(image_size, (str, bytes))
        and len(image_size) == 2
        and all(is_int(v) for v in image_size)
    ):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise TypeError(
            f"image_size must be a positive int (square output) or an (H, W) pair of positive ints; got {image_size!r}"
        )
    if min(size) <= 0:
        raise ValueError(
            f"image_size must be a positive int (square output) or an (H, W) pair of positive ints; got {image_size!r}"
        )
    return size


def _check_kernel_size(blur_kernel: Any, size: tuple[int, int]) -> tuple[int, int]:
    if blur_kernel is None:
        return blur_kernel_size(size[0]), blur_kernel_size(size[1])
    if isinstance(blur_kernel, numbers.Integral) and not isinstance(blur_kernel, bool):
        kernel = (int(blur_kernel), int(blur_kernel))
    elif (
        isinstance(blur_kernel, Sequence)
        and not isinstance(blur_kernel, (str, bytes))
        and len(blur_kernel) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in blur_kernel)
    ):
        kernel = (int(blur_kernel[0]), int(blur_kernel[1]))
    else:
        raise TypeError(
            f"blur_kernel_size must be None (about 10% of the side), an odd int or an (kH, kW) pair of odd ints; "
            f"got {blur_kernel!r}"
        )
    if any(k <= 0 or k % 2 == 0 for k in kernel):
        raise ValueError(
            f"blur_kernel_size must be odd and positive, e.g. 23 for 224 px images; got {blur_kernel!r}. "
            "Pass None to use blur_kernel_size(side)"
        )
    return kernel


def _check_stats(name: str, value: Any, positive: bool) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.ndim == 1:
        value = value.tolist()
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or len(value) == 0
        or not all(_is_real(v) for v in value)
    ):
        raise TypeError(
            f"{name} must be None (no normalization) or a sequence with one float per channel, "
            f"e.g. IMAGENET_{name.upper()}; got {value!r}"
        )
    stats = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in stats):
        raise ValueError(f"{name} must hold finite numbers; got {value!r}")
    if positive and not all(v > 0 for v in stats):
        raise ValueError(f"{name} must hold positive numbers (standard deviations); got {value!r}")
    return stats


# ----------------------------------------------------------------------------------------------------------
# the batched per-sample operations


def _crop_boxes(
    rand: torch.Tensor,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample ``(top, left, h, w)`` crop boxes in pixels, torchvision's ``RandomResizedCrop.get_params``.

    Vectorized over the batch: each sample tries ten (area, log-aspect-ratio) draws and keeps the first that
    fits inside the image; a sample for which none fits falls back to the central crop with the aspect ratio
    clamped into ``ratio``, as torchvision does. Returns float32 tensors of integer values, shape ``(B,)``.
    """
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale[0] + (scale[1] - scale[0]) * rand[:, _C_AREA])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * rand[:, _C_RATIO])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting trial (0 if none)
    found = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    top = torch.minimum(torch.floor(rand[:, _C_TOP] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(rand[:, _C_LEFT] * (width - w + 1)), width - w)
    top = torch.where(found, top, torch.full_like(top, (height - fallback_h) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fallback_w) // 2))
    return top, left, h, w


def _resized_crop(
    x: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    flip: torch.Tensor | None,
    size: tuple[int, int],
    interpolation: str,
) -> torch.Tensor:
    """Resample each sample's box ``[top, top + h) x [left, left + w)`` to ``size``, mirrored where ``flip``.

    One ``affine_grid`` + ``grid_sample`` pass does crop, resize and flip for the whole batch: the flip is a
    negated horizontal scale in each sample's affine map, so it costs nothing. Pixel centres are mapped as by
    ``F.interpolate(..., align_corners=False)`` (no antialiasing, like the reference TF implementation's
    bicubic resize). The box is resampled in the whole image, so the interpolation taps of the outermost
    output pixels may read the image pixels just outside the box (as kornia's and TF's crop-and-resize do;
    torchvision instead replicates the cut-out crop's edge); taps outside the image repeat its border pixel.
    """
    height, width = x.shape[-2:]
    scale_x = w / width
    if flip is not None:
        scale_x = torch.where(flip, -scale_x, scale_x)
    zeros = torch.zeros_like(scale_x)
    theta = torch.stack(
        (
            torch.stack((scale_x, zeros, (2.0 * left + w) / width - 1.0), dim=1),
            torch.stack((zeros, h / height, (2.0 * top + h) / height - 1.0), dim=1),
        ),
        dim=1,
    )
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size[0], size[1]], align_corners=False)
    out = F.grid_sample(x, grid, mode=interpolation, padding_mode="border", align_corners=False)
    if interpolation == "bicubic":  # the cubic kernel overshoots; keep the colour ops' input in range
        out = out.clamp_(0.0, 1.0)
    return out


def _hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Shift the hue of RGB images by ``factor`` turns per sample (torchvision's unit, ``[-0.5, 0.5]``).

    The result is kornia's ``adjust_hue`` (RGB -> HSV, hue rotated, HSV -> RGB; equal to within 2e-6, see
    ``tests/test_augmentations.py``) computed in fewer full-image passes: the hue ``h`` in sextants is taken
    from the maximal channel as kornia does, shifted, and each output channel is
    ``v - v * s * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + h) mod 6`` and ``n = 5, 3, 1`` for R, G, B (the
    closed form of the HSV sextant table), where ``v * s`` is the chroma ``max - min``. About 2.5x faster than
    ``adjust_hue`` on the CPU, with no gather and a third of its ``torch.where`` passes.
    """
    r, g, b = x.unbind(-3)
    v = x.amax(-3)
    chroma = v - x.amin(-3)
    # kornia's v * s is v * chroma / (v + 1e-8): chroma to within 1e-8 (chroma <= v), and exactly 0 for black
    # and gray pixels, so chroma itself stands in for it below (two fewer full-image passes than computing s)
    inv = 1.0 / torch.where(chroma == 0, 1.0, chroma)  # gray pixels: hue 0, and chroma 0 keeps them gray
    hue = torch.where(
        (r >= g) & (r >= b), (g - b) * inv, torch.where(g >= b, (b - r) * inv + 2.0, (r - g) * inv + 4.0)
    )
    hue = hue + (6.0 * factor).view(-1, 1, 1)
    hue = hue - 6.0 * torch.floor(hue * (1.0 / 6.0))  # [0, 6)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = hue + n
        k = torch.where(k >= 6.0, k - 6.0, k)
        channels.append(torch.addcmul(v, chroma, torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0), value=-1.0))
    return torch.stack(channels, dim=-3)


def _jitter_positions(keys: torch.Tensor, ops: Sequence[int]) -> torch.Tensor:
    """Each sample's step for each of the enabled jitter ops ``ops``, from per-sample random ``keys``.

    ``keys`` is ``(B, 4)`` uniform noise, one column per op (brightness, contrast, saturation, hue); sorting a
    sample's keys gives a uniformly random permutation of the four ops, i.e. ``keys.argsort(dim=1)[b]`` is
    sample ``b``'s order of application. Returns ``(B, len(ops))`` long: ``positions[b, i]`` is the step
    (``0 .. len(ops) - 1``) at which ``ops[i]`` runs for sample ``b``, the rank of its key among the enabled
    ops' keys. Disabled ops are dropped from the permutation without changing the enabled ops' relative order.
    """
    # stack columns rather than index with a Python list, which would copy an index tensor to the device
    chosen = keys if list(ops) == list(range(keys.shape[1])) else torch.stack([keys[:, op] for op in ops], dim=1)
    return chosen.argsort(dim=1).argsort(dim=1)


def _blend_slots(
    x: torch.Tensor,
    apply: torch.Tensor | None,
    ops: Sequence[int],
    factors: Sequence[torch.Tensor],
    slots: torch.Tensor,
) -> torch.Tensor:
    """Run the brightness / contrast / saturation ops scheduled in ``slots``, one fused pass per slot.

    The three ops are all torchvision's ``_blend(x, ref, f) = clamp(f * x + (1 - f) * ref, 0, 1)``, with
    ``ref`` black (brightness), the mean of the grayscale image (contrast; the mean over all channels and
    pixels when ``C != 3``) or the grayscale image (saturation) -- the formulas of kornia's
    ``adjust_brightness_accumulative``, ``adjust_contrast_with_mean_subtraction`` and
    ``adjust_saturation_with_gray_subtraction``. So one slot applies, to each sample, whichever of them is
    scheduled for it there, with its own factor and reference; a sample with nothing scheduled gets ``f = 1``,
    which ``torch.lerp`` returns bit for bit.

    Args:
        x: Images ``(B, C, H, W)`` in ``[0, 1]``.
        apply: ``(B,)`` bool, which samples are jittered at all; ``None`` for all of them.
        ops: Enabled op indices; hue entries are ignored here.
        factors: ``(B,)`` factor per entry of ``ops``.
        slots: ``(B, len(ops))`` long: the slot in which each op runs for each sample, ``-1`` for none. Every
            slot holds at most one op per sample.
    """
    blend = [i for i, op in enumerate(ops) if op != _HUE]
    if not blend:
        return x
    rgb = x.shape[1] == 3
    for slot in range(len(blend)):
        weight = torch.ones_like(factors[blend[0]])
        use_mean: torch.Tensor | None = None
        use_gray: torch.Tensor | None = None
        for i in blend:
            chosen = slots[:, i] == slot
            if apply is not None:
                chosen = chosen & apply
            weight = torch.where(chosen, factors[i], weight)
            if ops[i] == _CONTRAST:
                use_mean = chosen.view(-1, 1, 1, 1)
            elif ops[i] == _SATURATION:
                use_gray = chosen.view(-1, 1, 1, 1)
        weight = weight.view(-1, 1, 1, 1)
        if use_mean is None and use_gray is None:  # brightness only
            x = (x * weight).clamp_(0.0, 1.0)
            continue
        zero = x.new_zeros(())
        if rgb:
            gray = rgb_to_grayscale(x)  # (B, 1, H, W)
            ref = zero
            if use_mean is not None:
                ref = torch.where(use_mean, gray.mean(dim=(-2, -1), keepdim=True), ref)
            if use_gray is not None:
                ref = torch.where(use_gray, gray, ref)
        elif use_mean is not None:  # not RGB: contrast blends with the mean over all channels and pixels
            ref = torch.where(use_mean, x.mean(dim=(1, 2, 3), keepdim=True), zero)
        else:  # saturation needs RGB: the caller drops it, so this is never reached with a gray reference
            ref = zero
        x = torch.lerp(ref, x, weight).clamp_(0.0, 1.0)
    return x


def _color_jitter(
    x: torch.Tensor,
    apply: torch.Tensor | None,
    ops: Sequence[int],
    factors: Sequence[torch.Tensor],
    positions: torch.Tensor,
) -> torch.Tensor:
    """Apply the jitter ops ``ops`` in a per-sample order, each sample with its own factors.

    Args:
        x: Images ``(B, C, H, W)`` in ``[0, 1]``.
        apply: ``(B,)`` bool, which samples are jittered at all; ``None`` for all of them.
        ops: Enabled op indices (0 brightness, 1 contrast, 2 saturation, 3 hue; saturation and hue need RGB).
        factors: For each entry of ``ops``, a ``(B,)`` factor tensor in torchvision's units (multiplicative
            factors for brightness, contrast and saturation; a hue shift in turns).
        positions: ``(B, len(ops))`` step of each op for each sample, see :func:`_jitter_positions`.

    Returns:
        The jittered images; samples with ``apply`` false are returned bit for bit.

    A sample's order splits into the blend ops before its hue shift, the hue shift, and the blend ops after
    it. The blend ops before hue run in ``n`` fused slots (``n`` = enabled blend ops; slot ``k`` holds each
    sample's op at step ``k`` when that comes before its hue), then hue runs once on the whole batch, then the
    blend ops after hue run in ``n`` more slots. So the cost is one hue evaluation and at most ``2 n`` cheap
    fused passes, with no loop over samples, no data-dependent subset (whose size would have to be read
    back from the GPU) and no host synchronization.
    """
    if _HUE not in ops:
        return _blend_slots(x, apply, ops, factors, positions)
    hue = list(ops).index(_HUE)
    hue_step = positions[:, hue : hue + 1]
    before = torch.where(positions < hue_step, positions, -1)
    after = torch.where(positions > hue_step, positions - hue_step - 1, -1)
    x = _blend_slots(x, apply, ops, factors, before)
    shifted = _hue(x, factors[hue])
    x = shifted if apply is None else torch.where(apply.view(-1, 1, 1, 1), shifted, x)
    return _blend_slots(x, apply, ops, factors, after)


# On the CPU the views transform the batch in slices of about this many output values (4 MiB of float32 per
# tensor). Each of the ~50 intermediate tensors of a view is then small enough for the allocator to reuse
# its memory, where a whole batch's worth (e.g. 77 MB at 224 px, batch 128) is mapped afresh from the OS and
# page-faulted in every time: 1.3-2.6x faster at 224 px with glibc's malloc (benchmarks/RESULTS.md), and
# the same results. Not on GPUs, where one kernel per op over the whole batch is what is fast.
_CPU_CHUNK_VALUES = 1 << 20


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    check = getattr(compiler, "is_compiling", None)  # torch >= 2.3
    if check is None:
        from torch import _dynamo

        check = _dynamo.is_compiling
    return bool(check())


def _cpu_chunk(x: torch.Tensor, values_per_sample: int) -> int:
    """How many samples of ``x`` a view transforms at once: all of them except on the CPU in eager mode."""
    if x.device.type != "cpu" or _is_compiling():
        return x.shape[0]
    return max(1, _CPU_CHUNK_VALUES // values_per_sample)


# ----------------------------------------------------------------------------------------------------------
# the view


class BYOLView(nn.Module):
    """One BYOL augmentation view, with parameters drawn independently for every sample of the batch.

    Defaults are the paper's (Grill et al. 2020, arXiv:2006.07733, Appendix B, Table 6) common to both views;
    :func:`byol_views` sets the two views' blur and solarization probabilities. Applied in this order:

    1. **Random resized crop** of area fraction ``crop_scale`` and aspect ratio ``crop_ratio`` (log-uniform),
       torchvision's sampling rule (ten trials, then a central crop), resized to ``image_size`` with
       ``interpolation``: bicubic by default, as in the paper (``"bilinear"`` is slightly cheaper), clamped
       to ``[0, 1]`` since the cubic kernel overshoots. No antialiasing, as in the paper's reference
       implementation. The input may have any spatial size, smaller or larger than ``image_size``.
    2. **Horizontal flip** with probability ``flip_p`` (folded into the crop's resampling, so free).
    3. **Colour jitter** with probability ``jitter_p``: brightness, contrast, saturation and hue with
       torchvision ``ColorJitter`` semantics -- brightness and contrast factors uniform in
       ``[max(0, 1 - b), 1 + b]`` (brightness multiplies the image; contrast blends it with the mean of its
       grayscale), saturation factor in ``[max(0, 1 - s), 1 + s]`` (blend with the grayscale image), and a hue
       shift uniform in ``[-h, h]`` turns (``h <= 0.5``, kornia's ``adjust_hue`` in HSV) -- each clamping to
       ``[0, 1]``. The four ops run in a random order drawn per sample (a random permutation per image, as
       torchvision draws one per call). A zero strength disables that op.
    4. **Grayscale** (ITU-R 601 luma, replicated to the three channels) with probability ``grayscale_p``.
    5. **Gaussian blur** with probability ``blur_p``: an isotropic sigma uniform in ``blur_sigma`` per sample,
       a separable kernel of ``blur_kernel_size`` (default :func:`blur_kernel_size` of each output side, so
       ``(kH, kW)`` for non-square outputs), reflect padding.
    6. **Solarize** with probability ``solarize_p``: ``x -> 1 - x`` where ``x >= solarize_threshold`` (0.5
       in the paper; no random threshold or addition).
    7. Clamp to ``[0, 1]``, then **normalize** ``(x - mean) / std`` per channel. ``mean=None`` or
       ``std=None`` disables normalization (the output is then in ``[0, 1]``).

    Channels: RGB inputs (``C == 3``) get every op. For any other channel count the ops that need RGB are
    skipped -- jitter's saturation and hue, and grayscale -- while brightness (multiplying every channel)
    and contrast (blending every channel with the mean over all channels and pixels, as torchvision does for
    one channel) still run, in a per-sample random order, with probability ``jitter_p``. Crop, flip, blur and
    solarize work on any channel count. ``mean`` and ``std``, when given, must have one value per input
    channel (``ValueError`` otherwise), e.g. ``mean=(0.5,), std=(0.5,)`` for grayscale images.

    The forward pass runs under ``torch.no_grad()`` and with autocast disabled, in float32, on the input's
    device, with torch's global RNG (so ``torch.manual_seed`` makes it reproducible). It has no Python loop
    over samples and no host-device synchronization. The module holds no parameters or buffers.

    Args:
        image_size: Output size, an int for square outputs or an ``(H, W)`` pair.
        crop_scale: Range of the crop's area as a fraction of the input's, ``0 < low <= high <= 1``.
        crop_ratio: Range of the crop's aspect ratio (width / height), ``0 < low <= high``.
        flip_p: Probability of a horizontal flip.
        jitter: Colour-jitter strengths ``(brightness, contrast, saturation, hue)``, all ``>= 0``,
            hue ``<= 0.5``.
        jitter_p: Probability of applying colour jitter.
        grayscale_p: Probability of converting to grayscale.
        blur_p: Probability of a Gaussian blur (1.0 for view 1, 0.1 for view 2 in the paper).
        blur_sigma: Range of the blur's standard deviation in pixels, ``0 < low <= high``.
        blur_kernel_size: Odd kernel side, an ``(kH, kW)`` pair of odd sides, or ``None`` for
            :func:`blur_kernel_size` of each output side (23 at 224 px).
        solarize_p: Probability of solarization (0.0 for view 1, 0.2 for view 2 in the paper).
        solarize_threshold: Pixels ``>= solarize_threshold`` are inverted, in ``[0, 1]``.
        mean: Per-channel normalization mean (a sequence of floats or a 1-D tensor), or ``None`` for none.
        std: Per-channel normalization standard deviation (positive), or ``None`` for no normalization.
        interpolation: Resampling of the resized crop, ``"bicubic"`` (the paper's) or ``"bilinear"``.

    Raises:
        TypeError: If an argument has the wrong type (e.g. a string probability).
        ValueError: If an argument is out of range; the message names the argument and the valid range.

    Example:
        >>> view = BYOLView((24, 32), mean=None, std=None)
        >>> out = view(torch.randint(0, 256, (4, 3, 48, 48), dtype=torch.uint8))
        >>> out.shape, out.dtype, bool(out.min() >= 0), bool(out.max() <= 1)
        (torch.Size([4, 3, 24, 32]), torch.float32, True, True)
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        *,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 1.0,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_size: int | tuple[int, int] | None = None,
        solarize_p: float = 0.0,
        solarize_threshold: float = 0.5,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        interpolation: str = "bicubic",
    ) -> None:
        super().__init__()
        self.image_size: tuple[int, int] = _check_image_size(image_size)

        lo, hi = _check_pair("crop_scale", crop_scale, "the crop's area fraction, e.g. (0.08, 1.0)")
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(
                f"crop_scale must satisfy 0 < low <= high <= 1 (fractions of the input area), e.g. (0.08, 1.0); "
                f"got {crop_scale!r}"
            )
        self.crop_scale = (lo, hi)
        lo, hi = _check_pair("crop_ratio", crop_ratio, "the crop's width / height, e.g. (3/4, 4/3)")
        if not 0.0 < lo <= hi:
            raise ValueError(
                f"crop_ratio must satisfy 0 < low <= high (aspect ratios width / height), e.g. (3/4, 4/3); "
                f"got {crop_ratio!r}"
            )
        self.crop_ratio = (lo, hi)

        self.flip_p = _check_probability("flip_p", flip_p)
        if (
            isinstance(jitter, (str, bytes))
            or not isinstance(jitter, Sequence)
            or len(jitter) != 4
            or not all(_is_real(v) for v in jitter)
        ):
            raise TypeError(
                f"jitter must be four floats (brightness, contrast, saturation, hue), e.g. (0.4, 0.4, 0.2, 0.1); "
                f"got {jitter!r}"
            )
        jit = tuple(float(v) for v in jitter)
        for name, value in zip(_JITTER_NAMES, jit):
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"jitter {name} strength must be a finite number >= 0 (0 disables it); got {value}")
        if jit[_HUE] > 0.5:
            raise ValueError(f"jitter hue strength must be in [0, 0.5] (a fraction of a full turn); got {jit[_HUE]}")
        self.jitter: tuple[float, float, float, float] = jit  # type: ignore[assignment]
        self.jitter_p = _check_probability("jitter_p", jitter_p)
        self.grayscale_p = _check_probability("grayscale_p", grayscale_p)

        self.blur_p = _check_probability("blur_p", blur_p)
        lo, hi = _check_pair("blur_sigma", blur_sigma, "the blur's standard deviation in pixels, e.g. (0.1, 2.0)")
        if not 0.0 < lo <= hi:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high (pixels), e.g. (0.1, 2.0); got {blur_sigma!r}")
        self.blur_sigma = (lo, hi)
        self.blur_kernel_size: tuple[int, int] = _check_kernel_size(blur_kernel_size, self.image_size)
        if self.blur_p > 0 and any(k // 2 >= s for k, s in zip(self.blur_kernel_size, self.image_size)):
            raise ValueError(
                f"blur_kernel_size {self.blur_kernel_size} is too large for image_size {self.image_size}: the "
                "reflect padding needs kernel_size // 2 < side. Pass a smaller odd blur_kernel_size or blur_p=0"
            )

        self.solarize_p = _check_probability("solarize_p", solarize_p)
        if not _is_real(solarize_threshold):
            raise TypeError(f"solarize_threshold must be a float in [0, 1]; got {solarize_threshold!r}")
        if not 0.0 <= float(solarize_threshold) <= 1.0:
            raise ValueError(f"solarize_threshold must be in [0, 1] (0.5 in the paper); got {solarize_threshold}")
        self.solarize_threshold = float(solarize_threshold)

        self.mean = _check_stats("mean", mean, positive=False)
        self.std = _check_stats("std", std, positive=True)
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(
                f"mean and std must have the same length, one value per channel; got {len(self.mean)} and "
                f"{len(self.std)} values"
            )
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}; got {interpolation!r}")
        self.interpolation = interpolation
        # Normalization constants as non-persistent buffers: they follow ``.to(device)`` with the learner, so
        # forward never copies host->device, and torch.compile sees plain tensors (no per-device cache).
        for name, stats in (("_mean_t", self.mean), ("_std_t", self.std)):
            value = None if stats is None else torch.tensor(stats, dtype=torch.float32).view(1, -1, 1, 1)
            self.register_buffer(name, value, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, crop_scale={self.crop_scale}, crop_ratio={self.crop_ratio}, "
            f"flip_p={self.flip_p}, jitter={self.jitter}, jitter_p={self.jitter_p}, grayscale_p={self.grayscale_p}, "
            f"blur_p={self.blur_p}, blur_sigma={self.blur_sigma}, blur_kernel_size={self.blur_kernel_size}, "
            f"solarize_p={self.solarize_p}, solarize_threshold={self.solarize_threshold}, mean={self.mean}, "
            f"std={self.std}, interpolation={self.interpolation!r}"
        )

    def _sample(self, batch: int, device: torch.device) -> torch.Tensor:
        """The ``(B, _N_RAND)`` uniform draw that parameterizes one forward pass (one RNG call)."""
        return torch.rand(batch, _N_RAND, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Augment a batch of images, each with its own random parameters.

        Args:
            x: Images ``(B, C, H, W)``, ``uint8`` (0..255) or floating point in ``[0, 1]``, any ``H, W``.

        Returns:
            float32 ``(B, C, *image_size)`` on ``x``'s device, normalized if ``mean`` and ``std`` are set,
            otherwise in ``[0, 1]``. Never requires grad.

        Raises:
            TypeError: If ``x`` is not a tensor or has an unsupported dtype.
            ValueError: If ``x`` is not 4-D, or ``mean``/``std`` do not have one value per channel.
        """
        _check_images(x)
        batch, channels, height, width = x.shape
        if channels < 1 or height < 1 or width < 1:
            raise ValueError(f"x must have at least one channel and pixel, shape (B, C, H, W); got {tuple(x.shape)}")
        if self.mean is not None and self.std is not None:
            for name, stats in (("mean", self.mean), ("std", self.std)):
                if len(stats) != channels:
                    raise ValueError(
                        f"{name} has {len(stats)} values but x has {channels} channels; pass mean and std with one "
                        f"value per channel (e.g. mean=(0.5,), std=(0.5,) for 1 channel) or mean=None, std=None "
                        "to disable normalization"
                    )
        out_h, out_w = self.image_size
        if batch == 0:
            return torch.empty(0, channels, out_h, out_w, device=x.device, dtype=torch.float32)

        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            x = x.detach()
            rand = self._sample(batch, x.device)
            chunk = _cpu_chunk(x, channels * out_h * out_w)
            if chunk >= batch:
                return self._transform(to_float_image(x), rand)
            # Every op is per sample, so transforming the batch in slices gives the same result bit for bit.
            out = torch.empty(batch, channels, out_h, out_w, dtype=torch.float32)
            for start in range(0, batch, chunk):
                stop = start + chunk
                out[start:stop] = self._transform(to_float_image(x[start:stop]), rand[start:stop])
            return out

    def _transform(self, x: torch.Tensor, rand: torch.Tensor) -> torch.Tensor:
        """Transform float32 images ``x`` with the parameters encoded in ``rand`` (see :meth:`_sample`)."""
        rgb = x.shape[1] == 3

        # 1-2. random resized crop + horizontal flip, one resampling pass
        top, left, h, w = _crop_boxes(rand, x.shape[-2], x.shape[-1], self.crop_scale, self.crop_ratio)
        flip = rand[:, _C_FLIP] < self.flip_p if self.flip_p > 0 else None
        x = _resized_crop(x, top, left, h, w, flip, self.image_size, self.interpolation)

        # 3. colour jitter, per-sample op order and factors
        ops = [op for op in range(4) if self.jitter[op] > 0 and (rgb or op in (_BRIGHTNESS, _CONTRAST))]
        if self.jitter_p > 0 and ops:
            u = rand[:, _C_FACTORS]
            factors = []
            for op in ops:
                strength = self.jitter[op]
                if op == _HUE:
                    low, high = -strength, strength
                else:
                    low, high = max(0.0, 1.0 - strength), 1.0 + strength
                factors.append(low + (high - low) * u[:, op])
            apply = rand[:, _C_JITTER] < self.jitter_p if self.jitter_p < 1 else None
            positions = _jitter_positions(rand[:, _C_ORDER], ops)
            x = _color_jitter(x, apply, ops, factors, positions)

        # 4. grayscale (RGB only)
        if rgb and self.grayscale_p > 0:
            gray = rgb_to_grayscale(x).expand_as(x)
            x = torch.where((rand[:, _C_GRAY] < self.grayscale_p).view(-1, 1, 1, 1), gray, x)

        # 5. Gaussian blur, per-sample sigma: grouped depthwise convolution with one kernel per sample
        if self.blur_p > 0:
            low, high = self.blur_sigma
            sigma = (low + (high - low) * rand[:, _C_SIGMA]).unsqueeze(1)
            k_h, k_w = self.blur_kernel_size
            blurred = filter2d_separable(
                x, get_gaussian_kernel1d(k_w, sigma), get_gaussian_kernel1d(k_h, sigma), border_type="reflect"
            )
            if self.blur_p < 1:
                blurred = torch.where((rand[:, _C_BLUR] < self.blur_p).view(-1, 1, 1, 1), blurred, x)
            x = blurred

        # 6. solarize
        if self.solarize_p > 0:
            chosen = (rand[:, _C_SOLARIZE] < self.solarize_p).view(-1, 1, 1, 1)
            x = torch.where(chosen & (x >= self.solarize_threshold), 1.0 - x, x)

        # 7. clamp, normalize
        x = x.clamp(0.0, 1.0)
        if self._mean_t is not None and self._std_t is not None:
            x = x.sub_(self._mean_t.to(x.device, torch.float32)).div_(self._std_t.to(x.device, torch.float32))
        return x


def byol_views(
    image_size: int | tuple[int, int],
    *,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    **overrides: Any,
) -> tuple[BYOLView, BYOLView]:
    """BYOL's two asymmetric augmentation views (Grill et al. 2020, Appendix B, Table 6).

    View 1 always blurs and never solarizes (``blur_p=1.0, solarize_p=0.0``); view 2 blurs with probability
    0.1 and solarizes with probability 0.2 (``blur_p=0.1, solarize_p=0.2``). Everything else is
    :class:`BYOLView`'s defaults, shared by both views.

    Args:
        image_size: Output size, an int or an ``(H, W)`` pair.
        mean: Per-channel normalization mean for both views, or ``None`` to disable normalization.
        std: Per-channel normalization standard deviation for both views, or ``None``.
        **overrides: Any other :class:`BYOLView` keyword argument, applied to *both* views (so
            ``blur_p=0.5`` sets both views' blur probability).

    Returns:
        ``(view1, view2)``.

    Raises:
        TypeError: For an unknown override or an argument of the wrong type.
        ValueError: For an out-of-range argument.
    """
    view1: dict[str, Any] = {"blur_p": 1.0, "solarize_p": 0.0}
    view2: dict[str, Any] = {"blur_p": 0.1, "solarize_p": 0.2}
    view1.update(overrides)
    view2.update(overrides)
    return (
        BYOLView(image_size, mean=mean, std=std, **view1),
        BYOLView(image_size, mean=mean, std=std, **view2),
    )
