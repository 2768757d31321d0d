"""DDP, DataParallel, SyncBatchNorm and gradient accumulation (CPU; the torchrun test launches 2 gloo ranks)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from byol_wrapper import BYOL, cosine_tau
from byol_wrapper.distributed import params_to_ignore, unused_parameters, unwrap, update_moving_average

from .conftest import SMALL_HEADS, TinyCNN

ROOT = Path(__file__).resolve().parents[1]


def make(net: nn.Module | None = None, **kwargs) -> BYOL:
    kwargs.setdefault("hidden_layer", "pool")
    return BYOL(net if net is not None else TinyCNN(), 16, **SMALL_HEADS, **kwargs)


@pytest.fixture
def single_process_group():
    """A one-rank gloo process group in this process (enough to build DDP), torn down afterwards."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- torchrun, 2 ranks
@pytest.mark.distributed
def test_ddp_two_ranks_match_one_process_with_double_batch(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    assert result["world"] == 2

    eq = result["equivalence"]
    # DDP with find_unused_parameters=False trained although fc and `unused` get no gradient: they are ignored.
    assert eq["ignored"] == [f"online_encoder.net.{n}" for n in ("fc.bias", "fc.weight", "unused.bias", "unused.weight")]
    # 2 ranks x B == 1 process x 2B: loss trajectory and weights (no BatchNorm, deterministic views).
    assert eq["ddp_losses"] == pytest.approx(eq["ref_losses"], rel=1e-5, abs=1e-6)
    assert eq["ref_losses"][-1] < eq["ref_losses"][0]
    assert eq["online_vs_ref"] < 1e-5 and eq["target_vs_ref"] < 1e-5 and eq["predictor_vs_ref"] < 1e-5
    # Every rank holds identical online and target weights; the schedule advanced once per optimizer step.
    assert eq["online_rank_diff"] == 0.0 and eq["target_rank_diff"] == 0.0
    assert eq["step"] == 3 and eq["tau"] == pytest.approx(cosine_tau(3, 10, 0.99))

    bn = result["batchnorm"]
    # sync_batchnorm=True on gloo/CPU: a warning and ordinary BatchNorm, not a crash; auto stays off on CPU.
    assert bn["sync_true"] is False and bn["sync_auto"] is False and bn["has_syncbn"] is False
    assert any("sync_batchnorm=True" in w and "gloo" in w for w in bn["warnings"]), bn["warnings"]
    # Gradient accumulation with no_sync: 2 optimizer steps of 2 micro-batches -> step 2, parameters identical.
    assert bn["step"] == 2 and bn["param_rank_diff"] == 0.0
    # Without SyncBatchNorm each rank keeps the running statistics of its own batch (what differs across ranks).
    assert bn["running_mean_rank_diff"] > 0.0

    nested = result["nested"]
    assert nested["ignoring_ok"] and nested["ignoring_step"] == 2
    assert nested["plain_error"] is not None and "Expected to have finished reduction" in nested["plain_error"]


# ---------------------------------------------------------------------------------------------- unused parameters
def test_unused_parameters_are_the_layers_after_the_hook_and_never_run():
    learner = make()
    names = ["online_encoder.net.unused.weight", "online_encoder.net.unused.bias", "online_encoder.net.fc.weight", "online_encoder.net.fc.bias"]
    assert unused_parameters(learner) == names
    assert learner.unused_parameters() == names
    assert learner._ddp_params_and_buffers_to_ignore == sorted(names)
    # The check changes nothing: no grads, no buffer updates.
    assert all(p.grad is None for p in learner.parameters())
    assert int(learner.net.features[1].num_batches_tracked) == 0


def test_unused_parameters_output_layer_and_frozen():
    learner = make(hidden_layer=-1)
    assert learner.unused_parameters() == ["online_encoder.net.unused.weight", "online_encoder.net.unused.bias"]
    net = TinyCNN()
    net.fc = nn.Identity()
    net.unused.requires_grad_(False)
    assert make(net, hidden_layer=-1).unused_parameters() == []


def test_unused_parameters_resnet_avgpool(resnet18):
    learner = BYOL(resnet18, 32, hidden_layer="avgpool", **SMALL_HEADS)
    assert learner.unused_parameters() == ["online_encoder.net.fc.weight", "online_encoder.net.fc.bias"]


class _NoMeta(TinyCNN):
    """Branches on a tensor value, which the meta device cannot do: the check falls back to a real pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() >= 0):
            x = x + 0
        return super().forward(x)


def test_unused_parameters_fallback_real_pass_restores_state():
    learner = make(_NoMeta(), hidden_dim=16)
    learner.train()
    bn = learner.net.features[1]
    before = bn.running_mean.clone()
    assert learner.unused_parameters() == ["online_encoder.net.unused.weight", "online_encoder.net.unused.bias", "online_encoder.net.fc.weight", "online_encoder.net.fc.bias"]
    assert learner.net.training and bn.training
    assert torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 0
    assert all(p.grad is None for p in learner.parameters())


class _NeverRuns(TinyCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this backbone cannot run on blank images")


def test_unused_parameters_warns_and_ignores_nothing_when_the_check_cannot_run():
    learner = make(_NeverRuns(), hidden_dim=16)
    for check in (learner.unused_parameters, lambda: unused_parameters(learner)):
        with pytest.warns(UserWarning, match="could not check which backbone parameters.*cannot run on blank images"):
            assert check() == []


def test_ddp_ignore_list_setter_adds_names():
    learner = make()
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(learner, ["online_predictor.0.bias"])
    assert "online_predictor.0.bias" in learner._ddp_params_and_buffers_to_ignore
    assert "online_encoder.net.fc.weight" in learner._ddp_params_and_buffers_to_ignore


def test_params_to_ignore_prefixes_nested_learners():
    holder = nn.Module()
    holder.learner = make()
    holder.head = nn.Linear(2, 2)
    assert params_to_ignore(holder) == [f"learner.online_encoder.net.{n}" for n in ("unused.weight", "unused.bias", "fc.weight", "fc.bias")]


# ---------------------------------------------------------------------------------------------- unwrap
def test_unwrap_and_update_through_wrappers(single_process_group):
    learner = make()
    ddp = nn.parallel.DistributedDataParallel(learner)
    assert ddp.parameters_to_ignore == set(learner._ddp_params_and_buffers_to_ignore)
    compiled = torch.compile(ddp, backend="eager")  # lazy: nothing is compiled here
    for wrapper in (learner, ddp, nn.DataParallel(learner), compiled):
        assert unwrap(wrapper) is learner
    loss = ddp(torch.rand(4, 3, 16, 16))
    loss.backward()
    assert learner.net.fc.weight.grad is None and learner.net.features[0].weight.grad is not None
    update_moving_average(ddp)
    ddp.module.update_moving_average()
    assert learner.step == 2


def test_unwrap_rejects_other_modules():
    with pytest.raises(TypeError, match="BYOL learner"):
        unwrap(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="wrapping Linear"):
        unwrap(nn.DataParallel(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="unwrap"):
        unused_parameters(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------- DataParallel
def test_dataparallel_without_several_gpus_calls_the_learner():
    learner = make()
    model = nn.DataParallel(learner)
    loss = model(torch.rand(4, 3, 16, 16))
    loss.backward()
    update_moving_average(model)
    assert learner.step == 1


def test_dataparallel_replica_raises_pointing_to_ddp():
    replica = make()._replicate_for_data_parallel()  # what DataParallel runs on each GPU
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        replica(torch.rand(4, 3, 16, 16))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_dataparallel_multi_gpu_raises():
    model = nn.DataParallel(make().cuda())
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        model(torch.rand(4, 3, 16, 16, device="cuda"))


# ---------------------------------------------------------------------------------------------- SyncBatchNorm
def test_sync_batchnorm_true_without_gpu_warns_and_keeps_batchnorm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="sync_batchnorm=True"):
        learner = make(sync_batchnorm=True)
    assert learner.sync_batchnorm is False
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in learner.modules())
    learner(torch.rand(4, 3, 16, 16)).backward()


def test_sync_batchnorm_converts_backbone_heads_and_target(monkeypatch):
    # A CPU-built model with CUDA available and no process group yet (Lightning's order) is converted.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner = make(sync_batchnorm=True)
    assert learner.sync_batchnorm
    for part in (learner.online_encoder.net, learner.online_encoder.projector, learner.online_predictor,
                 learner.target_encoder.net, learner.target_encoder.projector):
        kinds = {type(m) for m in part.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        assert kinds == {nn.SyncBatchNorm}, kinds
    assert learner.target_encoder.net.features[1].momentum == 0.0  # target made after the conversion
    learner(torch.rand(4, 3, 16, 16)).backward()  # no process group: SyncBatchNorm acts as BatchNorm


def test_sync_batchnorm_auto_off_and_bad_type():
    assert make().sync_batchnorm is False
    with pytest.raises(TypeError, match="sync_batchnorm"):
        make(sync_batchnorm="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sync_batchnorm_cuda_one_rank_nccl():
    if dist.is_initialized() or not dist.is_nccl_available():
        pytest.skip("needs nccl and no existing process group")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        learner = make(TinyCNN().cuda(), sync_batchnorm=True)
        model = nn.parallel.DistributedDataParallel(learner, device_ids=[torch.cuda.current_device()])
        model(torch.rand(4, 3, 16, 16, device="cuda")).backward()
        update_moving_average(model)
        assert isinstance(learner.net.features[1], nn.SyncBatchNorm) and learner.step == 1
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- accumulation
def test_gradient_accumulation_steps_the_schedule_per_optimizer_step():
    learner = make(total_steps=10, moving_average_decay=0.9)
    opt = torch.optim.SGD(learner.parameters(), lr=0.01)
    accumulate, steps = 4, 3
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            (learner(torch.rand(2, 3, 16, 16)) / accumulate).backward()
        opt.step()
        learner.update_moving_average()  # once per optimizer step, not per micro-batch
    assert learner.step == steps
    assert learner.tau == pytest.approx(cosine_tau(steps, 10, 0.9))
    assert math.isclose(learner.tau, 1 - 0.1 * (math.cos(math.pi * 0.3) + 1) / 2)
