"""Representation-collapse diagnostics: per-dimension spread of normalised embeddings and their effective rank."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["collapse_stats"]


@torch.no_grad()
def collapse_stats(embeddings: torch.Tensor) -> dict[str, float]:
    """Representation-collapse diagnostics for a batch of embeddings.

    * ``std_mean``: rows are L2-normalised, then the (unbiased) standard
      deviation of every dimension across samples is averaged (the SimSiam
      collapse monitor, also used by lightly).
    * ``std_expected``: ``1 / sqrt(D)``, the value of ``std_mean`` for a
      non-collapsed, isotropic embedding; complete collapse gives ~0.
    * ``std_ratio``: ``std_mean / std_expected`` (~1 healthy, ~0 collapsed).
    * ``effective_rank``: ``exp(H(p))`` with ``p_i = s_i / sum(s)`` the
      normalised singular values of the *centred* (not L2-normalised)
      embedding matrix (Roy & Vetterli, 2007; as in RankMe, Garrido et al.,
      2023). It lies in ``[1, min(N, D)]``. Singular values below the
      numerical tolerance ``max(N, D) * eps(dtype) * ||X||_F`` are treated
      as zero, and a matrix without any variation above that tolerance
      (e.g. all rows identical) has effective rank 1. Because it is
      scale-invariant, read it together with ``std_ratio``.
    * ``dim``: ``D``.

    Non-finite embeddings give NaN statistics (``dim`` is still reported).

    Args:
        embeddings: ``(N, D)`` tensor with ``N >= 2``.

    Returns:
        A dict with keys ``std_mean``, ``std_expected``, ``std_ratio``,
        ``effective_rank`` and ``dim``.

    Raises:
        TypeError: If ``embeddings`` is not a real-valued tensor.
        ValueError: If ``embeddings`` is not 2-D, has fewer than 2 rows or
            zero columns.
    """
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(
            f"embeddings must be a torch.Tensor of shape (N, D), got "
            f"{type(embeddings).__name__}."
        )
    if embeddings.ndim != 2:
        raise ValueError(
            f"embeddings must be 2-D (N, D), got shape {tuple(embeddings.shape)}; "
            f"flatten or pool them to (N, D) first."
        )
    n, dim = embeddings.shape
    if n < 2 or dim < 1:
        raise ValueError(
            f"embeddings must have at least 2 rows and 1 column, got shape "
            f"{tuple(embeddings.shape)}; pass a batch of several samples."
        )
    if embeddings.is_complex():
        raise TypeError("embeddings must be real-valued, got a complex tensor.")
    eps = torch.finfo(embeddings.dtype).eps if embeddings.is_floating_point() else 0.0
    x = embeddings.detach().to(torch.float64)
    std_expected = 1.0 / math.sqrt(dim)
    if not bool(torch.isfinite(x).all()):
        nan = float("nan")
        return {
            "std_mean": nan,
            "std_expected": std_expected,
            "std_ratio": nan,
            "effective_rank": nan,
            "dim": dim,
        }

    std_mean = float(F.normalize(x, dim=1).std(dim=0).mean())

    singular = torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))
    tol = max(n, dim) * max(eps, torch.finfo(torch.float64).eps) * float(torch.linalg.norm(x))
    singular = singular[singular > tol]
    if singular.numel() == 0:
        effective_rank = 1.0
    else:
        p = singular / singular.sum()
        effective_rank = float(torch.exp(-(p * p.log()).sum()))

    return {
        "std_mean": std_mean,
        "std_expected": std_expected,
        "std_ratio": std_mean / std_expected,
        "effective_rank": effective_rank,
        "dim": dim,
    }
