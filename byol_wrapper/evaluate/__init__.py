"""Evaluation of self-supervised representations, one concept per module.

The standard tools used to monitor and evaluate a self-supervised encoder (for example the online backbone of a
BYOL learner):

* :func:`extract_features` (:mod:`.features`): run a frozen encoder over a data set once and return
  ``(features, labels)`` on the CPU.
* :func:`knn_predict` / :func:`knn_accuracy` (:mod:`.knn`): the weighted cosine k-nearest-neighbour classifier of
  InstDisc (Wu et al., 2018), the usual cheap "online" monitor in SSL libraries (lightly, solo-learn).
* :func:`linear_probe` (:mod:`.linear`): a linear classifier trained on frozen, cached features (the standard
  linear evaluation protocol, on a budget).
* :func:`collapse_stats` (:mod:`.collapse`): representation-collapse diagnostics: the per-dimension standard
  deviation of L2-normalised embeddings (as in SimSiam, Chen & He, 2021) and the effective rank (Roy & Vetterli,
  2007; RankMe, Garrido et al., 2023).

``knn_accuracy`` and ``linear_probe`` accept either an encoder plus data, or ``encoder=None`` with precomputed
``(features, labels)`` tuples, so that a training loop can extract features once and run several evaluations on
them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from byol_wrapper.evaluate import extract_features, knn_accuracy
    >>> encoder = nn.Flatten()
    >>> images = torch.rand(8, 1, 2, 2)
    >>> labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    >>> feats, labs = extract_features(encoder, (images, labels))
    >>> feats.shape, labs.dtype
    (torch.Size([8, 4]), torch.int64)
    >>> knn_accuracy(None, (feats, labs), (feats, labs), k=1)  # every sample is its own nearest neighbour
    1.0
"""

from .collapse import collapse_stats
from .features import DataLike, DeviceLike, extract_features  # noqa: F401 - the type aliases stay importable from here
from .knn import knn_accuracy, knn_predict
from .linear import linear_probe

__all__ = ["extract_features", "knn_predict", "knn_accuracy", "linear_probe", "collapse_stats"]
