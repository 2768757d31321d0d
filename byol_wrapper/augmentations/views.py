"""The BYOL augmentation view (:class:`BYOLView`) and the paper's pair of views (:func:`byol_views`).

A view validates its settings once, at construction; per forward pass it checks the images, draws one
:class:`~byol_wrapper.augmentations.params.ViewParams` (one ``torch.rand`` call on the input's device) and applies
the geometric (``geometric.py``) and intensity (``intensity.py``) ops with those parameters, on the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..utils.checks import check_choice, check_pair, check_probability, check_size, check_stats, is_int, is_real
from .geometric import crop_boxes, resized_crop
from .images import check_images, float32_image
from .intensity import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    JITTER_NAMES,
    blur_kernel_size,
    color_jitter,
    gaussian_blur,
    grayscale,
    jitter_factors,
    jitter_positions,
    solarize,
)
from .normalize import IMAGENET_MEAN, IMAGENET_STD
from .params import ViewParams

__all__ = ["BYOLView", "byol_views"]

_INTERPOLATIONS = ("bilinear", "bicubic")


def _check_kernel_size(blur_kernel: Any, size: tuple[int, int]) -> tuple[int, int]:
    """``blur_kernel_size``: ``None`` (:func:`blur_kernel_size` of each side), an odd int or an odd ``(kH, kW)``."""
    if blur_kernel is None:
        return blur_kernel_size(size[0]), blur_kernel_size(size[1])
    if is_int(blur_kernel):
        kernel = (int(blur_kernel), int(blur_kernel))
    elif (
        isinstance(blur_kernel, Sequence)
        and not isinstance(blur_kernel, (str, bytes))
        and len(blur_kernel) == 2
        and all(is_int(v) for v in blur_kernel)
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


# On the CPU the views transform the batch in slices of about this many output values (4 MiB of float32 per
# tensor). Each of the ~50 intermediate tensors of a view is then small enough for the allocator to reuse
# its memory, where a whole batch's worth (e.g. 77 MB at 224 px, batch 128) is mapped afresh from the OS and
# page-faulted in every time: much faster at 224 px with glibc's malloc (figures in benchmarks/RESULTS.md), and
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
        self.image_size: tuple[int, int] = check_size("image_size", image_size)

        lo, hi = check_pair("crop_scale", crop_scale, "the crop's area fraction, e.g. (0.08, 1.0)")
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(
                f"crop_scale must satisfy 0 < low <= high <= 1 (fractions of the input area), e.g. (0.08, 1.0); "
                f"got {crop_scale!r}"
            )
        self.crop_scale = (lo, hi)
        lo, hi = check_pair("crop_ratio", crop_ratio, "the crop's width / height, e.g. (3/4, 4/3)")
        if not 0.0 < lo <= hi:
            raise ValueError(
                f"crop_ratio must satisfy 0 < low <= high (aspect ratios width / height), e.g. (3/4, 4/3); "
                f"got {crop_ratio!r}"
            )
        self.crop_ratio = (lo, hi)

        self.flip_p = check_probability("flip_p", flip_p)
        if (
            isinstance(jitter, (str, bytes))
            or not isinstance(jitter, Sequence)
            or len(jitter) != 4
            or not all(is_real(v) for v in jitter)
        ):
            raise TypeError(
                f"jitter must be four floats (brightness, contrast, saturation, hue), e.g. (0.4, 0.4, 0.2, 0.1); "
                f"got {jitter!r}"
            )
        jit = tuple(float(v) for v in jitter)
        for name, value in zip(JITTER_NAMES, jit):
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"jitter {name} strength must be a finite number >= 0 (0 disables it); got {value}")
        if jit[HUE] > 0.5:
            raise ValueError(f"jitter hue strength must be in [0, 0.5] (a fraction of a full turn); got {jit[HUE]}")
        self.jitter: tuple[float, float, float, float] = jit  # type: ignore[assignment]
        self.jitter_p = check_probability("jitter_p", jitter_p)
        self.grayscale_p = check_probability("grayscale_p", grayscale_p)

        self.blur_p = check_probability("blur_p", blur_p)
        lo, hi = check_pair("blur_sigma", blur_sigma, "the blur's standard deviation in pixels, e.g. (0.1, 2.0)")
        if not 0.0 < lo <= hi:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high (pixels), e.g. (0.1, 2.0); got {blur_sigma!r}")
        self.blur_sigma = (lo, hi)
        self.blur_kernel_size: tuple[int, int] = _check_kernel_size(blur_kernel_size, self.image_size)
        if self.blur_p > 0 and any(k // 2 >= s for k, s in zip(self.blur_kernel_size, self.image_size)):
            raise ValueError(
                f"blur_kernel_size {self.blur_kernel_size} is too large for image_size {self.image_size}: the "
                "reflect padding needs kernel_size // 2 < side. Pass a smaller odd blur_kernel_size or blur_p=0"
            )

        self.solarize_p = check_probability("solarize_p", solarize_p)
        if not is_real(solarize_threshold):
            raise TypeError(f"solarize_threshold must be a float in [0, 1]; got {solarize_threshold!r}")
        if not 0.0 <= float(solarize_threshold) <= 1.0:
            raise ValueError(f"solarize_threshold must be in [0, 1] (0.5 in the paper); got {solarize_threshold}")
        self.solarize_threshold = float(solarize_threshold)

        self.mean = check_stats("mean", mean, positive=False)
        self.std = check_stats("std", std, positive=True)
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(
                f"mean and std must have the same length, one value per channel; got {len(self.mean)} and "
                f"{len(self.std)} values"
            )
        self.interpolation = check_choice("interpolation", interpolation, _INTERPOLATIONS)
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

    def _sample(self, batch: int, device: torch.device) -> ViewParams:
        """The random parameters of one forward pass over ``batch`` samples (one RNG call)."""
        return ViewParams.draw(batch, device)

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
        check_images(x)
        return self._augment(x)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for images whose type, rank and dtype were checked already (the learner's input).

        Checks only what the view itself requires of the batch: at least one channel and pixel, and one
        normalization value per channel.
        """
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
            params = self._sample(batch, x.device)
            chunk = _cpu_chunk(x, channels * out_h * out_w)
            if chunk >= batch:
                return self._transform(float32_image(x), params)
            # Every op is per sample, so transforming the batch in slices gives the same result bit for bit.
            out = torch.empty(batch, channels, out_h, out_w, dtype=torch.float32)
            for start in range(0, batch, chunk):
                stop = start + chunk
                out[start:stop] = self._transform(float32_image(x[start:stop]), params.narrow(start, stop))
            return out

    def _transform(self, x: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """Transform float32 images ``x`` with the random parameters ``params`` (see :meth:`_sample`)."""
        rgb = x.shape[1] == 3

        # 1-2. random resized crop + horizontal flip, one resampling pass
        top, left, h, w = crop_boxes(params, x.shape[-2], x.shape[-1], self.crop_scale, self.crop_ratio)
        flip = params.flip < self.flip_p if self.flip_p > 0 else None
        x = resized_crop(x, top, left, h, w, flip, self.image_size, self.interpolation)

        # 3. colour jitter, per-sample op order and factors
        ops = [op for op in range(4) if self.jitter[op] > 0 and (rgb or op in (BRIGHTNESS, CONTRAST))]
        if self.jitter_p > 0 and ops:
            factors = jitter_factors(params.factors, self.jitter, ops)
            apply = params.jitter < self.jitter_p if self.jitter_p < 1 else None
            x = color_jitter(x, apply, ops, factors, jitter_positions(params.order, ops))

        # 4. grayscale (RGB only)
        if rgb and self.grayscale_p > 0:
            x = grayscale(x, params.gray < self.grayscale_p)

        # 5. Gaussian blur, per-sample sigma
        if self.blur_p > 0:
            low, high = self.blur_sigma
            sigma = low + (high - low) * params.sigma
            x = gaussian_blur(x, sigma, self.blur_kernel_size, params.blur < self.blur_p if self.blur_p < 1 else None)

        # 6. solarize
        if self.solarize_p > 0:
            x = solarize(x, params.solarize < self.solarize_p, self.solarize_threshold)

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
