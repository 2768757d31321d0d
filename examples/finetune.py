"""Fine-tune (or linearly evaluate) a BYOL-pretrained ResNet-18 on a labelled ImageFolder.

Loads ``backbone.pt`` -- the plain ResNet-18 ``state_dict`` written by ``byol-train`` or ``examples/cifar10.py``
-- into a classifier (the ResNet-18 with a new ``fc``) and trains it on ``DATA/train/<class>/*``, then reports
the top-1 accuracy on ``DATA/test/<class>/*``. The stem is read from the weights: a 3x3 ``conv1`` gives the
CIFAR stem (stride-1 conv, no max-pool), a 7x7 one the ImageNet stem. Inputs get the ImageNet normalisation
that BYOL's embeddings were trained with.

Modes:

* ``--mode finetune`` (default): the whole network is trained; SGD (momentum 0.9, Nesterov), cosine lr,
  per-sample random crop (padding 1/8 of the side, reflect) and horizontal flip on the device.
* ``--mode linear``: the backbone is frozen (eval mode) and a linear classifier is trained on its cached,
  standardised features (``byol_wrapper.evaluate.linear_probe``: no augmentation, a few seconds per epoch).

Any backbone ``byol-train`` can build is accepted: ``--arch`` takes the same forms as ``byol-train --backbone``
(a torchvision name, ``timm:NAME``, ``MODULE:CALLABLE``) with ``--backbone-kwargs``, ``--cifar-stem`` and
``--hidden-layer``; their defaults are read from the ``config.json`` that ``byol-train`` saves next to
``backbone.pt``, so ``--backbone runs/demo/backbone.pt`` alone rebuilds the demo's SmallCNN. The classifier is then
the backbone's ``--hidden-layer`` representation (pooled to a vector) followed by a new linear layer. Without
``--arch`` and without a ``config.json`` (e.g. the output of ``examples/cifar10.py``), the file must be a
ResNet-18 ``state_dict`` and the ResNet's ``fc`` is replaced, as before. The weights are checked against the model
before any image is decoded.

Images are decoded once into uint8 tensors and cached in ``--cache`` (the loader of ``examples/cifar10.py``), so
this suits small data sets (CIFAR-sized). Runs on CPU.

Grayscale, 16-bit and multi-channel data: pass the ``--channels`` of pretraining (``byol-train --channels N``).
The images are then decoded at full precision by ``byol_wrapper.image_io`` (16-bit PNG/TIFF, multi-page TIFF,
``.npy``; not cached), the ResNet-18's ``conv1`` takes the channel count of the weights, and the inputs get the
default normalisation of that channel count (``byol_wrapper.channels.default_normalization``).

Usage::

    python examples/cifar10.py --data /tmp/cifar10 --out runs/byol --epochs 200
    python examples/finetune.py --backbone runs/byol/backbone.pt --data /tmp/cifar10 --epochs 30
    python examples/finetune.py --backbone runs/byol/backbone.pt --data /tmp/cifar10 --mode linear --epochs 100
    python examples/finetune.py --backbone runs/gray/backbone.pt --data /data/xray16 --channels 1 --epochs 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

try:
    import byol_wrapper  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kornia.augmentation as K

from byol_wrapper import IMAGENET_MEAN, IMAGENET_STD
from byol_wrapper.augmentations import to_float_image
from byol_wrapper.channels import adapt_first_conv, default_normalization
from byol_wrapper.data import LabelledImageFolder, collate_pairs
from byol_wrapper.evaluate import linear_probe
from byol_wrapper.optim import warmup_cosine_lr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10 import (  # the cached uint8 loader of the pretraining example
    load_image_folder,
    pick_device,
    subset,
)

_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers


def _plain_state(path: str | os.PathLike[str]) -> dict:
    if not Path(path).is_file():
        raise SystemExit(f"--backbone {path}: no such file; pass the backbone.pt written by byol-train or cifar10.py")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one clear line
        raise SystemExit(f"--backbone {path} cannot be loaded as a state_dict ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise SystemExit(f"{path} holds a {type(state).__name__}, not a state_dict; save net.state_dict()")
    for prefix in _PREFIXES:
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def saved_config(path: str | os.PathLike[str]) -> dict:
    """The ``config.json`` that ``byol-train`` wrote next to ``path`` (``{}`` when there is none)."""
    config = Path(path).with_name("config.json")
    if not config.is_file():
        return {}
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{config} next to the backbone cannot be read ({exc}); pass --arch explicitly") from None


class Classifier(nn.Module):
    """A backbone's hidden-layer representation (pooled to ``(B, D)``) and a new linear head."""

    def __init__(self, net: nn.Module, hidden_layer: int | str, dim: int, num_classes: int) -> None:
        super().__init__()
        from byol_wrapper.extractor import HiddenLayerExtractor

        self.net = net
        self.features = HiddenLayerExtractor(net, hidden_layer)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build_pretrained(path: str | os.PathLike[str], arch: str, kwargs: dict, cifar_stem: bool,
                     hidden_layer: int | str, image_size: int, channels: int | None = None) -> tuple[nn.Module, int]:
    """The backbone ``arch`` (``byol-train --backbone`` forms) with the weights of ``path``, and its feature size.

    Raises:
        SystemExit: the model cannot be built, or the file does not match it (missing/unexpected keys, shapes).
    """
    from byol_wrapper.extractor import HiddenLayerExtractor
    from byol_wrapper.train import build_backbone

    state = _plain_state(path)
    try:
        net = build_backbone(arch, cifar_stem=cifar_stem, channels=channels, pretrained=False, **kwargs)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--arch {arch}: {exc}") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise SystemExit(f"{path} does not fit --arch {arch} (--backbone-kwargs {json.dumps(kwargs)}, --cifar-stem "
                         f"{cifar_stem}): {str(exc).splitlines()[0]} {str(exc).splitlines()[1:2]}") from None
    try:
        probe = HiddenLayerExtractor(net, hidden_layer)
        net.eval()
        with torch.no_grad():
            dim = probe(torch.zeros(2, channels or 3, image_size, image_size)).shape[1]
        probe.remove_hook()
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"--hidden-layer {hidden_layer!r} of {arch}: {exc}") from None
    return net, int(dim)


def load_backbone(path: str | os.PathLike[str], num_classes: int) -> nn.Module:
    """A ResNet-18 with the weights of ``path`` and a new ``num_classes``-way ``fc``.

    Raises:
        SystemExit: the file is not a ResNet-18 ``state_dict`` (missing or unexpected keys are listed).
    """
    state = _plain_state(path)
    if "conv1.weight" not in state:
        raise SystemExit(f"{path} is not a plain ResNet-18 state_dict (no conv1.weight); save resnet.state_dict()")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the pretraining head, if any, is replaced
    net = torchvision.models.resnet18(num_classes=num_classes)
    if state["conv1.weight"].shape[1] != 3:  # pretrained with byol-train --channels N
        adapt_first_conv(net, int(state["conv1.weight"].shape[1]))
    if state["conv1.weight"].shape[-1] == 3:  # CIFAR stem
        net.conv1 = nn.Conv2d(state["conv1.weight"].shape[1], 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise SystemExit(f"{path} does not match a ResNet-18: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return net


class Normalize(nn.Module):
    """uint8 or [0, 1] images -> ImageNet-normalised float, as BYOL's embeddings saw them."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else default_normalization(channels)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (to_float_image(x) - self.mean) / self.std


def load_channels_folder(root: str | os.PathLike[str], image_size: int, channels: int) -> dict:
    """Like ``cifar10.load_image_folder`` for ``--channels``: float32 images in [0, 1] at full precision, no cache."""
    root = Path(root).expanduser()
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise SystemExit(f"--data {str(root)!r} must contain train/ and test/ ImageFolder splits; {split}/ is missing")
    train = LabelledImageFolder(root / "train", image_size, channels=channels)
    test = LabelledImageFolder(root / "test", image_size, classes=train.classes, channels=channels)
    train_x, train_y = collate_pairs([train[i] for i in range(len(train))])
    test_x, test_y = collate_pairs([test[i] for i in range(len(test))])
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "classes": list(train.classes)}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int = 512) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch_size].to(device)).argmax(1).cpu() == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", required=True, help="backbone.pt: a plain state_dict (byol-train or cifar10.py)")
    p.add_argument("--arch", default=None, help="the model, as byol-train --backbone: torchvision name, timm:NAME or "
                   "MODULE:CALLABLE (default: from config.json next to --backbone, else a ResNet-18)")
    p.add_argument("--backbone-kwargs", type=json.loads, default=None, help="JSON keywords of the model builder "
                   "(default: from config.json)")
    p.add_argument("--cifar-stem", action="store_true", default=None, help="ResNet 3x3 stem (default: from config.json)")
    p.add_argument("--hidden-layer", default=None, help="representation layer (default: from config.json, else -2)")
    p.add_argument("--data", required=True, help="folder with train/<class>/* and test/<class>/*")
    p.add_argument("--mode", choices=("finetune", "linear"), default="finetune")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="default: 0.05 x batch/256 (finetune), 0.1 (linear)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 5e-4 (finetune), 0 (linear)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=None,
                   help="input channels of byol-train --channels (full-precision decoding); default: 8-bit RGB")
    p.add_argument("--train-subset", type=int, default=0, help="use a fixed random subset of N train images (0: all)")
    p.add_argument("--test-subset", type=int, default=0, help="evaluate on N test images (0: all)")
    p.add_argument("--cache", default="/tmp", help="folder for the decoded uint8 tensor cache ('none' to disable)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="optional folder for classifier.pt (finetune) and results.json")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.epochs <= 0 or args.batch_size <= 0:
        p.error("--epochs and --batch-size must be positive")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    config = saved_config(args.backbone)
    arch = args.arch or config.get("backbone")
    # --channels of pretraining: the flag, else the saved config's (None: 8-bit RGB decoding, as before)
    channels_flag = args.channels if args.channels is not None else config.get("channels")
    channels = channels_flag or 3
    pretrained = None
    if arch is not None:  # checked before any image is decoded
        saved_channels = config.get("channels") or 3
        if config and saved_channels != channels:
            raise SystemExit(f"{args.backbone} takes {saved_channels} input channels but --channels is {channels}; "
                             f"pass --channels {saved_channels}")
        kwargs = args.backbone_kwargs if args.backbone_kwargs is not None else config.get("backbone_kwargs", {})
        layer = args.hidden_layer if args.hidden_layer is not None else config.get("hidden_layer", -2)
        layer = int(layer) if isinstance(layer, str) and layer.lstrip("-").isdigit() else layer
        stem = args.cifar_stem if args.cifar_stem is not None else bool(config.get("cifar_stem", False))
        pretrained = (*build_pretrained(args.backbone, arch, kwargs, stem, layer, args.image_size, channels_flag), layer)
    else:
        net = load_backbone(args.backbone, 2)  # a ResNet-18 state_dict? (fails here, before the data)
        if net.conv1.in_channels != channels:
            raise SystemExit(f"{args.backbone} takes {net.conv1.in_channels} input channels but --channels is {channels}; "
                             f"pass --channels {net.conv1.in_channels}")
    if channels_flag is not None:
        data = load_channels_folder(args.data, args.image_size, channels_flag)
    else:
        data = load_image_folder(args.data, args.image_size, None if args.cache.lower() == "none" else args.cache, args.workers)
    train_x, train_y = subset(data["train_x"], data["train_y"], args.train_subset, args.seed)
    test_x, test_y = subset(data["test_x"], data["test_y"], args.test_subset, args.seed + 1)
    num_classes = len(data["classes"])
    if pretrained is not None:
        backbone, dim, layer = pretrained
        net = Classifier(backbone, layer, dim, num_classes)
    else:
        net = load_backbone(args.backbone, num_classes)
    t0 = time.perf_counter()

    if args.mode == "linear":
        net.fc = nn.Identity()
        encoder = nn.Sequential(Normalize(channels), net).to(device)
        res = linear_probe(encoder, (train_x, train_y), (test_x, test_y), epochs=args.epochs,
                           lr=args.lr if args.lr is not None else 0.1,
                           weight_decay=args.weight_decay if args.weight_decay is not None else 0.0, batch_size=args.batch_size, device=device,
                           num_classes=num_classes, seed=args.seed)
        train_acc, test_acc = res["train_accuracy"], res["test_accuracy"]
    else:
        model = nn.Sequential(Normalize(channels), net).to(device)
        side = args.image_size
        augment = nn.Sequential(K.RandomCrop((side, side), padding=max(1, side // 8), padding_mode="reflect"),
                                K.RandomHorizontalFlip())
        lr = (args.lr if args.lr is not None else 0.05) * args.batch_size / 256
        wd = args.weight_decay if args.weight_decay is not None else 5e-4
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
        steps_per_epoch = -(-len(train_x) // args.batch_size)
        total, step = args.epochs * steps_per_epoch, 0
        for epoch in range(args.epochs):
            model.train()
            perm = torch.randperm(len(train_x))
            loss_sum = correct = 0.0
            for i in range(steps_per_epoch):
                idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
                if len(idx) < 2:  # BatchNorm needs 2 samples
                    continue
                x = augment(to_float_image(train_x[idx].to(device)))
                y = train_y[idx].to(device)
                for group in opt.param_groups:
                    group["lr"] = warmup_cosine_lr(step, total, 0, lr)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += loss.item() * len(idx)
                correct += float((logits.argmax(1) == y).sum())
            print(f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / len(train_x):.4f}, "
                  f"train top-1 (augmented) {100 * correct / len(train_x):.2f}%", flush=True)
        train_acc = accuracy(model, train_x, train_y, device)
        test_acc = accuracy(model, test_x, test_y, device)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            torch.save(net.state_dict(), Path(args.out) / "classifier.pt")

    results = {"mode": args.mode, "epochs": args.epochs, "train_top1": train_acc, "test_top1": test_acc,
               "seconds": round(time.perf_counter() - t0, 1), "classes": data["classes"], "args": vars(args)}
    print(f"{args.mode}: train top-1 {100 * train_acc:.2f}%, test top-1 {100 * test_acc:.2f}% "
          f"({len(train_x)} train / {len(test_x)} test images, {num_classes} classes, {results['seconds']:.0f} s)")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
