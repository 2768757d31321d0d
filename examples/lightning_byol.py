"""BYOL pretraining with PyTorch Lightning: a LightningModule around the learner.

Run it on random tensors, or on a folder of images (an ImageFolder tree or a flat folder)::

    python examples/lightning_byol.py --steps 20
    python examples/lightning_byol.py --data /path/to/images --steps 10000 --devices 2 --strategy ddp

(The file is not called ``lightning.py``: run as a script, that name would shadow the ``lightning`` package.)

Points that matter:

* The EMA target moves once per *optimizer step*: ``on_train_batch_end`` runs after every batch, so it compares
  ``learner.step`` with ``trainer.global_step`` (which counts optimizer steps), which also holds with
  ``accumulate_grad_batches > 1`` and when resuming from a checkpoint (``learner.step`` is in the state dict).
* Under DDP (``--strategy ddp``) the module exposes ``_ddp_params_and_buffers_to_ignore``, so the layers after
  ``hidden_layer`` (``fc`` after ``"avgpool"``) need no ``find_unused_parameters=True``.
* ``Trainer(sync_batchnorm=True)`` converts every BatchNorm of the module (backbone, heads and target) on GPUs;
  ``--precision bf16-mixed`` works, the augmentations stay float32.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from collections.abc import Sequence

import lightning as L
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from byol_wrapper import BYOL
from byol_wrapper.distributed import params_to_ignore


class BYOLModule(L.LightningModule):
    """BYOL pretraining of ``net`` as a LightningModule.

    Args:
        net: The backbone.
        image_size: Size of the augmented views.
        lr: Adam learning rate.
        total_steps: Optimizer steps of training, for the cosine tau schedule (``None``: constant tau).
        **byol_kwargs: Further :class:`byol_wrapper.BYOL` arguments (``hidden_layer``, ``projection_size``, ...).
    """

    def __init__(self, net: nn.Module, image_size: int, lr: float = 3e-4, total_steps: int | None = None, **byol_kwargs) -> None:
        super().__init__()
        self.learner = BYOL(net, image_size, total_steps=total_steps, **byol_kwargs)
        self.lr = lr

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        # DDP wraps this module, not the learner: forward the learner's list of parameters without gradient.
        return params_to_ignore(self)

    def training_step(self, batch: torch.Tensor | Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        if images.shape[0] < 2:  # every image of the batch was unreadable: skip it
            return None
        loss = self.learner(images)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # global_step counts optimizer steps: update the target once per step, not per (accumulated) batch.
        if self.learner.step < self.trainer.global_step:
            self.learner.update_moving_average()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.learner.parameters() if p.requires_grad], lr=self.lr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="image folder; random tensors when omitted")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--arch", default="resnet18", help="a torchvision model name, or 'tiny' (a small CNN for smoke tests)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed, 16-mixed")
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


def main(argv: Sequence[str] | None = None) -> BYOLModule:
    """Trains for ``--steps`` optimizer steps and returns the module."""
    args = build_parser().parse_args(argv)
    net = build_backbone(args.arch)
    module = BYOLModule(net, args.image_size, lr=args.lr, total_steps=args.steps, hidden_layer="avgpool")
    trainer = L.Trainer(
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, make_loader(args))
    if trainer.is_global_zero:
        print(f"steps {trainer.global_step}, ema steps {module.learner.step}, loss {float(trainer.callback_metrics['train/loss']):.4f}")
    return module


if __name__ == "__main__":
    main()
