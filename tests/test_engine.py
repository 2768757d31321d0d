"""The shared training step (byol_wrapper.engine) and the pure run plan of byol-train (byol_wrapper.cli.plan)."""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch

from byol_wrapper import BYOL
from byol_wrapper.backbones import SmallCNN
from byol_wrapper.cli.args import UsageError, build_parser
from byol_wrapper.cli.plan import BASE_LR, DEFAULT_WEIGHT_DECAY, make_plan
from byol_wrapper.engine import Schedule, autocast, resolve_device, resolve_precision, train_step
from byol_wrapper.momentum import cosine_tau
from byol_wrapper.optim import warmup_cosine_lr


def _learner(total_steps: int = 10, tau: float = 0.9) -> BYOL:
    return BYOL(SmallCNN(width=4, depth=2), 16, hidden_layer="pool", projection_size=8, projection_hidden_size=16,
                moving_average_decay=tau, total_steps=total_steps)


def test_schedule_values_are_the_two_published_curves() -> None:
    s = Schedule(total_steps=100, base_lr=0.4, warmup_steps=10, final_lr=0.01, base_tau=0.99)
    for step in (0, 5, 10, 50, 99, 100):
        assert s.lr(step) == warmup_cosine_lr(step, 100, 10, 0.4, 0.01)
        assert s.tau(step) == cosine_tau(step, 100, 0.99)
    assert s.lr(10) == pytest.approx(0.4) and s.tau(100) == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        Schedule(total_steps=0, base_lr=0.1)
    with pytest.raises(ValueError, match="base_tau"):
        Schedule(total_steps=5, base_lr=0.1, base_tau=1.5)


def test_train_step_drives_lr_and_tau_from_the_learners_counter() -> None:
    learner = _learner(total_steps=10, tau=0.5)  # the schedule overrides the learner's own settings
    opt = torch.optim.SGD(learner.parameters(), lr=123.0)
    schedule = Schedule(total_steps=4, base_lr=0.1, warmup_steps=2, base_tau=0.9)
    images = torch.rand(4, 3, 16, 16)
    seen = []
    for _ in range(3):
        out = train_step(learner, opt, images, schedule=schedule)
        seen.append((out.lr, out.tau))
        assert isinstance(out.loss, torch.Tensor) and not out.loss.requires_grad and out.loss.dim() == 0
    assert [lr for lr, _ in seen] == [schedule.lr(s) for s in range(3)]
    assert [tau for _, tau in seen] == [schedule.tau(s) for s in range(3)]
    assert learner.step == 3  # the one counter advanced once per step
    assert opt.param_groups[0]["lr"] == schedule.lr(2)
    assert learner.total_steps == 4 and learner.moving_average_decay == 0.9  # the schedule is the source of truth
    # A longer schedule (e.g. a resumed run with more --max-steps) continues both curves from the learner's step.
    schedule.total_steps = 8
    out = train_step(learner, opt, images, schedule=schedule)
    assert (out.lr, out.tau) == (schedule.lr(3), cosine_tau(3, 8, 0.9))


def test_train_step_is_the_hand_written_step() -> None:
    a = _learner()
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    images = torch.rand(6, 3, 16, 16)
    torch.manual_seed(1)
    out = train_step(a, opt_a, images)
    torch.manual_seed(1)
    loss = b(images)
    opt_b.zero_grad(set_to_none=True)
    loss.backward()
    opt_b.step()
    b.update_moving_average()
    assert torch.equal(out.loss, loss.detach())
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        if isinstance(pa, torch.Tensor):
            assert torch.equal(pa, pb), name


def test_micro_batches_accumulate_one_optimizer_step() -> None:
    learner = _learner()
    opt = torch.optim.SGD(learner.parameters(), lr=0.05)
    calls = []
    real_step = opt.step
    opt.step = lambda *a, **k: (calls.append(1), real_step(*a, **k))[1]  # type: ignore[method-assign]
    out = train_step(learner, opt, torch.rand(8, 3, 16, 16), micro_batches=2)
    assert calls == [1] and learner.step == 1 and math.isfinite(float(out.loss))
    with pytest.raises(ValueError, match="micro_batches"):
        train_step(learner, opt, torch.rand(4, 3, 16, 16), micro_batches=3)


def test_device_and_precision_pickers() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu7")
    with pytest.raises(ValueError, match="meta"):
        resolve_device("meta")
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", cpu)
    with autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(cpu, "32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["--data", "d", *argv])


def test_plan_defaults() -> None:
    plan = make_plan(_args("--batch-size", "64", "--epochs", "100"), num_images=1000)
    assert plan.steps_per_epoch == 15 and plan.total_steps == 1500 and plan.rank_batch == 64
    assert plan.warmup_steps == 150  # min(10 epochs, a tenth of training)
    assert plan.base_lr == BASE_LR["lars"] * 64 / 256 and plan.weight_decay == DEFAULT_WEIGHT_DECAY["lars"]
    assert plan.load_size == 256  # --image-size 224 -> 8/7


def test_plan_flags_win_and_split_over_processes() -> None:
    args = _args("--batch-size", "8", "--max-steps", "30", "--warmup-epochs", "0.5", "--lr", "0.3",
                 "--weight-decay", "0.1", "--optimizer", "sgd", "--image-size", "32")
    plan = make_plan(args, num_images=100, world=2)
    assert (plan.total_steps, plan.steps_per_epoch, plan.rank_batch) == (30, 12, 4)
    assert plan.warmup_steps == 6 and plan.base_lr == 0.3 and plan.weight_decay == 0.1 and plan.load_size == 32
    with pytest.warns(RuntimeWarning, match="shortened"):
        assert make_plan(_args("--batch-size", "8", "--max-steps", "5", "--warmup-steps", "9"), 100).warmup_steps == 5


@pytest.mark.parametrize(
    ("argv", "images", "world", "match"),
    [
        (("--batch-size", "64"), 10, 1, "lower --batch-size to at most 10"),
        (("--batch-size", "6"), 100, 4, "multiple of 4"),
        (("--batch-size", "4"), 100, 4, "at least 2 images per process"),
    ],
)
def test_plan_refuses_a_batch_that_does_not_fit(argv, images, world, match) -> None:
    with pytest.raises(UsageError, match=match):
        make_plan(_args(*argv), images, world)
