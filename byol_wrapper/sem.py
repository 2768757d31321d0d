"""Simplicial embeddings (SEM; Lavoie et al. 2022, "Simplicial Embeddings in Self-Supervised Learning and
Downstream Classification", arXiv 2204.00616), as byol-pytorch 0.9 puts them in front of the projector.

The representation is mapped by ``Linear -> BatchNorm`` to ``L * V`` values, split into ``L`` groups of ``V``
and each group is replaced by its softmax at temperature ``tau`` (Sec. 3: "we project [...] onto L simplices of
V dimensions [...] with a softmax with temperature tau"). byol-pytorch 0.9.1's defaults: ``L = 32``, ``V = 8``,
``tau = 0.1``. The module layout of :func:`sem_projector` is byol-pytorch's
(``Sequential(Sequential(Linear, BatchNorm), SEM, MLP)``), so its state-dict keys load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .heads import MLP, SimSiamMLP, batchnorm_class
from .utils.checks import check_float, check_positive_int

__all__ = ["SEM", "sem_projector"]


class SEM(nn.Module):
    """Softmax over consecutive groups of ``dim_simplex`` values (byol-pytorch's ``SEM`` signature).

    Args:
        dim: Input size ``L * V``; must be divisible by ``dim_simplex``.
        temperature: Softmax temperature (0.1 in byol-pytorch 0.9.1).
        dim_simplex: Size ``V`` of each simplex.

    Raises:
        ValueError: ``dim`` is not a multiple of ``dim_simplex``, or a non-positive argument.
    """

    def __init__(self, dim: int, temperature: float = 0.1, dim_simplex: int = 8) -> None:
        super().__init__()
        dim = check_positive_int("dim", dim, error=ValueError)
        dim_simplex = check_positive_int("dim_simplex", dim_simplex, error=ValueError)
        if dim % dim_simplex:
            raise ValueError(
                f"dim={dim} must be divisible by dim_simplex={dim_simplex} (dim = number of simplices * simplex size)"
            )
        self.dim = dim
        self.dim_simplex = dim_simplex
        self.temperature = check_float("temperature", temperature, strict=True, error=ValueError)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``(..., L * V)`` -> ``(..., L * V)``, each group of ``V`` a probability vector."""
        shape = t.shape
        t = t.reshape(*shape[:-1], shape[-1] // self.dim_simplex, self.dim_simplex)
        return (t / self.temperature).softmax(dim=-1).reshape(shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, dim_simplex={self.dim_simplex}, temperature={self.temperature}"


def sem_projector(
    dim: int,
    projection_size: int,
    hidden_size: int,
    num_simplices: int = 32,
    simplex_dim: int = 8,
    temperature: float = 0.1,
    sync_batchnorm: bool | None = False,
    simsiam: bool = False,
) -> nn.Sequential:
    """The projector with simplicial embeddings in front, byol-pytorch 0.9's layout.

    Args:
        dim: The backbone's hidden size.
        projection_size: Projector output size.
        hidden_size: Projector hidden size.
        num_simplices: ``L``, the number of simplices.
        simplex_dim: ``V``, the size of each simplex.
        temperature: Softmax temperature.
        sync_batchnorm: Use ``nn.SyncBatchNorm``; ``None`` when a process group of more than one rank exists.
        simsiam: Use :class:`~byol_wrapper.heads.SimSiamMLP` after the embedding (``use_momentum=False``).

    Returns:
        ``Sequential(Sequential(Linear(dim, L*V), BatchNorm(L*V)), SEM, MLP(L*V, ...))``.
    """
    num_simplices = check_positive_int("sem_num_simplices", num_simplices, error=ValueError)
    simplex_dim = check_positive_int("sem_simplex_dim", simplex_dim, error=ValueError)
    temperature = check_float("sem_temperature", temperature, strict=True, error=ValueError)
    sem_dim = num_simplices * simplex_dim
    embedder = nn.Sequential(nn.Linear(dim, sem_dim), batchnorm_class(sync_batchnorm)(sem_dim))
    mlp = (SimSiamMLP if simsiam else MLP)(sem_dim, projection_size, hidden_size, sync_batchnorm)
    return nn.Sequential(embedder, SEM(sem_dim, temperature=temperature, dim_simplex=simplex_dim), mlp)
