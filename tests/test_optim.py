"""LARS, parameter groups and the warmup + cosine learning-rate schedule (CPU, tiny tensors)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from byol_wrapper import BYOL
from byol_wrapper.optim import LARS, build_optimizer, is_excluded_parameter, param_groups, warmup_cosine_lr

from .conftest import SMALL_HEADS


def _names(model: nn.Module, params: list[torch.Tensor]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_exclude_biases_and_norm_parameters() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2), nn.LayerNorm(2), nn.GroupNorm(1, 2))
    model[3].weight.requires_grad_(True)
    groups = param_groups(model, weight_decay=0.5)
    assert [g["lars_exclude"] for g in groups] == [False, True]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert _names(model, groups[0]["params"]) == {"0.weight", "3.weight"}
    assert _names(model, groups[1]["params"]) == {
        "0.bias", "1.weight", "1.bias", "3.bias", "4.weight", "4.bias", "5.weight", "5.bias",
    }


def test_param_groups_skip_frozen_target_and_cover_every_trainable_parameter(tiny_cnn: nn.Module) -> None:
    learner = BYOL(tiny_cnn, 8, hidden_layer="pool", **SMALL_HEADS)
    groups = param_groups(learner, weight_decay=1e-6)
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for p in learner.parameters() if p.requires_grad]
    assert {id(p) for p in grouped} == {id(p) for p in trainable} and len(grouped) == len(trainable)
    target_ids = {id(p) for p in learner.target_encoder.parameters()}
    assert not target_ids & {id(p) for p in grouped}
    # every bias and BatchNorm parameter of the heads is in the excluded group
    excluded = _names(learner, groups[1]["params"])
    one_d = {n for n, p in learner.named_parameters() if p.requires_grad and p.ndim <= 1}
    assert excluded == one_d  # biases and BatchNorm scales/shifts of backbone and heads; no weight matrix
    assert any(n.startswith("online_predictor") for n in excluded)


def test_is_excluded_parameter_rules() -> None:
    bn, lin = nn.BatchNorm1d(3), nn.Linear(3, 3)
    assert is_excluded_parameter("weight", bn.weight, bn)
    assert is_excluded_parameter("bias", lin.bias, lin)
    assert not is_excluded_parameter("weight", lin.weight, lin)
    assert is_excluded_parameter("scale", nn.Parameter(torch.ones(3)), nn.Module())  # 1-D: a norm-like vector


def test_param_groups_bad_input() -> None:
    with pytest.raises(TypeError, match="model"):
        param_groups("net", 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(nn.Linear(2, 2), -1.0)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        param_groups(frozen, 0.0)


def test_lars_step_matches_hand_computation() -> None:
    lr, momentum, wd, eta = 0.5, 0.9, 0.1, 0.01
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = LARS(
        [{"params": [w], "weight_decay": wd, "lars_exclude": False}, {"params": [b], "weight_decay": wd, "lars_exclude": True}],
        lr=lr,
        momentum=momentum,
        trust_coefficient=eta,
    )
    g_w, g_b = [0.3, 0.4], 0.5
    # by hand, in plain Python
    hw, hb, buf_w, buf_b = [3.0, 4.0], 1.0, None, None
    for _ in range(2):
        u = [g + wd * x for g, x in zip(g_w, hw)]
        trust = eta * math.hypot(*hw) / math.hypot(*u)
        upd = [trust * v for v in u]
        buf_w = upd if buf_w is None else [momentum * bv + v for bv, v in zip(buf_w, upd)]
        hw = [x - lr * bv for x, bv in zip(hw, buf_w)]
        buf_b = g_b if buf_b is None else momentum * buf_b + g_b  # excluded: no weight decay, no trust ratio
        hb = hb - lr * buf_b

        w.grad = torch.tensor([g_w], dtype=torch.float64)
        b.grad = torch.tensor([g_b], dtype=torch.float64)
        opt.step()
        assert torch.allclose(w.detach(), torch.tensor([hw], dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.allclose(b.detach(), torch.tensor([hb], dtype=torch.float64), rtol=0, atol=1e-12)
    # first step by the numbers: u = (0.6, 0.8), |u| = 1, trust = 0.01 * 5 = 0.05, w -= 0.5 * 0.05 * u
    assert hw[0] != 3.0


def test_lars_first_step_exact_values_and_zero_norm_guard() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    z = nn.Parameter(torch.zeros(1, 2, dtype=torch.float64))
    opt = LARS([w, z], lr=1.0, momentum=0.0, weight_decay=0.1, trust_coefficient=0.01)
    w.grad = torch.tensor([[0.3, 0.4]], dtype=torch.float64)
    z.grad = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([[3.0 - 0.03, 4.0 - 0.04]], dtype=torch.float64))
    # zero weights: trust ratio 1, so the step is the plain (decayed) gradient
    assert torch.allclose(z.detach(), torch.tensor([[-1.0, -1.0]], dtype=torch.float64))
    assert not opt.state[w]  # no momentum buffer without momentum


def test_lars_state_dict_round_trip_weights_only() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    opt = LARS(param_groups(model, 1e-4), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = LARS(param_groups(model, 1e-4), lr=0.1)
    opt2.load_state_dict(state)
    assert [g["lars_exclude"] for g in opt2.param_groups] == [False, True]
    assert all(torch.equal(opt2.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"]) for p in model.parameters())


def test_lars_bad_arguments() -> None:
    p = [nn.Parameter(torch.ones(2, 2))]
    with pytest.raises(ValueError, match="lr"):
        LARS(p, lr=-1.0)
    with pytest.raises(TypeError, match="momentum"):
        LARS(p, lr=0.1, momentum="high")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS(p, lr=0.1, trust_coefficient=0.0)
    with pytest.raises(ValueError, match="nesterov"):
        LARS(p, lr=0.1, momentum=0.0, nesterov=True)


def test_build_optimizer_kinds() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    assert isinstance(build_optimizer("lars", model, lr=0.1, weight_decay=1e-6), LARS)
    sgd = build_optimizer("sgd", model, lr=0.1, weight_decay=1e-4)
    adamw = build_optimizer("adamw", model, lr=1e-3, weight_decay=1e-2)
    assert isinstance(sgd, torch.optim.SGD) and isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [1e-2, 0.0]
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer("adam", model, lr=0.1, weight_decay=0.0)


def test_warmup_cosine_values() -> None:
    lrs = [warmup_cosine_lr(s, 10, 2, 1.0) for s in range(11)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # linear warmup
    assert lrs[2] == pytest.approx(1.0)  # cosine starts at the peak
    assert lrs[6] == pytest.approx(0.5)  # halfway through the decay
    assert lrs[10] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # monotone decay
    assert warmup_cosine_lr(5, 10, 0, 2.0, final_lr=0.2) == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine_lr(0, 10, 0, 2.0) == pytest.approx(2.0)
    assert warmup_cosine_lr(50, 10, 0, 2.0, final_lr=0.1) == pytest.approx(0.1)  # clamped after the end
    assert warmup_cosine_lr(3, 4, 4, 1.0) == pytest.approx(1.0)  # warmup for the whole run


def test_warmup_cosine_bad_arguments() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine_lr(0, 10, 11, 1.0)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine_lr(0, 0, 0, 1.0)
    with pytest.raises(TypeError, match="step"):
        warmup_cosine_lr(1.5, 10, 0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="base_lr"):
        warmup_cosine_lr(0, 10, 0, -1.0)
