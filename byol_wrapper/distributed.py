"""Helpers for training a :class:`~byol_wrapper.BYOL` learner inside DDP, DataParallel or ``torch.compile`` wrappers.

``DistributedDataParallel(learner)`` works as is (no ``find_unused_parameters=True`` needed):

Example:
    >>> learner = BYOL(resnet, image_size=224, hidden_layer="avgpool").to(device)
    >>> model = torch.nn.parallel.DistributedDataParallel(learner, device_ids=[device.index])
    >>> loss = model(images)
    >>> opt.zero_grad(); loss.backward(); opt.step()
    >>> byol_wrapper.distributed.update_moving_average(model)  # same as model.module.update_moving_average()

Backbone parameters that cannot receive a gradient from the BYOL loss -- the layers that run after the hooked
``hidden_layer`` (``fc`` after ``"avgpool"`` on a torchvision ResNet) and modules that never run -- would make
DDP fail on its second iteration ("Expected to have finished reduction in the prior iteration ..."). The learner
lists them in ``_ddp_params_and_buffers_to_ignore``, the attribute DDP reads when it wraps a module, so DDP
leaves them out of gradient synchronisation. DDP only reads that attribute on the module it wraps: when the
learner is a submodule of the wrapped module (a LightningModule, a model holding a learner and a classifier),
give the wrapped module the same attribute from :func:`params_to_ignore` (see ``examples/lightning_byol.py``).
Cheaper still, drop the unused layers: ``net.fc = nn.Identity()`` with ``hidden_layer=-1`` does not compute
``fc`` at all.
"""

from __future__ import annotations

from torch import nn

from .byol import BYOL

__all__ = ["params_to_ignore", "unused_parameters", "unwrap", "update_moving_average"]

_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def unwrap(model: nn.Module) -> BYOL:
    """Returns the :class:`BYOL` learner inside DDP, DataParallel and ``torch.compile`` wrappers.

    Args:
        model: A learner, or a (possibly nested) ``DistributedDataParallel``, ``nn.DataParallel`` or
            ``torch.compile`` wrapper of one.

    Returns:
        The learner itself.

    Raises:
        TypeError: ``model`` is neither a learner nor one of those wrappers around a learner.
    """
    inner = model
    for _ in range(16):  # wrappers nest a few levels at most; also guards against cycles
        if isinstance(inner, BYOL):
            return inner
        if isinstance(inner, _WRAPPERS):
            inner = inner.module
        elif isinstance(getattr(inner, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            inner = inner._orig_mod
        else:
            break
    raise TypeError(
        f"model must be a BYOL learner or a DistributedDataParallel / DataParallel / torch.compile wrapper of one, "
        f"got {type(model).__name__}"
        + (f" wrapping {type(inner).__name__}" if inner is not model else "")
        + "; pass the learner itself (e.g. lightning_module.learner)"
    )


def update_moving_average(model: nn.Module) -> None:
    """Calls ``update_moving_average()`` on the learner inside ``model``; once per optimizer step.

    Under DDP every rank calls it: the online weights are identical on all ranks after the optimizer step, so
    the targets stay identical without communication.

    Args:
        model: A learner or a wrapper of one (see :func:`unwrap`).
    """
    unwrap(model).update_moving_average()


def unused_parameters(learner: BYOL) -> list[str]:
    """Names (in ``learner.named_parameters()``) of trainable backbone parameters the BYOL loss cannot reach.

    These are parameters with ``requires_grad=True`` that get no gradient from the representation at
    ``hidden_layer``: layers that run after it (``fc`` after ``"avgpool"``) and modules that never run. The
    check traces the backbone on the ``meta`` device (no memory, no compute, no change to the backbone); if a
    layer does not support ``meta``, it runs one eval-mode forward and backward of two blank images instead,
    restoring buffers and training flags, and without touching ``.grad``
    (:func:`byol_wrapper.extractor.probe_representation`). It runs when DDP wraps the learner
    (through ``learner._ddp_params_and_buffers_to_ignore``), not in the training step.

    Args:
        learner: The BYOL learner.

    Returns:
        The parameter names, e.g. ``["online_encoder.net.fc.weight", "online_encoder.net.fc.bias"]``; empty if
        the check failed (with a warning).
    """
    if not isinstance(learner, BYOL):
        raise TypeError(f"learner must be a BYOL learner, got {type(learner).__name__}; use unwrap(model) first")
    return learner.unused_parameters()


def params_to_ignore(module: nn.Module) -> list[str]:
    """DDP ignore list for a module that contains BYOL learners: their unused parameters, named from ``module``.

    DDP reads ``_ddp_params_and_buffers_to_ignore`` only on the module it wraps. A learner wrapped directly
    provides it itself; a module holding a learner (a LightningModule, say) can forward it:

    Example:
        >>> class Module(nn.Module):
        ...     @property
        ...     def _ddp_params_and_buffers_to_ignore(self):
        ...         return params_to_ignore(self)

    Args:
        module: Any module; every :class:`BYOL` inside it (or ``module`` itself) is checked.

    Returns:
        Fully qualified parameter names relative to ``module``.
    """
    names: list[str] = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, BYOL):
            names += [f"{prefix}.{n}" if prefix else n for n in unused_parameters(sub)]
    return names
