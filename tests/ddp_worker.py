"""DDP checks run by ``tests/test_distributed.py`` under ``torchrun --nproc_per_node=2`` (CPU, gloo).

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py RESULT.json``.
Rank 0 writes the measurements to ``RESULT.json``; the pytest test asserts on them, so a failure shows numbers.

1. ``equivalence``: a backbone without BatchNorm (heads' BatchNorm replaced by identities, deterministic
   views), 2 ranks x batch B under DDP against one process with batch 2B: the same loss trajectory (per-rank
   losses averaged over ranks) and the same online and target weights. The backbone has an ``fc`` after the
   hooked layer and a module that never runs, and DDP runs with ``find_unused_parameters=False``.
2. ``batchnorm``: a backbone with BatchNorm; ``sync_batchnorm=True`` on gloo/CPU falls back with a warning,
   ``None`` stays off; ``concat_views=True``; gradient accumulation with ``no_sync``. Parameters stay identical on
   all ranks; BatchNorm running statistics are per rank (reported, not required equal).
3. ``nested``: the learner inside another module (as in Lightning) under DDP: with
   ``_ddp_params_and_buffers_to_ignore`` from ``params_to_ignore`` it trains; without it, DDP raises its
   "Expected to have finished reduction" error on the second iteration (the problem the ignore list solves).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from byol_wrapper import BYOL  # noqa: E402
from byol_wrapper.distributed import params_to_ignore, unwrap, update_moving_average  # noqa: E402

SIZE, BATCH, STEPS = 8, 4, 3  # image side, per-rank batch, optimizer steps


class Net(nn.Module):
    """Tiny CNN; ``fc`` runs after the hooked ``pool`` and ``unused`` never runs."""

    def __init__(self, batchnorm: bool) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if batchnorm else (lambda c: nn.Identity())
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm(4), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.unused = nn.Linear(2, 2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def make_learner(batchnorm: bool, **kwargs) -> BYOL:
    torch.manual_seed(0)  # same initial weights on every rank (DDP would broadcast rank 0's anyway)
    return BYOL(Net(batchnorm), SIZE, hidden_layer="pool", projection_size=8, projection_hidden_size=16,
                augment_fn=identity, augment_fn2=hflip, total_steps=10, **kwargs)


def drop_head_batchnorm(learner: BYOL) -> None:
    """Per-rank BatchNorm statistics differ from those of the whole batch, so the equivalence runs without them."""
    heads = [learner.online_encoder.projector, learner.online_predictor, learner.target_encoder.projector]
    for head in heads:
        for i, layer in enumerate(head):
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                head[i] = nn.Identity()


def data(steps: int, world: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.rand(world * BATCH, 3, SIZE, SIZE, generator=g) for _ in range(steps)]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().float().flatten() for t in tensors])


def max_rank_difference(vec: torch.Tensor, world: int) -> float:
    gathered = [torch.empty_like(vec) for _ in range(world)]
    dist.all_gather(gathered, vec)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def equivalence(rank: int, world: int) -> dict:
    learner = make_learner(batchnorm=False)
    drop_head_batchnorm(learner)
    reference = copy.deepcopy(learner)  # single process, batch 2B (rank 0 only)
    model = DistributedDataParallel(learner)  # find_unused_parameters=False (the default)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = data(STEPS, world)
    ddp_losses = []
    for batch in batches:
        loss = model(batch[rank * BATCH:(rank + 1) * BATCH])
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_moving_average(model)
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # DDP averages gradients; the matching loss is the mean of the rank losses
        ddp_losses.append(float(mean) / world)
    out = {
        "ddp_losses": ddp_losses,
        "ignored": sorted(model.parameters_to_ignore),
        "step": unwrap(model).step,
        "tau": unwrap(model).tau,
        "online_rank_diff": max_rank_difference(flat(learner.online_encoder.parameters()), world),
        "target_rank_diff": max_rank_difference(flat(learner.target_encoder.parameters()), world),
    }
    if rank == 0:
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
        ref_losses = []
        for batch in batches:
            loss = reference(batch)
            ref_opt.zero_grad()
            loss.backward()
            ref_opt.step()
            reference.update_moving_average()
            ref_losses.append(float(loss.detach()))
        out["ref_losses"] = ref_losses
        out["online_vs_ref"] = float((flat(learner.online_encoder.parameters()) - flat(reference.online_encoder.parameters())).abs().max())
        out["target_vs_ref"] = float((flat(learner.target_encoder.parameters()) - flat(reference.target_encoder.parameters())).abs().max())
        out["predictor_vs_ref"] = float((flat(learner.online_predictor.parameters()) - flat(reference.online_predictor.parameters())).abs().max())
    return out


def batchnorm(rank: int, world: int) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner = make_learner(batchnorm=True, sync_batchnorm=True, concat_views=True)
    auto = make_learner(batchnorm=True)  # sync_batchnorm=None: off on CPU
    model = DistributedDataParallel(learner)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    accumulate = 2
    batches = data(2 * accumulate, world)
    for step in range(2):
        opt.zero_grad()
        for micro in range(accumulate):
            batch = batches[step * accumulate + micro][rank * BATCH:(rank + 1) * BATCH]
            if micro < accumulate - 1:
                with model.no_sync():  # no all-reduce for the first micro-batches
                    (model(batch) / accumulate).backward()
            else:
                (model(batch) / accumulate).backward()
        opt.step()
        model.module.update_moving_average()  # once per optimizer step
    bn = learner.net.features[1]
    return {
        "warnings": [str(w.message) for w in caught],
        "sync_true": learner.sync_batchnorm,
        "sync_auto": auto.sync_batchnorm,
        "has_syncbn": any(isinstance(m, nn.SyncBatchNorm) for m in learner.modules()),
        "step": learner.step,
        "param_rank_diff": max_rank_difference(flat(learner.parameters()), world),
        "running_mean_rank_diff": max_rank_difference(bn.running_mean.clone(), world),
    }


class Holder(nn.Module):
    """A module holding a learner, like a LightningModule; DDP wraps it, not the learner."""

    def __init__(self, learner: BYOL) -> None:
        super().__init__()
        self.learner = learner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.learner(x)


class IgnoringHolder(Holder):
    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        return params_to_ignore(self)


def train_steps(model: nn.Module, rank: int, world: int, steps: int = 2) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for batch in data(steps, world):
        loss = model(batch[rank * BATCH:(rank + 1) * BATCH])
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_moving_average(model.module.learner)


def nested(rank: int, world: int) -> dict:
    out = {}
    model = DistributedDataParallel(IgnoringHolder(make_learner(batchnorm=False)))
    train_steps(model, rank, world)
    out["ignoring_ok"] = True
    out["ignoring_step"] = model.module.learner.step
    try:  # last, as it leaves that DDP instance broken (no collective is pending, the process group is fine)
        train_steps(DistributedDataParallel(Holder(make_learner(batchnorm=False))), rank, world)
        out["plain_error"] = None
    except RuntimeError as err:
        out["plain_error"] = str(err)[:200]
    return out


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"world": world, "equivalence": equivalence(rank, world), "batchnorm": batchnorm(rank, world), "nested": nested(rank, world)}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
