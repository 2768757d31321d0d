"""Batched per-sample intensity ops: colour jitter (with a per-sample order of its four ops), hue, grayscale,
Gaussian blur and solarization.

Every op takes the whole batch and per-sample tensors (factors, decisions, sigmas) and runs as a few batched
tensor passes, with no loop over samples, no data-dependent subset and no host synchronization. Kornia supplies
the image operations: :func:`kornia.color.rgb_to_grayscale`, :func:`kornia.filters.get_gaussian_kernel1d` (one
kernel per sample) and :func:`kornia.filters.filter2d_separable` (a grouped depthwise convolution, so each sample
is blurred with its own sigma). Brightness, contrast and saturation use the formulas of kornia's
``adjust_brightness_accumulative``, ``adjust_contrast_with_mean_subtraction`` and
``adjust_saturation_with_gray_subtraction`` (torchvision's), fused so that each sample's own order costs a few
cheap passes over the batch (see :func:`color_jitter`); the hue shift is kornia's ``adjust_hue`` in a closed form
(see :func:`hue`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from kornia.color import rgb_to_grayscale
from kornia.filters import filter2d_separable, get_gaussian_kernel1d

from ..utils.checks import is_int, is_real

__all__ = [
    "BRIGHTNESS",
    "CONTRAST",
    "HUE",
    "JITTER_NAMES",
    "SATURATION",
    "blur_kernel_size",
    "color_jitter",
    "gaussian_blur",
    "grayscale",
    "hue",
    "jitter_factors",
    "jitter_positions",
    "solarize",
]

#: Indices of the four colour-jitter operations, in the order of the ``jitter`` argument.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
JITTER_NAMES = ("brightness", "contrast", "saturation", "hue")


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
    if not is_int(side):
        raise TypeError(f"side must be a positive int (image side in pixels); got {side!r}")
    if side <= 0:
        raise ValueError(f"side must be a positive int (image side in pixels); got {side}")
    if not is_real(fraction):
        raise TypeError(f"fraction must be a positive float such as 0.1; got {fraction!r}")
    if not (math.isfinite(fraction) and fraction > 0):
        raise ValueError(f"fraction must be a positive float such as 0.1; got {fraction}")
    k = int(math.floor(fraction * int(side) + 0.5))
    if k % 2 == 0:
        k += 1
    return max(k, 3)


def hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Shift the hue of RGB images by ``factor`` turns per sample (torchvision's unit, ``[-0.5, 0.5]``).

    The result is kornia's ``adjust_hue`` (RGB -> HSV, hue rotated, HSV -> RGB; equal to within 2e-6, see
    ``tests/test_augmentations.py``) computed in fewer full-image passes: the hue ``h`` in sextants is taken
    from the maximal channel as kornia does, shifted, and each output channel is
    ``v - v * s * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + h) mod 6`` and ``n = 5, 3, 1`` for R, G, B (the
    closed form of the HSV sextant table), where ``v * s`` is the chroma ``max - min``. Faster than
    ``adjust_hue`` (no gather and a third of its ``torch.where`` passes; figures in benchmarks/RESULTS.md).
    """
    r, g, b = x.unbind(-3)
    v = x.amax(-3)
    chroma = v - x.amin(-3)
    # kornia's v * s is v * chroma / (v + 1e-8): chroma to within 1e-8 (chroma <= v), and exactly 0 for black
    # and gray pixels, so chroma itself stands in for it below (two fewer full-image passes than computing s)
    inv = 1.0 / torch.where(chroma == 0, 1.0, chroma)  # gray pixels: hue 0, and chroma 0 keeps them gray
    turn = torch.where(
        (r >= g) & (r >= b), (g - b) * inv, torch.where(g >= b, (b - r) * inv + 2.0, (r - g) * inv + 4.0)
    )
    turn = turn + (6.0 * factor).view(-1, 1, 1)
    turn = turn - 6.0 * torch.floor(turn * (1.0 / 6.0))  # [0, 6)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = turn + n
        k = torch.where(k >= 6.0, k - 6.0, k)
        channels.append(torch.addcmul(v, chroma, torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0), value=-1.0))
    return torch.stack(channels, dim=-3)


def jitter_positions(keys: torch.Tensor, ops: Sequence[int]) -> torch.Tensor:
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
    blend = [i for i, op in enumerate(ops) if op != HUE]
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
            if ops[i] == CONTRAST:
                use_mean = chosen.view(-1, 1, 1, 1)
            elif ops[i] == SATURATION:
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


def color_jitter(
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
        positions: ``(B, len(ops))`` step of each op for each sample, see :func:`jitter_positions`.

    Returns:
        The jittered images; samples with ``apply`` false are returned bit for bit.

    A sample's order splits into the blend ops before its hue shift, the hue shift, and the blend ops after
    it. The blend ops before hue run in ``n`` fused slots (``n`` = enabled blend ops; slot ``k`` holds each
    sample's op at step ``k`` when that comes before its hue), then hue runs once on the whole batch, then the
    blend ops after hue run in ``n`` more slots. So the cost is one hue evaluation and at most ``2 n`` cheap
    fused passes, with no loop over samples, no data-dependent subset (whose size would have to be read
    back from the GPU) and no host synchronization.
    """
    if HUE not in ops:
        return _blend_slots(x, apply, ops, factors, positions)
    hue_index = list(ops).index(HUE)
    hue_step = positions[:, hue_index : hue_index + 1]
    before = torch.where(positions < hue_step, positions, -1)
    after = torch.where(positions > hue_step, positions - hue_step - 1, -1)
    x = _blend_slots(x, apply, ops, factors, before)
    shifted = hue(x, factors[hue_index])
    x = shifted if apply is None else torch.where(apply.view(-1, 1, 1, 1), shifted, x)
    return _blend_slots(x, apply, ops, factors, after)


def jitter_factors(uniform: torch.Tensor, strengths: Sequence[float], ops: Sequence[int]) -> list[torch.Tensor]:
    """Each enabled jitter op's ``(B,)`` factor, torchvision ``ColorJitter``'s ranges, from ``(B, 4)`` uniforms.

    Brightness, contrast and saturation factors are uniform in ``[max(0, 1 - s), 1 + s]``, the hue shift in
    ``[-s, s]`` turns, for the op's strength ``s``; column ``op`` of ``uniform`` is op ``op``'s draw.
    """
    factors = []
    for op in ops:
        strength = strengths[op]
        if op == HUE:
            low, high = -strength, strength
        else:
            low, high = max(0.0, 1.0 - strength), 1.0 + strength
        factors.append(low + (high - low) * uniform[:, op])
    return factors


def grayscale(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """RGB images ``x`` converted to grayscale (ITU-R 601 luma, replicated to 3 channels) where ``chosen`` ``(B,)``."""
    gray = rgb_to_grayscale(x).expand_as(x)
    return torch.where(chosen.view(-1, 1, 1, 1), gray, x)


def gaussian_blur(
    x: torch.Tensor, sigma: torch.Tensor, kernel_size: tuple[int, int], chosen: torch.Tensor | None
) -> torch.Tensor:
    """Blur each sample with its own isotropic ``sigma`` ``(B,)``, a ``(kH, kW)`` separable kernel, reflect padding.

    One grouped depthwise convolution with one kernel per sample; ``chosen`` ``(B,)`` keeps the blurred image
    only where true (``None``: every sample is blurred).
    """
    sigma = sigma.unsqueeze(1)
    k_h, k_w = kernel_size
    blurred = filter2d_separable(
        x, get_gaussian_kernel1d(k_w, sigma), get_gaussian_kernel1d(k_h, sigma), border_type="reflect"
    )
    if chosen is not None:
        blurred = torch.where(chosen.view(-1, 1, 1, 1), blurred, x)
    return blurred


def solarize(x: torch.Tensor, chosen: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x -> 1 - x`` for the pixels ``>= threshold`` of the samples where ``chosen`` ``(B,)``."""
    return torch.where(chosen.view(-1, 1, 1, 1) & (x >= threshold), 1.0 - x, x)
