"""byol_wrapper: BYOL (Bootstrap Your Own Latent, Grill et al. 2020) self-supervised pretraining for any backbone.

Example:
    >>> from byol_wrapper import BYOL
    >>> learner = BYOL(resnet, image_size=224, hidden_layer="avgpool")
"""

from ._version import __version__
from .augmentations import IMAGENET_MEAN, IMAGENET_STD, BYOLView, byol_views
from .byol import BYOL, NetWrapper
from .byol_pytorch import EMA, RandomApply
from .extractor import HiddenLayerExtractor, pool_features
from .heads import MLP, SimSiamMLP
from .loss import regression_loss, symmetric_loss
from .momentum import copy_weights_, cosine_tau, ema_update_
from .sem import SEM
from .trainer import BYOLTrainer, MockDataset

__all__ = [
    "BYOL",
    "BYOLTrainer",
    "BYOLView",
    "EMA",
    "HiddenLayerExtractor",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MLP",
    "MockDataset",
    "NetWrapper",
    "RandomApply",
    "SEM",
    "SimSiamMLP",
    "__version__",
    "byol_views",
    "copy_weights_",
    "cosine_tau",
    "ema_update_",
    "pool_features",
    "regression_loss",
    "symmetric_loss",
]
