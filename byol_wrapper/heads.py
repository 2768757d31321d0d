"""Projection and prediction heads.

From the BYOL paper (Grill et al. 2020, arXiv 2006.07733, Sec. 3.3): "the projection MLP g_theta [...] consists
in a linear layer with output size 4096 followed by batch normalization, rectified linear units (ReLU), and a
final linear layer with output dimension 256. [...] the predictor q_theta uses the same architecture as g_theta."
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from .utils.checks import check_positive_int

__all__ = ["MLP", "SimSiamMLP", "batchnorm_class"]


def batchnorm_class(sync_batchnorm: bool | None) -> type[nn.Module]:
    """Returns ``nn.SyncBatchNorm`` when ``sync_batchnorm`` else ``nn.BatchNorm1d``.

    ``None`` (byol-pytorch's default) means ``True`` when a process group of more than one rank exists.
    """
    if sync_batchnorm is None:
        sync_batchnorm = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return nn.SyncBatchNorm if sync_batchnorm else nn.BatchNorm1d


class MLP(nn.Sequential):
    """BYOL projector/predictor: Linear -> BatchNorm -> ReLU -> Linear.

    Args:
        dim: Input size (the backbone's hidden size for the projector, ``projection_size`` for the predictor).
        projection_size: Output size; 256 in the paper.
        hidden_size: Hidden size; 4096 in the paper.
        sync_batchnorm: Use ``nn.SyncBatchNorm`` (for DDP) instead of ``nn.BatchNorm1d``; ``None``: when a
            process group of more than one rank exists (byol-pytorch's ``MaybeSyncBatchnorm``).
    """

    def __init__(self, dim: int, projection_size: int = 256, hidden_size: int = 4096, sync_batchnorm: bool | None = False) -> None:
        for name, value in (("dim", dim), ("projection_size", projection_size), ("hidden_size", hidden_size)):
            check_positive_int(name, value, error=ValueError)
        super().__init__(
            nn.Linear(dim, hidden_size),
            batchnorm_class(sync_batchnorm)(hidden_size),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_size, projection_size),
        )


class SimSiamMLP(nn.Sequential):
    """SimSiam projector (Chen & He 2021, arXiv 2011.10566): three linear layers with BN, BN on the output.

    Used as the projector when ``use_momentum=False``, as in byol-pytorch.

    Args:
        dim: Input size.
        projection_size: Output size.
        hidden_size: Hidden size.
        sync_batchnorm: Use ``nn.SyncBatchNorm``.
    """

    def __init__(self, dim: int, projection_size: int = 256, hidden_size: int = 4096, sync_batchnorm: bool | None = False) -> None:
        for name, value in (("dim", dim), ("projection_size", projection_size), ("hidden_size", hidden_size)):
            check_positive_int(name, value, error=ValueError)
        norm = batchnorm_class(sync_batchnorm)
        super().__init__(
            nn.Linear(dim, hidden_size, bias=False),
            norm(hidden_size),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_size, hidden_size, bias=False),
            norm(hidden_size),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_size, projection_size, bias=False),
            norm(projection_size, affine=False),
        )
