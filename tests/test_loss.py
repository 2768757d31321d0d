"""The symmetric 2 - 2cos loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from byol_wrapper.loss import regression_loss, symmetric_loss


def test_regression_loss_is_two_minus_two_cos():
    p, z = torch.randn(5, 7), torch.randn(5, 7)
    torch.testing.assert_close(regression_loss(p, z), 2 - 2 * F.cosine_similarity(p, z, dim=-1))
    torch.testing.assert_close(regression_loss(p, 3 * p), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(regression_loss(p, -p), torch.full((5,), 4.0))


def test_symmetric_and_float32_and_target_detached():
    p1, p2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    z1, z2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    loss = symmetric_loss(p1.bfloat16(), p2.bfloat16(), z1.bfloat16(), z2.bfloat16())
    assert loss.dtype == torch.float32
    expected = (regression_loss(p1, z2) + regression_loss(p2, z1)).mean()
    torch.testing.assert_close(loss, expected, atol=0.05, rtol=0)
    symmetric_loss(p1, p2, z1, z2).backward()
    assert p1.grad is not None and z1.grad is None and z2.grad is None
