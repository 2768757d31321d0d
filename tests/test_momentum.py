"""EMA update (fused, buffers policy) and the cosine tau schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from byol_wrapper.momentum import copy_weights_, cosine_tau, ema_update_


def _pair() -> tuple[nn.Module, nn.Module]:
    online = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
        online[1].running_mean.add_(1.0)
        online[1].running_var.mul_(3.0)
        online[1].num_batches_tracked.fill_(7)
    return online, target


@pytest.mark.parametrize("policy", ["ema", "copy", "none"])
def test_ema_matches_reference_loop(policy):
    online, target = _pair()
    before = copy.deepcopy(target)
    ema_update_(target, online, 0.9, policy)
    for pt, p0, po in zip(target.parameters(), before.parameters(), online.parameters()):
        torch.testing.assert_close(pt, 0.9 * p0 + 0.1 * po)
    rm, rm0, rmo = target[1].running_mean, before[1].running_mean, online[1].running_mean
    nbt = int(target[1].num_batches_tracked)
    if policy == "ema":
        torch.testing.assert_close(rm, 0.9 * rm0 + 0.1 * rmo)
        assert nbt == 7
    elif policy == "copy":
        torch.testing.assert_close(rm, rmo)
        assert nbt == 7
    else:
        torch.testing.assert_close(rm, rm0)
        assert nbt == 0


def test_tau_one_keeps_target_and_zero_copies():
    online, target = _pair()
    before = copy.deepcopy(target)
    ema_update_(target, online, 1.0)
    for pt, p0 in zip(target.parameters(), before.parameters()):
        torch.testing.assert_close(pt, p0)
    ema_update_(target, online, 0.0)
    for pt, po in zip(target.parameters(), online.parameters()):
        torch.testing.assert_close(pt, po)


def test_mismatched_structure_is_a_clear_error():
    with pytest.raises(RuntimeError, match="reset_moving_average"):
        ema_update_(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.5)


def test_copy_weights():
    online, target = _pair()
    copy_weights_(target, online)
    for a, b in zip(target.state_dict().values(), online.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_cosine_schedule_values():
    assert cosine_tau(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_tau(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_tau(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_tau(500, 100, 0.996) == pytest.approx(1.0)
    k, K = 30, 100
    assert cosine_tau(k, K, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi * k / K) + 1) / 2)
    assert cosine_tau(10**6, None, 0.99) == 0.99
    taus = [cosine_tau(k, 20, 0.99) for k in range(21)]
    assert all(a <= b for a, b in zip(taus, taus[1:]))


def test_plan_is_reusable_and_matches_one_shot_update():
    from byol_wrapper.momentum import apply_ema_, make_ema_plan

    online, target = _pair()
    twin = copy.deepcopy(target)
    plan = make_ema_plan(target, online, "ema")
    assert len(plan.copy_target) == 1  # num_batches_tracked
    for _ in range(3):
        apply_ema_(plan, 0.8)
        ema_update_(twin, online, 0.8, "ema")
    for a, b in zip(target.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(a, b)
