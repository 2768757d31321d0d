"""The BYOL learner: wraps any backbone, builds heads, keeps an EMA target and augments per sample.

Bootstrap Your Own Latent (Grill et al. 2020, arXiv 2006.07733). The API keeps byol-pytorch's names so that its
users can switch by changing one import.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .augmentations import IMAGENET_MEAN, IMAGENET_STD, BYOLView, byol_views
from .augmentations.images import check_image_dtype, float32_image
from .channels import default_normalization
from .compat import LearnerEMA, adapt_state_dict, is_compiling, warn_if_outside_unit_range
from .extractor import HiddenLayerExtractor, LayerSpec, OutputKey, TokenPool, probe_representation, resolve_layer
from .heads import MLP, SimSiamMLP
from .loss import symmetric_loss
from .momentum import BUFFER_POLICIES, BufferPolicy, EMAPlan, apply_ema_, copy_weights_, cosine_tau, make_ema_plan
from .sem import sem_projector
from .utils.checks import check_size

__all__ = ["BYOL", "NetWrapper"]


def _first_conv_channels(net: nn.Module) -> int | None:
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            return module.in_channels
    return None


def _first_conv2d(net: nn.Module) -> nn.Conv2d | None:
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            return module
    return None


def _is_channels_last(t: torch.Tensor) -> bool:
    """Strictly channels-last: ``(N, C, H, W)`` with NHWC strides (tensors that are both layouts do not count)."""
    return t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _floating_dtype(net: nn.Module) -> torch.dtype:
    for p in net.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _module_device(net: nn.Module) -> torch.device:
    for t in net.parameters():
        return t.device
    for t in net.buffers():
        return t.device
    return torch.device("cpu")


def _distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_SYNC_BN_DEVICES = ("cuda", "xpu", "hpu")


def _resolve_sync_batchnorm(requested: bool | None, device: torch.device) -> bool:
    """Whether to convert BatchNorm to SyncBatchNorm; warns and returns ``False`` where it cannot work.

    ``nn.SyncBatchNorm`` synchronises accelerator tensors only (not CPU tensors, hence not under gloo on CPU).
    Without a process group it behaves as ordinary BatchNorm, so converting a CUDA model before
    ``init_process_group`` (as Lightning does) is fine. A model still on the CPU counts as a CUDA model when CUDA
    is available and the process group (if any) has a CUDA backend: it is about to be moved.
    """
    initialized = dist.is_available() and dist.is_initialized()
    backend = str(dist.get_backend()) if initialized else ""
    on_accelerator = device.type in _SYNC_BN_DEVICES or (
        device.type == "cpu" and torch.cuda.is_available() and (not initialized or "nccl" in backend)
    )
    if requested is None:
        return _distributed_world() > 1 and on_accelerator
    if not requested:
        return False
    if not on_accelerator:
        warnings.warn(
            f"sync_batchnorm=True needs the model on a GPU (nn.SyncBatchNorm does not synchronise CPU tensors); "
            f"the model is on {device.type}"
            + (f" with the {backend!r} process-group backend" if initialized else "")
            + ", so BatchNorm stays per process (statistics of each rank's batch). Pass sync_batchnorm=False to "
            "silence this, or move the model to CUDA with the nccl backend.",
            stacklevel=3,
        )
        return False
    return True


class NetWrapper(HiddenLayerExtractor):
    """Backbone plus projector: the online (or target) encoder, with byol-pytorch's signature.

    Holds ``net`` (the backbone, hooked at ``layer``) and ``projector``, with byol-pytorch's attribute names, so
    the target copy has parameters with the same names and byol-pytorch state-dict keys carry over.
    ``forward(x)`` returns ``(projection, representation)`` like byol-pytorch. Without an explicit
    ``projector``, it is built on the first forward from the hidden size (byol-pytorch's ``_get_projector``);
    :class:`BYOL` builds it at construction instead.

    Args:
        net: The backbone.
        projection_size: Projector output size (or, as before, the projector module itself).
        projection_hidden_size: Projector hidden size.
        layer: Hidden layer; see :func:`byol_wrapper.extractor.resolve_layer`.
        use_simsiam_mlp: Build a :class:`~byol_wrapper.heads.SimSiamMLP` projector.
        sync_batchnorm: ``nn.SyncBatchNorm`` in the projector; ``None``: when a process group of >1 rank exists.
        use_simplicial_embeddings: Put simplicial embeddings (Lavoie et al. 2022) before the projector MLP.
        sem_num_simplices: Number of simplices ``L``.
        sem_simplex_dim: Size ``V`` of each simplex.
        sem_temperature: Softmax temperature of the simplices.
        projector: A ready projector module (then the sizes above are not used).
        token_pool: Pooling of the hidden output; see :func:`byol_wrapper.extractor.pool_features`.
        output_key: Entry of a structured hidden-layer output; see :func:`byol_wrapper.extractor.select_output`.
    """

    def __init__(
        self,
        net: nn.Module,
        projection_size: int | nn.Module | None = None,
        projection_hidden_size: int = 4096,
        layer: LayerSpec = -2,
        use_simsiam_mlp: bool = False,
        sync_batchnorm: bool | None = None,
        use_simplicial_embeddings: bool = False,
        sem_num_simplices: int = 32,
        sem_simplex_dim: int = 8,
        sem_temperature: float = 0.1,
        *,
        projector: nn.Module | None = None,
        token_pool: TokenPool = "cls",
        output_key: OutputKey = None,
    ) -> None:
        if isinstance(projection_hidden_size, str) or isinstance(use_simsiam_mlp, str):
            raise TypeError(
                "NetWrapper follows byol-pytorch's signature (net, projection_size, projection_hidden_size, layer, "
                f"...); got projection_hidden_size={projection_hidden_size!r}: pass layer= and token_pool= by keyword"
            )
        super().__init__(net, layer, token_pool, output_key)
        if isinstance(projection_size, nn.Module):
            projector, projection_size = projection_size, None
        if projector is not None and not isinstance(projector, nn.Module):
            raise TypeError(f"projector must be a torch.nn.Module or None, got {type(projector).__name__}")
        self.projector = projector
        self.projection_size = projection_size
        self.projection_hidden_size = projection_hidden_size
        self.use_simsiam_mlp = bool(use_simsiam_mlp)
        self.sync_batchnorm = sync_batchnorm
        self.use_simplicial_embeddings = bool(use_simplicial_embeddings)
        self.sem_num_simplices = sem_num_simplices
        self.sem_simplex_dim = sem_simplex_dim
        self.sem_temperature = sem_temperature

    @property
    def hidden(self) -> dict:
        """The hook's store of hidden outputs by device (byol-pytorch's ``hidden``; emptied after each read)."""
        return self._hook.store if self._hook is not None else {}

    @property
    def hook_registered(self) -> bool:
        """byol-pytorch's name for :attr:`has_hook` (here the hook is placed at construction)."""
        return self.has_hook

    def _find_layer(self) -> nn.Module | None:
        """The hooked module (``None`` for ``layer=-1``); byol-pytorch's ``_find_layer``."""
        return resolve_layer(self.net, self.layer)

    def build_projector(self, dim: int) -> nn.Module:
        """A new projector for a hidden size ``dim`` from this wrapper's settings.

        Raises:
            ValueError: ``projection_size`` was not given.
        """
        if isinstance(self.projection_size, bool) or not isinstance(self.projection_size, int):
            raise ValueError(
                f"projection_size must be a positive int to build a projector, got {self.projection_size!r}; "
                "pass NetWrapper(net, projection_size, projection_hidden_size, ...) or projector=module"
            )
        if self.use_simplicial_embeddings:
            return sem_projector(
                dim, self.projection_size, self.projection_hidden_size, self.sem_num_simplices, self.sem_simplex_dim,
                self.sem_temperature, self.sync_batchnorm, simsiam=self.use_simsiam_mlp,
            )
        mlp = SimSiamMLP if self.use_simsiam_mlp else MLP
        return mlp(dim, self.projection_size, self.projection_hidden_size, self.sync_batchnorm)

    def _get_projector(self, hidden: torch.Tensor) -> nn.Module:
        """The projector, built for ``hidden``'s size, device and dtype if there is none yet (byol-pytorch's)."""
        if self.projector is None:
            self.projector = self.build_projector(int(hidden.shape[-1])).to(hidden)
        return self.projector

    def forward(self, x: torch.Tensor, return_projection: bool = True):
        """Returns ``(projection, representation)``, or the representation alone if not ``return_projection``."""
        representation = self.get_representation(x)
        if not return_projection:
            return representation
        projector = self.projector if self.projector is not None else self._get_projector(representation)
        return projector(representation), representation


class BYOL(nn.Module):
    """Bootstrap Your Own Latent around any backbone.

    Example:
        >>> learner = BYOL(resnet, image_size=224, hidden_layer="avgpool")
        >>> opt = torch.optim.Adam(learner.parameters(), lr=3e-4)
        >>> loss = learner(images)  # float in [0, 1] or uint8, (B, C, H, W)
        >>> opt.zero_grad(); loss.backward(); opt.step()
        >>> learner.update_moving_average()

    The constructor runs nothing through the user's backbone in a way that could change it: the hidden size is
    found by a forward pass on the ``meta`` device (no memory, no compute, no buffer or training-flag change),
    falling back to an eval-mode pass whose buffers and flags are restored; pass ``hidden_dim`` to skip it.

    Args:
        net: The backbone to pretrain. It stays the module you passed (``learner.net``); no layer is replaced
            (except with ``sync_batchnorm=True``, which converts its BatchNorm layers in place).
        image_size: Output size of the augmentations, ``int`` or ``(H, W)``.
        hidden_layer: Module name (any depth, as in ``net.named_modules()``), index into the top-level children,
            or ``-1`` for the network's output. Default ``-2`` (the penultimate child, byol-pytorch's default).
        projection_size: Projector/predictor output size (256 in the paper).
        projection_hidden_size: Projector/predictor hidden size (4096 in the paper).
        augment_fn: Callable for view 1 replacing the built-in augmentation (receives float images in [0, 1]).
        augment_fn2: Callable for view 2; defaults to ``augment_fn`` when that is given.
        moving_average_decay: Base tau of the target EMA (byol-pytorch's default 0.99; the paper uses 0.996
            at batch size 4096).
        use_momentum: ``False`` gives the SimSiam variant: no target network, stop-gradient on the online
            projections (no second backbone pass).
        sync_batchnorm: ``True`` converts BatchNorm in backbone and heads to ``nn.SyncBatchNorm`` before the
            target is copied (so the target has it too); on a CPU-only setup (gloo on CPU) it warns and keeps
            per-process BatchNorm. ``None`` (default) converts when a process group with more than one rank
            exists and the model is on CUDA (or still on the CPU with CUDA available and an nccl backend).
        hidden_dim: Size of the hidden layer's pooled output; skips probing the backbone.
        total_steps: Number of optimizer steps of training; enables the paper's cosine tau schedule from
            ``moving_average_decay`` to 1. ``None`` keeps tau constant.
        token_pool: Pooling of 3-D ``(B, T, D)`` hidden outputs: ``"cls"`` (first token) or ``"mean"``;
            ``"flatten"`` flattens every hidden output (4-D maps too) to ``(B, -1)``, as byol-pytorch does.
        channels: Input channel count; inferred from the first convolution, else 3.
        mean: Normalisation mean applied after the built-in augmentations; ``None`` disables normalisation.
            Left at its default, it fits ``channels``: ImageNet's RGB mean for 3 channels, else its luminance
            equivalent ``0.459`` for every channel (see :func:`byol_wrapper.channels.default_normalization`).
            An explicit mean must have one value per channel.
        std: Normalisation std; the default fits ``channels`` like ``mean`` (``0.226`` per channel unless 3).
        output_key: Which entry of a hidden-layer output that is not a tensor (a ``transformers``
            ``ModelOutput``, dict, namedtuple or tuple) is the representation. ``None`` (default):
            ``pooler_output`` if present, else ``last_hidden_state`` pooled with ``token_pool``, else the
            first tensor (see :func:`byol_wrapper.extractor.select_output`).
        buffer_policy: How target buffers (BatchNorm running statistics) follow the online network:
            ``"ema"`` (default) lerps floating buffers with the same tau and copies integer ones; ``"copy"``
            copies them; in both cases the target's own forward passes leave its running statistics untouched
            (its BatchNorm momentum is set to 0, on the target copy only). ``"none"``: the target keeps the
            statistics of its own forward passes, as in the official JAX implementation.
        concat_views: ``False`` (default, as in the paper) runs the two views through the networks separately,
            so each view has its own BatchNorm statistics; ``True`` concatenates them into one batch (faster
            on GPUs, byol-pytorch's behaviour).
        augment_kwargs: Overrides for the built-in views (see :func:`byol_wrapper.augmentations.byol_views`).
        use_simplicial_embeddings: Put simplicial embeddings (Lavoie et al. 2022, arXiv 2204.00616) before the
            projector MLP, as byol-pytorch 0.9 does: ``Linear -> BatchNorm`` to ``L * V`` values, softmax over
            each of ``L`` groups of ``V``. Default ``False`` (the paper's BYOL); byol-pytorch 0.9.1 defaults to
            ``True``.
        sem_num_simplices: ``L`` (byol-pytorch's default 32).
        sem_simplex_dim: ``V`` (byol-pytorch's default 8).
        sem_temperature: Softmax temperature (byol-pytorch's default 0.1).
        normalize_embedding_input: With ``return_embedding=True``, apply the built-in views' normalisation
            (default); ``False`` passes the input through unchanged, as byol-pytorch does.
        check_input_range: On the first training forward with the built-in views, read the batch's min and max
            once and warn if they are outside [0, 1]; ``False`` skips it.
    """

    def __init__(
        self,
        net: nn.Module,
        image_size: int | tuple[int, int],
        hidden_layer: LayerSpec = -2,
        projection_size: int = 256,
        projection_hidden_size: int = 4096,
        augment_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        augment_fn2: Callable[[torch.Tensor], torch.Tensor] | None = None,
        moving_average_decay: float = 0.99,
        use_momentum: bool = True,
        sync_batchnorm: bool | None = None,
        use_simplicial_embeddings: bool = False,
        sem_num_simplices: int = 32,
        sem_simplex_dim: int = 8,
        sem_temperature: float = 0.1,
        *,
        hidden_dim: int | None = None,
        total_steps: int | None = None,
        token_pool: TokenPool = "cls",
        channels: int | None = None,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        buffer_policy: BufferPolicy = "ema",
        concat_views: bool = False,
        augment_kwargs: dict[str, Any] | None = None,
        output_key: OutputKey = None,
        normalize_embedding_input: bool = True,
        check_input_range: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        self.image_size = check_size("image_size", image_size)
        if isinstance(moving_average_decay, bool) or not isinstance(moving_average_decay, (int, float)) or not 0.0 <= moving_average_decay <= 1.0:
            raise ValueError(f"moving_average_decay must be a float in [0, 1] (0.99 or the paper's 0.996), got {moving_average_decay!r}")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0):
            raise ValueError(f"total_steps must be a positive int (optimizer steps of training) or None, got {total_steps!r}")
        if buffer_policy not in BUFFER_POLICIES:
            raise ValueError(f"buffer_policy must be one of {BUFFER_POLICIES}, got {buffer_policy!r}")
        for name, fn in (("augment_fn", augment_fn), ("augment_fn2", augment_fn2)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable (images -> images) or None, got {type(fn).__name__}")
        if channels is None:
            channels = _first_conv_channels(net) or 3
        if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.channels = channels
        # The defaults (the IMAGENET_MEAN / IMAGENET_STD objects themselves) follow the channel count.
        if mean is IMAGENET_MEAN:
            mean = default_normalization(channels)[0]
        if std is IMAGENET_STD:
            std = default_normalization(channels)[1]
        self.moving_average_decay = float(moving_average_decay)
        self.total_steps = total_steps
        self.use_momentum = bool(use_momentum)
        self.buffer_policy = buffer_policy
        self.concat_views = bool(concat_views)
        self.use_simplicial_embeddings = bool(use_simplicial_embeddings)
        self.normalize_embedding_input = bool(normalize_embedding_input)
        self._range_check_pending = bool(check_input_range)
        self._step = 0
        self._ema_plan: EMAPlan | None = None
        self._forwards_since_update = 0  # training forwards since the last update_moving_average() (Python int)
        self._missing_update_warned = False

        # Augmentations: built-in per-sample views, or the user's callables.
        self.custom_augment = augment_fn is not None or augment_fn2 is not None
        if self.custom_augment:
            self.augment1 = augment_fn if augment_fn is not None else augment_fn2
            self.augment2 = augment_fn2 if augment_fn2 is not None else augment_fn
        else:
            self.augment1, self.augment2 = byol_views(self.image_size, mean=mean, std=std, **(augment_kwargs or {}))
        self.register_buffer("_mean", None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

        device, dtype = _module_device(net), _floating_dtype(net)
        if sync_batchnorm is not None and not isinstance(sync_batchnorm, bool):
            raise TypeError(f"sync_batchnorm must be True, False or None (automatic), got {sync_batchnorm!r}")
        self.sync_batchnorm = _resolve_sync_batchnorm(sync_batchnorm, device)
        if self.sync_batchnorm:
            # In place, before the hook is placed and before the target is copied, so both see SyncBatchNorm.
            nn.SyncBatchNorm.convert_sync_batchnorm(net)
        # The views are made channels-last when this convolution's weight is (see _memory_format).
        self._layout_conv = (_first_conv2d(net),)  # a tuple, so it is not registered as a submodule

        # Online encoder: backbone (hooked) + projector sized from the real hidden dimension.
        self.online_encoder = NetWrapper(
            net, projection_size, projection_hidden_size, layer=hidden_layer, use_simsiam_mlp=not self.use_momentum,
            sync_batchnorm=self.sync_batchnorm, use_simplicial_embeddings=self.use_simplicial_embeddings,
            sem_num_simplices=sem_num_simplices, sem_simplex_dim=sem_simplex_dim, sem_temperature=sem_temperature,
            token_pool=token_pool, output_key=output_key,
        )
        if hidden_dim is None:
            hidden_dim = self._probe_hidden_dim(dtype)
        elif isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim <= 0:
            raise ValueError(f"hidden_dim must be a positive int or None, got {hidden_dim!r}")
        self.hidden_dim = hidden_dim
        self.online_encoder.projector = self.online_encoder.build_projector(hidden_dim).to(device, dtype)
        self.online_predictor = MLP(projection_size, projection_size, projection_hidden_size, self.sync_batchnorm).to(device, dtype)

        self.target_encoder: NetWrapper | None = self._make_target() if self.use_momentum else None

    # ------------------------------------------------------------------ construction helpers
    @property
    def net(self) -> nn.Module:
        """The user's backbone (the online one)."""
        return self.online_encoder.net

    def _probe_hidden_dim(self, dtype: torch.dtype) -> int:
        """Finds the pooled hidden size without changing anything in the backbone (see ``probe_representation``)."""
        return probe_representation(self.online_encoder, (self.channels, *self.image_size), dtype=dtype).dim

    def _get_target_encoder(self) -> NetWrapper:
        """The target encoder (byol-pytorch's accessor; here the target exists from construction).

        Raises:
            RuntimeError: with ``use_momentum=False`` there is no target.
        """
        if self.target_encoder is None:
            raise RuntimeError("this learner was built with use_momentum=False (SimSiam): it has no target encoder")
        return self.target_encoder

    @property
    def target_ema_updater(self) -> LearnerEMA:
        """byol-pytorch's EMA object: ``.beta`` reads the next tau; setting it sets a constant tau."""
        return LearnerEMA(self)

    @target_ema_updater.setter
    def target_ema_updater(self, updater: Any) -> None:
        # byol-pytorch code may assign a new EMA(beta): its beta becomes the (constant) tau.
        LearnerEMA(self).beta = getattr(updater, "beta", updater)

    def _make_target(self) -> NetWrapper:
        target = copy.deepcopy(self.online_encoder)
        for p in target.parameters():
            p.requires_grad_(False)
        if self.buffer_policy != "none":
            for m in target.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = 0.0  # running stats follow the online network through the EMA only
        return target

    # ------------------------------------------------------------------ momentum
    #: The learner warns, once, on a training forward that follows this many training forwards in a row without
    #: ``update_moving_average()`` (the target is not moving). 256 leaves room for gradient accumulation (up to
    #: 256 micro-batches per optimizer step, e.g. the paper's batch of 4096 in micro-batches of 16); ``None``
    #: turns the warning off.
    max_forwards_without_update: int | None = 256

    def _count_training_forward(self) -> None:
        """Counts a training forward that used the target; warns once past :attr:`max_forwards_without_update`.

        A Python counter only (no host sync); not called while ``torch.compile`` traces (see :meth:`forward`).
        """
        self._forwards_since_update = count = getattr(self, "_forwards_since_update", 0) + 1
        limit = self.max_forwards_without_update
        if limit is None or count <= limit or getattr(self, "_missing_update_warned", False):
            return
        self._missing_update_warned = True
        moved = (
            "the target network is still the copy made at construction"
            if self._step == 0
            else f"the target network has not moved since update {self._step}"
        )
        warnings.warn(
            f"more than {limit} training forwards in a row without learner.update_moving_average(): {moved}, so "
            "BYOL regresses onto a fixed network. "
            "Call learner.update_moving_average() after each optimizer.step() (once per optimizer "
            "step, not per micro-batch when accumulating gradients). If more forwards per step are intended, set "
            "learner.max_forwards_without_update to a larger number, or None to silence this (warned once).",
            stacklevel=5,  # the user's learner(x): this method, forward, Module._call_impl, Module._wrapped_call_impl
        )

    @property
    def step(self) -> int:
        """Number of ``update_moving_average()`` calls so far (optimizer steps)."""
        return self._step

    @property
    def tau(self) -> float:
        """The EMA decay the next ``update_moving_average()`` will use."""
        return cosine_tau(self._step, self.total_steps, self.moving_average_decay)

    def update_moving_average(self) -> None:
        """Moves the target towards the online encoder, then advances the tau schedule by one step.

        Call once per optimizer step (not per micro-batch when accumulating gradients).

        Raises:
            RuntimeError: with ``use_momentum=False`` there is no target to update.
        """
        if not self.use_momentum or self.target_encoder is None:
            raise RuntimeError(
                "update_moving_average() needs a target network, but this learner was built with use_momentum=False "
                "(SimSiam variant); do not call it, or build the learner with use_momentum=True"
            )
        if self._ema_plan is None:
            self._ema_plan = make_ema_plan(self.target_encoder, self.online_encoder, self.buffer_policy)
        apply_ema_(self._ema_plan, self.tau)
        self._step += 1
        self._forwards_since_update = 0

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "BYOL":
        # .to()/.cuda()/.half() replace buffer tensors: drop the cached EMA plan.
        self._ema_plan = None
        return super()._apply(fn, *args, **kwargs)

    def reset_moving_average(self) -> None:
        """Copies the online encoder into the target (parameters and buffers); the tau schedule step is kept."""
        if self.target_encoder is not None:
            copy_weights_(self.target_encoder, self.online_encoder)

    def get_extra_state(self) -> dict[str, Any]:
        """Schedule state saved in ``state_dict()``."""
        return {"step": self._step, "total_steps": self.total_steps, "moving_average_decay": self.moving_average_decay}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restores the schedule state from ``load_state_dict()``."""
        self._step = int(state["step"])
        self.total_steps = state.get("total_steps", self.total_steps)
        self.moving_average_decay = float(state.get("moving_average_decay", self.moving_average_decay))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # noqa: D102
        # byol-pytorch 0.8/0.9 layouts and state dicts without the schedule state; see compat.adapt_state_dict.
        adapt_state_dict(self, state_dict, prefix, strict, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def remove_hooks(self) -> None:
        """Removes the forward hooks this learner put on the backbone and its target copy."""
        self.online_encoder.remove_hook()
        if self.target_encoder is not None:
            self.target_encoder.remove_hook()

    # ------------------------------------------------------------------ distributed
    def unused_parameters(self) -> list[str]:
        """Names of trainable backbone parameters the loss cannot reach (layers after ``hidden_layer``).

        See :func:`byol_wrapper.distributed.unused_parameters`.
        """
        if not any(p.requires_grad for p in self.net.parameters()):
            return []
        try:
            probe = probe_representation(self.online_encoder, (self.channels, *self.image_size), gradients=True)
        except Exception as err:  # noqa: BLE001 - neither the meta trace nor the guarded real pass ran
            warnings.warn(
                f"could not check which backbone parameters the BYOL loss reaches ({type(err).__name__}: {err}); "
                "if DistributedDataParallel reports unused parameters, drop the layers after hidden_layer "
                "(e.g. net.fc = nn.Identity() with hidden_layer=-1)",
                stacklevel=2,
            )
            return []
        return [f"online_encoder.net.{name}" for name in probe.unreachable]

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """Read by ``DistributedDataParallel`` when it wraps the learner: :meth:`unused_parameters`, so DDP needs
        no ``find_unused_parameters=True``. Names assigned to it (as DDP's
        ``_set_params_and_buffers_to_ignore_for_model`` does) are added to them."""
        extra = self.__dict__.get("_ddp_extra_ignore", [])
        return sorted({*self.unused_parameters(), *extra})

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names: Sequence[str]) -> None:
        self.__dict__["_ddp_extra_ignore"] = list(names)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            from .augmentations.images import not_a_tensor_error  # error path only: the conversion of PIL/NumPy

            raise not_a_tensor_error(x, self.channels)
        if x.ndim != 4:
            raise ValueError(
                f"x must be a batch of images of shape (B, {self.channels}, H, W), got shape {tuple(x.shape)}"
                + ("; add a batch dimension with x.unsqueeze(0)" if x.ndim == 3 else "")
            )
        if x.shape[1] != self.channels:
            from .channels import channel_mismatch_message  # error path only

            raise ValueError(channel_mismatch_message(self.net, self.channels, tuple(x.shape)))
        check_image_dtype(x)
        return float32_image(x)  # the one check of the images per forward: the built-in views trust it

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.custom_augment or self._mean is None or self._std is None:
            return x
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    @torch.no_grad()
    def augment(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of a batch, float32, under ``no_grad`` and outside autocast."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.augment1(x), self.augment2(x)

    @torch.no_grad()
    def _augment_checked(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`augment` of a batch :meth:`_check_input` validated: the built-in views skip their image checks."""
        if type(self).augment is not BYOL.augment:  # a subclass's own augment() is honoured, as before
            return self.augment(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            one, two = self.augment1, self.augment2  # either may be a user's callable (byol-pytorch code sets them)
            return (
                one._augment(x) if isinstance(one, BYOLView) else one(x),
                two._augment(x) if isinstance(two, BYOLView) else two(x),
            )

    def _encode(self, encoder: NetWrapper, one: torch.Tensor, two: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.concat_views:
            return encoder(torch.cat((one, two)))[0].chunk(2)
        return encoder(one)[0], encoder(two)[0]

    def _memory_format(self, x: torch.Tensor) -> torch.memory_format | None:
        """``torch.channels_last`` when the input batch or the backbone's first ``Conv2d`` weight is channels-last."""
        conv = self._layout_conv[0]
        if _is_channels_last(x) or (conv is not None and _is_channels_last(conv.weight)):
            return torch.channels_last
        return None

    def _input_dtype(self) -> torch.dtype:
        """The backbone's floating dtype (read at each call: ``learner.to(torch.bfloat16)`` changes it later).

        Views are float32; a half-precision backbone outside autocast (e.g. ``BYOL(net.to(torch.bfloat16))`` on
        the CPU) needs them in its own dtype, or torch's layers fail with a dtype mismatch.
        """
        return _floating_dtype(self.online_encoder.net)

    def _predict(self, one: torch.Tensor, two: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.concat_views:
            return self.online_predictor(torch.cat((one, two))).chunk(2)
        return self.online_predictor(one), self.online_predictor(two)

    def forward(self, x: torch.Tensor, return_embedding: bool = False, return_projection: bool = True):
        """BYOL loss of a batch, or its embedding.

        Args:
            x: Images ``(B, C, H, W)``, float in [0, 1] or uint8.
            return_embedding: Return the online encoder's output instead of the loss (no augmentation; the
                normalisation of the built-in views is applied).
            return_projection: With ``return_embedding``, return ``(projection, embedding)``; else the
                embedding alone.

        The views enter the backbone channels-last when ``x`` is channels-last or the backbone's first
        ``Conv2d`` weight is (``net.to(memory_format=torch.channels_last)``); otherwise contiguous.

        Returns:
            The symmetric loss (float32 scalar), or the embedding as described.

        Raises:
            TypeError: ``x`` is not a tensor (for a PIL image or NumPy array, or a list of them, the message gives
                the conversion).
            ValueError: wrong rank or channel count (naming ``channels=`` and the backbone's first convolution),
                or a batch of 1 in training mode.
            RuntimeError: called in an ``nn.DataParallel`` replica (several GPUs); use DDP.

        Warns:
            UserWarning: once, when more than :attr:`max_forwards_without_update` (256) training forwards in a
                row that used the target ran without ``update_moving_average()``. Counted in eager mode only (not under
                ``torch.compile`` of the learner, nor for ``return_embedding``, eval-mode or ``no_grad`` forwards,
                nor with ``use_momentum=False``), with a Python counter (no host sync).
        """
        if getattr(self, "_is_replica", False):
            raise RuntimeError(
                "BYOL does not support torch.nn.DataParallel over several GPUs: its replicas run in threads that "
                "share the hidden-layer hook. Use torch.nn.parallel.DistributedDataParallel instead (torchrun, one "
                "process per GPU; see byol_wrapper.distributed)"
            )
        memory_format = self._memory_format(x) if isinstance(x, torch.Tensor) else None
        x = self._check_input(x)
        if return_embedding:
            if self.normalize_embedding_input:
                x = self._normalize(x)
            x = x.to(self._input_dtype())
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
            return self.online_encoder(x, return_projection=return_projection)
        if self.training and x.shape[0] < 2:
            raise ValueError(
                "x must hold at least 2 images in training mode (BatchNorm in the heads needs batch statistics); "
                "use a larger batch, or learner.eval() with return_embedding=True to embed one image"
            )
        if not is_compiling() and self.training and self.target_encoder is not None and torch.is_grad_enabled():
            # Eager only: while torch.compile traces, is_compiling() is constant True and the counter is not read.
            self._count_training_forward()
        if self._range_check_pending and self.training and not self.custom_augment and not is_compiling():
            # One host read, on the first eager training forward only (skipped while torch.compile traces, so
            # that the compiled graph neither breaks nor recompiles on the flag).
            self._range_check_pending = False
            warn_if_outside_unit_range(x)
        view_one, view_two = self._augment_checked(x)
        dtype = self._input_dtype()
        view_one, view_two = view_one.to(dtype), view_two.to(dtype)  # no copy when the backbone is float32
        if memory_format is not None:  # the augmentations return contiguous (NCHW) views
            view_one = view_one.contiguous(memory_format=memory_format)
            view_two = view_two.contiguous(memory_format=memory_format)
        online_one, online_two = self._encode(self.online_encoder, view_one, view_two)
        pred_one, pred_two = self._predict(online_one, online_two)
        with torch.no_grad():
            if self.target_encoder is not None:
                target_one, target_two = self._encode(self.target_encoder, view_one, view_two)
            else:  # SimSiam: stop-gradient on the online projections, no second backbone pass
                target_one, target_two = online_one.detach(), online_two.detach()
        return symmetric_loss(pred_one, pred_two, target_one, target_two)
