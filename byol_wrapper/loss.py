"""The BYOL regression loss.

Paper (Grill et al. 2020, Eq. 2): "we define the following mean squared error between the normalized predictions
and target projections, L = || q̄ - z̄' ||² = 2 - 2 <q, z'> / (||q|| ||z'||)", symmetrised by feeding view 2 to
the online network and view 1 to the target (Eq. 3: L_BYOL = L + L̃).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["regression_loss", "symmetric_loss"]


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``2 - 2 cos(prediction, target)``, computed in float32, target detached.

    Args:
        prediction: ``(B, D)`` online predictions.
        target: ``(B, D)`` target projections.

    Returns:
        ``(B,)`` losses in ``[0, 4]``.
    """
    p = F.normalize(prediction.float(), dim=-1)
    z = F.normalize(target.detach().float(), dim=-1)
    return 2 - 2 * (p * z).sum(dim=-1)


def symmetric_loss(
    pred_one: torch.Tensor, pred_two: torch.Tensor, target_one: torch.Tensor, target_two: torch.Tensor
) -> torch.Tensor:
    """The symmetrised BYOL loss ``mean(L(q1, z2') + L(q2, z1'))`` (range ``[0, 8]``, as in byol-pytorch).

    Args:
        pred_one: Online predictions for view 1.
        pred_two: Online predictions for view 2.
        target_one: Target projections for view 1.
        target_two: Target projections for view 2.

    Returns:
        A float32 scalar.
    """
    return (regression_loss(pred_one, target_two) + regression_loss(pred_two, target_one)).mean()
