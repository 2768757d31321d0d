"""Mixed precision (bf16/fp16 autocast, GradScaler), channels-last layout and torch.compile, on tiny CPU models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from byol_wrapper import BYOL

from .conftest import SMALL_HEADS, TinyCNN

CL = torch.channels_last


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def make(net: nn.Module | None = None, **kwargs) -> BYOL:
    kwargs.setdefault("hidden_layer", "pool")
    return BYOL(net if net is not None else TinyCNN(), 16, **SMALL_HEADS, **kwargs)


def record_inputs(learner: BYOL) -> list[torch.Tensor]:
    """Records what enters the online and the target backbone."""
    seen: list[torch.Tensor] = []
    for net in (learner.online_encoder.net, learner.target_encoder.net):
        net.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    return seen


# ---------------------------------------------------------------------------------------------- mixed precision
def test_bf16_autocast_cpu_trains_with_float32_views_and_loss():
    learner = make()
    seen = record_inputs(learner)
    opt = torch.optim.SGD(learner.parameters(), lr=0.05)
    before = learner.net.features[0].weight.detach().clone()
    for _ in range(2):
        x = torch.rand(4, 3, 20, 20)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = learner(x)
            one, two = learner.augment(x)
        assert loss.dtype == torch.float32 and one.dtype == two.dtype == torch.float32
        opt.zero_grad()
        loss.backward()
        opt.step()
        learner.update_moving_average()
    assert seen and all(t.dtype == torch.float32 for t in seen)  # views enter the backbone as float32
    weight = learner.net.features[0].weight
    assert weight.dtype == torch.float32 and torch.isfinite(weight).all() and not torch.equal(weight, before)


def _fp16_autocast_cpu_supported() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float16
    except Exception:  # noqa: BLE001
        return False


def _fp16_grad_scaler_steps(device: str) -> None:
    learner = make(TinyCNN().to(device))
    opt = torch.optim.SGD(learner.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
    before = copy.deepcopy(learner.state_dict())
    for _ in range(3):
        with torch.autocast(device, dtype=torch.float16):
            loss = learner(torch.rand(4, 3, 20, 20, device=device))
        assert loss.dtype == torch.float32
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        learner.update_moving_average()
    assert all(torch.isfinite(p).all() for p in learner.parameters())
    assert any(not torch.equal(v, learner.state_dict()[k]) for k, v in before.items() if k.endswith("weight"))


def test_fp16_autocast_with_grad_scaler_cpu():
    if not _fp16_autocast_cpu_supported():
        pytest.skip("float16 autocast on CPU is not supported by this torch")
    _fp16_grad_scaler_steps("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_autocast_with_grad_scaler_cuda():
    _fp16_grad_scaler_steps("cuda")


# ---------------------------------------------------------------------------------------------- channels last
@pytest.mark.parametrize("concat_views", [False, True])
def test_channels_last_model_gets_channels_last_views(concat_views):
    learner = make(TinyCNN().to(memory_format=CL), concat_views=concat_views)
    seen = record_inputs(learner)
    learner(torch.rand(4, 3, 20, 20)).backward()
    assert len(seen) == (2 if concat_views else 4)
    assert all(t.is_contiguous(memory_format=CL) and not t.is_contiguous() for t in seen)
    seen.clear()
    learner.eval()
    learner(torch.rand(2, 3, 16, 16), return_embedding=True)
    assert seen and seen[0].is_contiguous(memory_format=CL) and not seen[0].is_contiguous()


def test_channels_last_input_keeps_its_layout_and_contiguous_stays_contiguous():
    learner = make()
    seen = record_inputs(learner)
    x = torch.rand(4, 3, 20, 20)
    learner(x.contiguous(memory_format=CL))
    assert len(seen) == 4 and all(not t.is_contiguous() and t.is_contiguous(memory_format=CL) for t in seen)
    seen.clear()
    learner(x)
    assert len(seen) == 4 and all(t.is_contiguous() for t in seen)


def test_channels_last_learner_converted_after_construction_gives_the_same_loss():
    a = make(augment_fn=identity, augment_fn2=hflip)
    b = copy.deepcopy(a).to(memory_format=CL)  # the whole learner, after construction
    seen = record_inputs(b)
    x = torch.rand(4, 3, 16, 16)
    assert torch.allclose(a(x), b(x), atol=1e-5)
    assert all(t.is_contiguous(memory_format=CL) and not t.is_contiguous() for t in seen)


def test_learner_to_with_builtin_views():
    learner = make().to(memory_format=CL)
    seen = record_inputs(learner)
    learner(torch.rand(4, 3, 20, 20))
    assert all(t.is_contiguous(memory_format=CL) and not t.is_contiguous() for t in seen)


# ---------------------------------------------------------------------------------------------- torch.compile
def _compiled_matches_eager(backend: str, builtin_views: bool, warm_up: bool = True, steps: int = 2) -> None:
    """Trains a compiled copy and an eager copy side by side; same RNG seed before each forward."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    views = {} if builtin_views else dict(augment_fn=identity, augment_fn2=hflip)
    eager = make(**views)
    learner = copy.deepcopy(eager)
    if warm_up:  # an eager call first; the slow test checks that no warm-up is needed either
        learner(torch.rand(4, 3, 20, 20))
    compiled = torch.compile(learner, backend=backend)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (learner, eager)]
    for step in range(steps):
        x = torch.rand(4, 3, 20, 20)
        losses = []
        for model, opt, owner in ((compiled, opts[0], learner), (eager, opts[1], eager)):
            torch.manual_seed(100 + step)  # the same per-sample augmentation draws
            loss = model(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            owner.update_moving_average()  # stays eager; compiled.update_moving_average() works as well
            losses.append(loss.detach())
        assert losses[0].dtype == torch.float32
        assert torch.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-5), losses
    for (name, p), q in zip(learner.named_parameters(), eager.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), name
    assert learner.step == steps and compiled.step == steps  # attributes reach the learner through the wrapper
    assert not counters["graph_break"], dict(counters["graph_break"])  # augmentations, hooks, both encoders, loss
    assert counters["stats"]["unique_graphs"] == 1  # one graph, no recompilation across steps
    torch._dynamo.reset()


def test_compile_learner_builtin_views_one_graph():
    _compiled_matches_eager("eager", builtin_views=True)


def test_compile_learner_trains_like_eager_aot_eager():
    _compiled_matches_eager("aot_eager", builtin_views=False)


def test_compile_backbone_in_place():
    net = TinyCNN()
    net.compile(backend="eager")  # the online backbone compiled, hook included; the target copy runs eager
    learner = make(net)
    assert learner.target_encoder.net._compiled_call_impl is None
    learner(torch.rand(4, 3, 16, 16)).backward()
    learner.update_moving_average()
    assert net.features[0].weight.grad is not None


def test_compiled_backbone_wrapper_needs_prefixed_layer_names():
    net = torch.compile(TinyCNN(), backend="eager")
    with pytest.raises(ValueError, match="_orig_mod.pool"):
        make(net)


@pytest.mark.slow
def test_compile_learner_inductor():
    _compiled_matches_eager("inductor", builtin_views=False)


@pytest.mark.slow
def test_compile_builtin_views_without_warm_up_does_not_recompile():
    _compiled_matches_eager("eager", builtin_views=True, warm_up=False)
