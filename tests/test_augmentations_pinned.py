"""The views' outputs for fixed seeds are those of the code before the redesign (``tests/fixtures/view_outputs_v0.pt``,
written by ``tests/fixtures/make_view_outputs.py``): same random numbers consumed, same results.

On the machine type and torch version the fixture was written with, the outputs must be equal bit for bit;
elsewhere torch's CPU kernels (vectorized for another instruction set) may round differently, so they must agree
to 1e-5. The random numbers drawn after the call must be equal everywhere (torch's CPU generator is portable).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import make_view_outputs  # noqa: E402

PINNED = torch.load(FIXTURES / "view_outputs_v0.pt")
SAME_MACHINE = PINNED["torch"] == str(torch.__version__) and PINNED["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if SAME_MACHINE:
        assert torch.equal(actual, expected), f"{what}: not bit-identical (max diff {(actual - expected).abs().max()})"
    else:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0, msg=what)


@pytest.mark.parametrize("name", sorted(make_view_outputs.view_cases()))
def test_view_outputs_and_random_draws_are_pinned(name: str) -> None:
    pinned = PINNED["cases"][name]
    got = make_view_outputs.run_view_case(name)
    assert torch.equal(got["input"], pinned["input"])
    _assert_same(got["output"], pinned["output"], name)
    assert torch.equal(got["next_rand"], pinned["next_rand"]), f"{name}: a different number of random draws"


def test_learner_views_loss_and_random_draws_are_pinned() -> None:
    pinned = PINNED["cases"]["learner"]
    got = make_view_outputs.run_learner_case()
    assert torch.equal(got["input"], pinned["input"])
    _assert_same(got["view_one"], pinned["view_one"], "view_one")
    _assert_same(got["view_two"], pinned["view_two"], "view_two")
    _assert_same(got["loss"], pinned["loss"], "loss")
    assert torch.equal(got["next_rand"], pinned["next_rand"])


def test_the_pin_can_fail() -> None:
    """A different seed gives a different output: the comparison above is not vacuous."""
    factory, shape, dtype, _seed = make_view_outputs.view_cases()["paper_view2"]
    torch.manual_seed(12345)
    out = factory()(PINNED["cases"]["paper_view2"]["input"])
    assert not torch.allclose(out, PINNED["cases"]["paper_view2"]["output"], atol=1e-3)
