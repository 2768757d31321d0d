"""Channel counts other than RGB: default normalisation statistics and first-convolution adaptation.

The default statistics per channel count (:func:`default_normalization`, :data:`LUMA_WEIGHTS`) are defined, with
ImageNet's, in :mod:`byol_wrapper.augmentations.normalize` and re-exported here: ImageNet's RGB statistics for 3
channels, their luminance equivalent (``mean=(0.459,)``, ``std=(0.226,)``) for every channel otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .augmentations.normalize import LUMA_WEIGHTS, default_normalization

__all__ = ["LUMA_WEIGHTS", "adapt_first_conv", "channel_mismatch_message", "default_normalization"]


def _adapt_weight(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """timm's ``adapt_input_conv`` rule: 1 channel sums the RGB filters; N repeats them, scaled by 3 / N."""
    old = weight.shape[1]
    if channels == old:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = int(math.ceil(channels / old))
    return weight.repeat(1, repeat, 1, 1)[:, :channels] * (old / channels)


def adapt_first_conv(model: nn.Module, channels: int) -> nn.Module:
    """Makes the first ``nn.Conv2d`` of ``model`` take ``channels`` input channels, as timm's ``in_chans`` does.

    The convolution is replaced by one with the same settings and ``channels`` inputs, whose weight is derived
    from the old one by timm's ``adapt_input_conv`` rule (1 channel: the RGB filters summed; N channels: the
    filters repeated and scaled by ``3 / N``), so the output scale at initialisation is kept. Used by
    ``byol-train --channels`` on the built-in (torchvision) backbones; modifies ``model`` in place.

    Args:
        model: The network; its first ``nn.Conv2d`` (in ``named_modules()`` order) is adapted.
        channels: The new number of input channels.

    Returns:
        ``model``.

    Raises:
        ValueError: ``channels`` is not a positive int, or ``model`` has no ``nn.Conv2d``, or a grouped one.
    """
    if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            break
    else:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d whose input channels could be set to {channels}")
    if conv.in_channels == channels:
        return model
    if conv.groups != 1:
        raise ValueError(f"the first convolution {name!r} of {type(model).__name__} is grouped; cannot adapt it to {channels} channels")
    new = nn.Conv2d(
        channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(_adapt_weight(conv.weight, channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    return model


def _first_conv(net: nn.Module) -> tuple[str, nn.Module] | None:
    """The first ``nn.Conv2d``/``nn.Conv3d`` of ``net`` with its name (the one ``BYOL`` reads ``channels`` from)."""
    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            return name, module
    return None


def _convert_images_hint(got: int, want: int) -> str:
    if got == 1:
        return f"pass {want}-channel images (a grayscale batch repeated: x.expand(-1, {want}, -1, -1))"
    if got == 3 and want == 1:
        return "pass 1-channel images (RGB to grayscale: kornia.color.rgb_to_grayscale(x))"
    if got == 4 and want == 3:
        return "pass 3-channel images (RGBA without its alpha channel: x[:, :3])"
    return f"pass {want}-channel images"


def channel_mismatch_message(net: nn.Module, channels: int, shape: tuple[int, ...]) -> str:
    """Why a batch of ``shape`` does not fit a learner of ``channels`` around ``net``, and how to fix it.

    Names the learner's ``channels=``, the backbone's first convolution (module name and ``in_channels``) it is
    read from, and the fixes: convert the images, or build the backbone (and the learner) for the images'
    channel count.
    """
    got = int(shape[1])
    found = _first_conv(net)
    head = f"x must have {channels} channel{'s' if channels != 1 else ''}: this learner takes channels={channels}"
    if found is None:
        head += " (the channels= given to BYOL, or 3: the backbone has no nn.Conv2d/nn.Conv3d to read it from)"
        fix = f"or pass channels={got} to BYOL if the backbone takes {got}-channel images"
    else:
        name, conv = found
        conv_desc = f"{name!r} (nn.{type(conv).__name__}, in_channels={conv.in_channels})"
        if conv.in_channels == channels:
            head += f", read from the backbone's first convolution {conv_desc}"
        else:
            head += f" as given to BYOL, while the backbone's first convolution is {conv_desc}"
        if conv.in_channels == got:
            fix = f"or build the learner without channels= (or with channels={got}) so that it matches the backbone"
        else:
            how = f"byol_wrapper.channels.adapt_first_conv(net, {got}), " if isinstance(conv, nn.Conv2d) else ""
            fix = (
                f"or build the backbone with {got} input channel{'s' if got != 1 else ''} ({how}"
                f"timm.create_model(..., in_chans={got}), or {name} = nn.{type(conv).__name__}({got}, ...)) and the "
                "learner on it: channels= is read from its first convolution"
            )
    head += f"; got {got} channel{'s' if got != 1 else ''}, shape {tuple(shape)}"
    if shape[-1] == channels and got != channels:
        return f"{head}. The images look channels-last (B, H, W, C): use x.permute(0, 3, 1, 2)"
    return f"{head}. Either {_convert_images_hint(got, channels)}, {fix}"
