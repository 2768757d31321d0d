"""BYOL pretraining with Hugging Face Accelerate.

Run it on random tensors, or on a folder of images (an ImageFolder tree or a flat folder)::

    python examples/accelerate_byol.py --steps 20
    accelerate launch --num_processes 2 examples/accelerate_byol.py --data /path/to/images --steps 10000

(The file is not called ``accelerate.py``: run as a script, that name would shadow the ``accelerate`` package.)

Points that matter:

* ``accelerator.prepare(learner)`` wraps the learner itself in DDP, which reads the learner's
  ``_ddp_params_and_buffers_to_ignore``: the layers after ``hidden_layer`` need no ``find_unused_parameters``.
* With gradient accumulation the target moves once per optimizer step: on the micro-batch where
  ``accelerator.sync_gradients`` is true.
* ``--mixed-precision bf16`` (or ``fp16`` on GPUs) autocasts the networks; the augmentations stay float32.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torchvision
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from byol_wrapper import BYOL
from byol_wrapper.distributed import unwrap, update_moving_average


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="image folder; random tensors when omitted")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--arch", default="resnet18", help="a torchvision model name, or 'tiny' (a small CNN for smoke tests)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--cpu", action="store_true", help="force the CPU")
    parser.add_argument("--workers", type=int, default=0)
    return parser


def build_backbone(arch: str) -> nn.Module:
    """A torchvision model by name (with ``avgpool`` and ``fc`` like the ResNets), or a small CNN of that shape."""
    if arch != "tiny":
        return torchvision.models.get_model(arch)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 16, 3, stride=2, padding=1), bn1=nn.BatchNorm2d(16), relu=nn.ReLU(inplace=True),
        conv2=nn.Conv2d(16, 32, 3, stride=2, padding=1), bn2=nn.BatchNorm2d(32), relu2=nn.ReLU(inplace=True),
        avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(32, 10),
    ))


def make_loader(args: argparse.Namespace) -> DataLoader:
    if args.data is None:
        images = torch.randint(0, 256, (max(4, args.batch_size * 2), 3, args.image_size, args.image_size), dtype=torch.uint8)
        return DataLoader(TensorDataset(images), batch_size=args.batch_size, shuffle=True, drop_last=True)
    from byol_wrapper.data import ImageFolderDataset, collate_pairs

    dataset = ImageFolderDataset(args.data, load_size=args.image_size)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers, collate_fn=collate_pairs)


def main(argv: Sequence[str] | None = None) -> BYOL:
    """Trains for ``--steps`` optimizer steps and returns the (unwrapped) learner."""
    args = build_parser().parse_args(argv)
    accelerator = Accelerator(gradient_accumulation_steps=args.accumulate, mixed_precision=args.mixed_precision, cpu=args.cpu)
    net = build_backbone(args.arch)
    learner = BYOL(net, args.image_size, hidden_layer="avgpool", total_steps=args.steps)
    opt = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=args.lr)
    model, opt, loader = accelerator.prepare(learner, opt, make_loader(args))

    step, loss = 0, None
    while step < args.steps:
        for batch in loader:
            images = batch[0]
            if images.shape[0] < 2:  # every image of the batch was unreadable
                continue
            with accelerator.accumulate(model):
                loss = model(images)
                accelerator.backward(loss)
                opt.step()  # a no-op on the micro-batches that only accumulate
                opt.zero_grad()
            if accelerator.sync_gradients:  # an optimizer step happened: move the target once
                update_moving_average(model)
                step += 1
                if step >= args.steps:
                    break
    if accelerator.is_main_process and loss is not None:
        print(f"steps {step}, ema steps {unwrap(model).step}, loss {float(loss.detach()):.4f}")
    return unwrap(model)


if __name__ == "__main__":
    main()
