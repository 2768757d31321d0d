"""byol-pytorch's ``BYOLTrainer`` and ``MockDataset``, with its signatures, on Hugging Face Accelerate.

``BYOLTrainer(net, image_size=..., hidden_layer=..., learning_rate=..., dataset=..., num_train_steps=...)`` then
``trainer()`` trains as byol-pytorch's does (single process, or ``accelerate launch`` for several GPUs) and
writes the same ``checkpoint.{n}.pt`` files of ``net.state_dict()``. What it adds at no cost per step:

- the paper's cosine tau from ``moving_average_decay`` to 1 over ``num_train_steps`` (Grill et al. 2020,
  Sec. 3.3), unless ``byol_kwargs`` sets ``total_steps``;
- a full resumable checkpoint ``last.pt`` (learner with its target and schedule step, optimizer, step), written
  atomically next to the previous one (``last.prev.pt``); ``resume=True`` continues from it;
- no barrier and no ``loss.item()`` on every step (the loss is printed every ``log_every`` steps);
- no ``find_unused_parameters=True``: the learner tells DDP which backbone layers the loss cannot reach.

Accelerate is an optional dependency (``pip install "byol-wrapper[integrations]"``); it is imported when a
trainer is built.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Adam
from torch.utils.data import DataLoader, Dataset

from .byol import BYOL
from .checkpoint import atomic_save, load_latest_checkpoint, nonfinite_entries, remove_stale_temporaries, save_checkpoint
from .distributed import unwrap
from .lock import RunLock, RunLockedError
from .utils.checks import check_float, check_positive_int

__all__ = ["BYOLTrainer", "MockDataset"]


class MockDataset(Dataset):
    """Random images for smoke tests, byol-pytorch's signature.

    Unlike byol-pytorch's (``torch.randn``), the images are uniform in [0, 1], the range the built-in views
    assume, and image ``idx`` is the same on every read (drawn from a generator seeded with ``idx``).

    Args:
        image_size: Height and width.
        length: Number of images.
        channels: Channels per image (3 as in byol-pytorch).
    """

    def __init__(self, image_size: int, length: int, channels: int = 3) -> None:
        for name, value in (("image_size", image_size), ("length", length), ("channels", channels)):
            check_positive_int(f"MockDataset: {name}", value, error=ValueError)
        self.image_size = image_size
        self.length = length
        self.channels = channels

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> torch.Tensor:
        if not -self.length <= idx < self.length:
            raise IndexError(f"MockDataset index {idx} out of range for length {self.length}")
        g = torch.Generator().manual_seed(idx % self.length)
        return torch.rand(self.channels, self.image_size, self.image_size, generator=g)


def _cycle(dl: DataLoader) -> Iterator[Any]:
    while True:
        yield from dl


def _images(batch: Any) -> torch.Tensor:
    """The images of a batch: the batch itself, or the first element of an ``(images, labels, ...)`` batch."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"BYOLTrainer: the dataset must yield image tensors (C, H, W) or (image, ...) tuples, got a batch of "
            f"{type(batch).__name__}"
        )
    return batch


class BYOLTrainer(nn.Module):
    """byol-pytorch's trainer: builds the learner, optimizer and data loader, prepares them with Accelerate.

    Args:
        net: The backbone (trained in place; ``checkpoint.{n}.pt`` holds its ``state_dict()``).
        image_size: Augmentation output size.
        hidden_layer: The layer to read (name, index, or -1); see :class:`~byol_wrapper.BYOL`.
        learning_rate: Optimizer learning rate.
        dataset: Yields images ``(C, H, W)`` (float in [0, 1] or uint8), or tuples whose first item is one.
        num_train_steps: Optimizer steps in total (also the length of the cosine tau schedule).
        batch_size: Batch size per process.
        optimizer_klass: Optimizer class, called as ``optimizer_klass(params, lr=learning_rate, **optimizer_kwargs)``.
        checkpoint_every: Save ``checkpoint.{n}.pt`` after steps 1, k+1, 2k+1, ... (byol-pytorch's files), and
            ``checkpoint.final.pt`` at the end; ``last.pt`` is rewritten each time.
        checkpoint_folder: Where ``checkpoint.{n}.pt`` and ``last.pt`` go.
        byol_kwargs: More :class:`~byol_wrapper.BYOL` keywords.
        optimizer_kwargs: More optimizer keywords.
        accelerator_kwargs: ``accelerate.Accelerator`` keywords (e.g. ``mixed_precision="bf16"``, ``cpu=True``).
        resume: Continue from ``checkpoint_folder/last.pt`` when it exists (learner, optimizer and step).
        log_every: Print the loss every this many steps (each print reads the loss from the device once).

    Raises:
        ImportError: Accelerate is not installed.
        ValueError: a size or count is not a positive int, or the dataset has fewer than 2 images.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        image_size: int,
        hidden_layer: str | int,
        learning_rate: float,
        dataset: Dataset,
        num_train_steps: int,
        batch_size: int = 16,
        optimizer_klass: type[torch.optim.Optimizer] = Adam,
        checkpoint_every: int = 1000,
        checkpoint_folder: str = "./checkpoints",
        byol_kwargs: dict[str, Any] | None = None,
        optimizer_kwargs: dict[str, Any] | None = None,
        accelerator_kwargs: dict[str, Any] | None = None,
        resume: bool = False,
        log_every: int = 100,
    ) -> None:
        super().__init__()
        try:
            from accelerate import Accelerator
        except ImportError as e:
            raise ImportError(
                "BYOLTrainer runs on Hugging Face Accelerate, which is not installed: "
                'pip install "byol-wrapper[integrations]" (or pip install accelerate)'
            ) from e
        if not isinstance(net, nn.Module):
            raise TypeError(f"BYOLTrainer: net must be a torch.nn.Module, got {type(net).__name__}")
        check_float("BYOLTrainer: learning_rate", learning_rate, strict=True, error=ValueError)
        self.num_train_steps = check_positive_int("BYOLTrainer: num_train_steps", num_train_steps, error=ValueError)
        self.checkpoint_every = check_positive_int("BYOLTrainer: checkpoint_every", checkpoint_every, error=ValueError)
        self.log_every = check_positive_int("BYOLTrainer: log_every", log_every, error=ValueError)
        check_positive_int("BYOLTrainer: batch_size", batch_size, error=ValueError)
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"BYOLTrainer: dataset must be a map-style torch Dataset, got {type(dataset).__name__}")
        if len(dataset) < 2:
            raise ValueError(f"BYOLTrainer: dataset must hold at least 2 images (BatchNorm needs a batch), got {len(dataset)}")
        for name, kw in (("byol_kwargs", byol_kwargs), ("optimizer_kwargs", optimizer_kwargs), ("accelerator_kwargs", accelerator_kwargs)):
            if kw is not None and not isinstance(kw, dict):
                raise TypeError(f"BYOLTrainer: {name} must be a dict, got {type(kw).__name__}")

        self.accelerator = Accelerator(**(accelerator_kwargs or {}))
        self.net = net
        byol_kwargs = {"total_steps": num_train_steps, **(byol_kwargs or {})}
        learner = BYOL(net, image_size=image_size, hidden_layer=hidden_layer, **byol_kwargs)
        params = [p for p in learner.parameters() if p.requires_grad]
        optimizer = optimizer_klass(params, lr=learning_rate, **(optimizer_kwargs or {}))
        # A last batch of 1 cannot train (BatchNorm); drop the incomplete one when there are full ones.
        dataloader = DataLoader(dataset, shuffle=True, batch_size=batch_size, drop_last=len(dataset) >= batch_size)

        self.checkpoint_folder = Path(checkpoint_folder)
        if self.accelerator.is_main_process:
            self.checkpoint_folder.mkdir(exist_ok=True, parents=True)
            if not self.checkpoint_folder.is_dir():
                raise ValueError(f"BYOLTrainer: checkpoint_folder={checkpoint_folder!r} is not a folder")

        self.byol, self.optimizer, self.dataloader = self.accelerator.prepare(learner, optimizer, dataloader)
        self.register_buffer("step", torch.tensor(0))
        if resume:
            self._resume()

    # ------------------------------------------------------------------ byol-pytorch's helpers
    def wait(self) -> None:
        """Barrier over the processes."""
        return self.accelerator.wait_for_everyone()

    def print(self, msg: str) -> None:
        """Prints on the main process only."""
        return self.accelerator.print(msg)

    @property
    def learner(self) -> BYOL:
        """The :class:`~byol_wrapper.BYOL` learner, unwrapped from DDP."""
        return unwrap(self.byol)

    # ------------------------------------------------------------------ checkpoints
    @property
    def last_checkpoint(self) -> Path:
        """The resumable checkpoint: ``checkpoint_folder/last.pt``."""
        return self.checkpoint_folder / "last.pt"

    def state(self) -> dict[str, Any]:
        """Everything needed to continue: learner (with target and schedule step), optimizer, step."""
        return {
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": int(self.step),
            "num_train_steps": self.num_train_steps,
        }

    def _resume(self) -> None:
        state, path = load_latest_checkpoint(self.last_checkpoint)
        if state is None:
            return
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step.fill_(int(state["step"]))
        self.print(f"resumed from {path} at step {int(state['step'])}")

    def save(self, step: int, name: str | None = None) -> None:
        """Records ``step``; on the main process writes the backbone's ``state_dict()`` to ``checkpoint.{name}.pt``
        (byol-pytorch's file; default name ``(step - 1) // checkpoint_every``) and the full state to ``last.pt``."""
        self.step.fill_(step)
        if not self.accelerator.is_main_process:
            return
        if name is None:
            name = str((step - 1) // self.checkpoint_every)
        state = self.state()
        bad = nonfinite_entries({"learner": state["learner"], "optimizer": state["optimizer"]})
        if bad:  # never write a diverged state over the finite checkpoints (as byol-train)
            raise RuntimeError(
                f"BYOLTrainer: the model state became NaN or infinite by step {step} ({', '.join(bad[:3])}); not saved, "
                f"{self.last_checkpoint} keeps the last finite state. Lower learning_rate and resume"
            )
        net_state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        atomic_save(net_state, self.checkpoint_folder / f"checkpoint.{name}.pt")
        save_checkpoint(state, self.last_checkpoint)

    # ------------------------------------------------------------------ training
    def forward(self) -> None:
        """Trains up to ``num_train_steps`` optimizer steps (from the resumed step, if any).

        Raises:
            RuntimeError: another trainer is training into ``checkpoint_folder`` (its ``.lock`` is held).
        """
        lock = RunLock(self.checkpoint_folder) if self.accelerator.is_main_process else None
        if lock is not None:
            try:
                lock.acquire()  # the lock byol-train takes on --out: released by the kernel on any exit
            except RunLockedError as exc:
                raise RuntimeError(
                    f"BYOLTrainer: another process is training into checkpoint_folder={str(self.checkpoint_folder)!r} "
                    f"({exc}); wait for it to finish or pass another checkpoint_folder"
                ) from None
        try:
            if lock is not None:
                remove_stale_temporaries(self.checkpoint_folder)
            self._train()
        finally:
            if lock is not None:
                lock.release()

    def _train(self) -> None:
        step = int(self.step)
        data_it = _cycle(self.dataloader)
        start = step
        while step < self.num_train_steps:
            images = _images(next(data_it))
            with self.accelerator.autocast():
                loss = self.byol(images)
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.learner.update_moving_average()
            step += 1
            if step % self.log_every == 0 or step == self.num_train_steps:
                self.print(f"step {step} loss {loss.detach().float().item():.3f}")
            # byol-pytorch saves after steps 1, k+1, 2k+1, ... (its step counter starts at 0).
            if (step - 1) % self.checkpoint_every == 0:
                self.save(step)
        if step > start:
            self.save(step, name="final")  # the numbered files keep the weights of their step
        self.wait()
        self.print("training complete")

