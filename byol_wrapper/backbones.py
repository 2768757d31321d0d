"""The backbones ``byol-train`` builds by name (torchvision, ``timm:``, ``hf:``, ``MODULE:CALLABLE``) and the CIFAR stem.

A library module: the command line, the demo and the examples import it, it imports none of them.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from typing import Any

import torch
from torch import nn

from .utils.checks import check_int

__all__ = ["SmallCNN", "apply_cifar_stem", "build_backbone"]

def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """Replaces a ResNet's stem by a 3x3 stride-1 ``conv1`` and removes its max-pool (for 32 px images).

    Args:
        model: A ResNet-style model with a ``conv1`` ``nn.Conv2d`` and a ``maxpool`` attribute (modified in
            place).

    Returns:
        ``model``.

    Raises:
        ValueError: The model has no ``conv1`` convolution or no ``maxpool``.
    """
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(
            f"--cifar-stem needs a ResNet-style model with a conv1 convolution and a maxpool layer; "
            f"{type(model).__name__} has none. Drop --cifar-stem for this backbone"
        )
    new = nn.Conv2d(conv1.in_channels, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    model.conv1 = new.to(conv1.weight.device, conv1.weight.dtype)
    model.maxpool = nn.Identity()
    return model


def build_backbone(
    name: str, *, cifar_stem: bool = False, channels: int | None = None, pretrained: bool = True, **kwargs: Any
) -> nn.Module:
    """Creates a randomly initialised backbone by name, as ``byol-train`` does.

    Use it to rebuild the module that ``OUT/backbone.pt`` loads into:
    ``build_backbone("resnet18", cifar_stem=True).load_state_dict(torch.load("OUT/backbone.pt"))``.

    Args:
        name: A torchvision model name (``torchvision.models.list_models()``), ``"timm:NAME"`` for a timm model
            (a name torchvision does not know is also tried in timm when timm is installed), or
            ``"MODULE:CALLABLE"`` for any importable class or function that returns an ``nn.Module`` (e.g.
            ``"byol_wrapper.demo:SmallCNN"`` or ``"mypkg.models:MyNet"``; the module must be importable, so run
            from its folder or install it).
            ``"hf:MODEL_ID_OR_PATH"`` builds a Hugging Face ``transformers`` vision model (``AutoModel``) from a
            local folder written by ``save_pretrained`` or a hub id.
        cifar_stem: Apply :func:`apply_cifar_stem`.
        channels: Input channels: timm models get ``in_chans``, ``hf:`` models ``num_channels``, torchvision
            models their first convolution adapted (:func:`byol_wrapper.channels.adapt_first_conv`);
            ``MODULE:CALLABLE`` models are used as built. ``None``: the model's default (3).
        pretrained: ``hf:`` models only: load the pretrained weights (``False``: random init from the config).
        **kwargs: Passed to the model builder (e.g. ``num_classes``).

    Returns:
        The model, with random weights (``weights=None``), except ``hf:`` models with ``pretrained``.

    Raises:
        TypeError: ``name`` is not a string, the builder rejects ``kwargs``, or a ``MODULE:CALLABLE`` is not
            callable or does not return an ``nn.Module``.
        ValueError: Unknown name (with the closest torchvision names), timm requested but not installed, a
            ``MODULE:CALLABLE`` whose module cannot be imported or has no such attribute, or ``cifar_stem`` on a
            model without a ResNet stem.
    """
    import torchvision

    if not isinstance(name, str) or not name:
        raise TypeError(f"backbone must be a model name such as 'resnet18', got {name!r}")
    if channels is not None and name.startswith("timm:"):
        kwargs = {"in_chans": channels, **kwargs}
    if name.startswith("timm:"):
        model = _timm_model(name[len("timm:") :], kwargs)
    elif name.startswith("hf:"):
        model = _hf_model(name[len("hf:") :], pretrained, channels, kwargs)
    elif ":" in name:
        model = _imported_model(name, kwargs)
    else:
        try:
            builder = torchvision.models.get_model_builder(name)
        except ValueError:
            try:
                import timm  # noqa: F401
            except ImportError:
                close = difflib.get_close_matches(name, torchvision.models.list_models(), n=5)
                hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
                raise ValueError(f"--backbone {name!r} is not a torchvision model (and timm is not installed){hint}") from None
            try:
                model = _timm_model(name, {"in_chans": channels, **kwargs} if channels is not None else kwargs)
            except ValueError:
                import timm

                if name in timm.list_models():
                    raise
                close = difflib.get_close_matches(name, [*torchvision.models.list_models(), *timm.list_models()], n=5)
                hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models() and timm.list_models()"
                raise ValueError(f"--backbone {name!r} is neither a torchvision nor a timm model{hint}") from None
        else:
            model = builder(weights=None, **kwargs)
            if channels is not None:
                from .channels import adapt_first_conv

                adapt_first_conv(model, channels)
    if cifar_stem:
        apply_cifar_stem(model)
    return model


def _hf_model(spec: str, pretrained: bool, channels: int | None, kwargs: dict[str, Any]) -> nn.Module:
    """A ``transformers`` vision model from a folder or hub id: pretrained, or random from its config."""
    if not spec:
        raise ValueError("write hf:MODEL_ID_OR_PATH, e.g. hf:facebook/dinov2-small or hf:./my_vit (a save_pretrained folder)")
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError:
        raise ValueError(f"--backbone hf:{spec} needs transformers; install it with `pip install transformers`") from None
    overrides = dict(kwargs)
    if channels is not None:
        overrides["num_channels"] = channels
    try:
        config = AutoConfig.from_pretrained(spec, **overrides)
    except Exception as exc:  # noqa: BLE001 - OSError (not found, offline), ValueError (not a model config)
        raise ValueError(f"cannot read the configuration of hf:{spec} ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    if channels is not None and not hasattr(config, "num_channels"):
        raise ValueError(f"hf:{spec} ({type(config).__name__}) has no num_channels setting, so --channels cannot be applied")
    if not pretrained:
        return AutoModel.from_config(config)
    try:
        return AutoModel.from_pretrained(spec, config=config)
    except Exception as exc:  # noqa: BLE001 - no weights file, offline hub, or weights that do not fit the config
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"cannot load the pretrained weights of hf:{spec} ({type(exc).__name__}: {first}); pass --no-pretrained to "
            "start from random weights"
            + (", or drop --channels to keep the pretrained number of input channels" if channels is not None else "")
        ) from exc


def _imported_model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    """Builds ``MODULE:CALLABLE`` (``CALLABLE`` may be dotted, e.g. ``pkg.mod:Outer.build``) with ``kwargs``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"--backbone {spec!r}: write MODULE:CALLABLE with one colon, e.g. mypkg.models:MyNet")
    # Like `python -m` (and unlike a console script, whose sys.path starts with its bin folder), a module in the
    # current folder is importable: `byol-train --backbone mynets:Net` run next to mynets.py finds it.
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)  # appended: never shadows an installed package
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"--backbone {spec!r}: cannot import module {module_name!r} ({exc}); install it, or run from the folder "
            "that holds it"
        ) from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([module_name, *attr.split(".")[:i]])
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; it has {', '.join(names[:20]) or 'no public names'}"
            raise ValueError(f"--backbone {spec!r}: {owner} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"--backbone {spec!r}: {attr} is a {type(obj).__name__}, not a class or function building a model")
    model = obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"--backbone {spec!r}: {attr}(...) returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _timm_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ValueError(f"--backbone timm:{name} needs timm; install it with `pip install timm`") from None
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:  # timm raises RuntimeError("Unknown model ...")
        raise ValueError(f"--backbone {name!r}: {exc}") from exc


class SmallCNN(nn.Module):
    """A small convolutional backbone for the demo: ``depth`` blocks of 3x3 conv, BatchNorm and ReLU.

    Block ``i`` has ``width * 2**i`` channels and all but the last end in a 2x2 max-pool; ``pool`` averages the
    last feature map and ``flatten`` makes it a vector, so ``hidden_layer="pool"`` (or ``-1``, the output) is the
    representation. The defaults (32, 64, 128 channels) have 0.1 M parameters and take about 2.6 M multiply-adds
    per 16 px image.

    Args:
        width: Channels of the first block (>= 1).
        depth: Number of blocks (>= 1).
        in_channels: Channels of the input images (>= 1).

    Raises:
        TypeError: If an argument is not an int.
        ValueError: If an argument is below 1.
    """

    def __init__(self, width: int = 32, depth: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        width = check_int("width", width, 1)
        depth = check_int("depth", depth, 1)
        channels = check_int("in_channels", in_channels, 1)
        layers: list[nn.Module] = []
        for i in range(depth):
            out = width * 2**i
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            if i < depth - 1:
                layers.append(nn.MaxPool2d(2))
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        #: Size of the representation.
        self.num_features = channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images -> ``(N, num_features)`` features."""
        return self.flatten(self.pool(self.features(x)))
