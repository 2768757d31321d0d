"""What lets byol-pytorch code and checkpoints run on :class:`byol_wrapper.BYOL` unchanged.

- :class:`EMA` and the learner's ``target_ema_updater`` (whose ``beta`` reads and sets the EMA decay);
- :func:`adapt_state_dict`: loads ``state_dict()``\\ s saved by byol-pytorch 0.8.x/0.9.x (duplicated ``net.*``
  keys, no schedule state, no target after ``reset_moving_average()``) and explains projector mismatches;
- :func:`warn_if_outside_unit_range`: the one host read on the first training forward that tells users whose
  images are not in [0, 1] (a normalising DataLoader, byol-pytorch's ``torch.randn`` example) that the built-in
  views assume [0, 1].
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from .utils.checks import is_real

if TYPE_CHECKING:
    from .byol import BYOL

__all__ = ["EMA", "LearnerEMA", "adapt_state_dict", "is_compiling", "warn_if_outside_unit_range"]


class EMA:
    """byol-pytorch's exponential-moving-average helper: ``update_average(old, new) = beta*old + (1-beta)*new``.

    Args:
        beta: The decay (tau).
    """

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def update_average(self, old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        """``new`` when ``old`` is ``None``, else ``old * beta + (1 - beta) * new``."""
        if old is None:
            return new
        return old * self.beta + (1 - self.beta) * new


class LearnerEMA(EMA):
    """``learner.target_ema_updater``: an :class:`EMA` whose ``beta`` is the learner's tau.

    Reading ``beta`` gives the tau the next ``update_moving_average()`` uses (following the cosine schedule when
    ``total_steps`` is set). Setting it, as byol-pytorch users do every step for their own schedule, sets a
    constant tau: ``moving_average_decay = beta`` and the built-in schedule off (``total_steps = None``).
    """

    def __init__(self, learner: "BYOL") -> None:  # noqa: D107 - no super().__init__: beta is a property
        self._learner = learner

    @property
    def beta(self) -> float:  # type: ignore[override]
        return self._learner.tau

    @beta.setter
    def beta(self, value: float) -> None:
        if not is_real(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"target_ema_updater.beta must be a float in [0, 1], got {value!r}")
        learner = self._learner
        if learner.total_steps is not None:
            warnings.warn(
                f"setting target_ema_updater.beta turns off the cosine tau schedule (total_steps={learner.total_steps}); "
                "tau is now the value you set. Build the learner without total_steps= to silence this.",
                stacklevel=2,
            )
            learner.total_steps = None
        learner.moving_average_decay = float(value)


# ---------------------------------------------------------------------------------------------- state dicts
def _sem_hint(state_dict: dict[str, Any], prefix: str) -> str | None:
    """The constructor keywords matching a byol-pytorch 0.9 projector with simplicial embeddings, if it has one."""
    weight = state_dict.get(prefix + "online_encoder.projector.0.0.weight")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return None
    sem_dim = weight.shape[0]
    # The first Linear of the MLP after the SEM layer has L*V inputs; V cannot be read from the weights.
    return (
        f"use_simplicial_embeddings=True, sem_num_simplices={sem_dim // 8}, sem_simplex_dim=8 "
        f"(sem_num_simplices * sem_simplex_dim must be {sem_dim}; byol-pytorch 0.9.1's default is 32 x 8)"
    )


def adapt_state_dict(learner: "BYOL", state_dict: dict[str, Any], prefix: str, strict: bool, error_msgs: list[str]) -> None:
    """Rewrites, in place, a byol-pytorch ``BYOL.state_dict()`` (0.8.x, 0.9.x) into this learner's layout.

    Called from ``BYOL._load_from_state_dict`` before the keys are matched:

    - ``net.*`` (byol-pytorch registers the backbone twice, as ``net`` and ``online_encoder.net``): dropped
      when the ``online_encoder.net.*`` copy is there, renamed to it otherwise;
    - no ``_extra_state`` (byol-pytorch, or a state dict saved before the schedule was saved): with
      ``strict=True`` the schedule step starts at 0, with a warning (``strict=False`` keeps the current step);
    - no ``target_encoder.*`` but a target here (byol-pytorch after ``reset_moving_average()``): the target
      starts as a copy of the online encoder, with a warning;
    - a projector of another layout (with/without simplicial embeddings, flattened vs pooled hidden output):
      an error message naming the constructor keyword that matches the state dict, added to torch's list of
      differing keys.
    """
    own = [k for k in state_dict if k.startswith(prefix)]
    if not any(k.startswith(prefix + "online_encoder.") or k.startswith(prefix + "net.") for k in own):
        return  # not a learner state dict (or an empty one): leave the reporting to torch
    net_prefix, online_net = prefix + "net.", prefix + "online_encoder.net."
    for key in own:
        if key.startswith(net_prefix):
            value = state_dict.pop(key)
            state_dict.setdefault(online_net + key[len(net_prefix):], value)
    own = [k for k in state_dict if k.startswith(prefix)]

    if strict and prefix + "_extra_state" not in state_dict:  # (strict=False keeps the current step)
        warnings.warn(
            "the state dict has no tau-schedule state ('_extra_state'; saved by byol-pytorch or an older "
            "byol_wrapper): the schedule step starts at 0. Weights are loaded.",
            stacklevel=4,
        )
        state_dict[prefix + "_extra_state"] = {"step": 0}

    target = prefix + "target_encoder."
    if learner.target_encoder is not None and not any(k.startswith(target) for k in own):
        online = prefix + "online_encoder."
        copied = {target + k[len(online):]: v for k, v in state_dict.items() if k.startswith(online)}
        if copied:
            warnings.warn(
                "the state dict has no target_encoder (byol-pytorch after reset_moving_average()): the target "
                "starts as a copy of the loaded online encoder.",
                stacklevel=4,
            )
            state_dict.update(copied)

    if not strict:
        return
    sem_here = learner.use_simplicial_embeddings
    sem_there = prefix + "online_encoder.projector.0.0.weight" in state_dict
    if sem_there and not sem_here:
        error_msgs.append(
            "the state dict's projector has simplicial embeddings (byol-pytorch 0.9's default); build the learner "
            f"with {_sem_hint(state_dict, prefix)}"
        )
    elif sem_here and not sem_there and prefix + "online_encoder.projector.0.weight" in state_dict:
        error_msgs.append(
            "the state dict's projector has no simplicial embeddings (byol-pytorch 0.8, or 0.9 with "
            "use_simplicial_embeddings=False); build the learner with use_simplicial_embeddings=False"
        )
    else:
        key = prefix + ("online_encoder.projector.0.0.weight" if sem_here else "online_encoder.projector.0.weight")
        weight = state_dict.get(key)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.shape[1] != learner.hidden_dim:
            fix = (
                "byol-pytorch flattens a 4-D hidden output (C*H*W values) where this learner average-pools it "
                "(C values): build the learner with token_pool='flatten' and the same image_size"
                if weight.shape[1] > learner.hidden_dim and weight.shape[1] % learner.hidden_dim == 0
                else "build the learner with the same backbone, hidden_layer and image_size as the saved one"
            )
            error_msgs.append(
                f"the state dict's projector takes {weight.shape[1]} inputs but this learner's hidden layer gives "
                f"{learner.hidden_dim}; {fix}"
            )


# ---------------------------------------------------------------------------------------------- input range
def is_compiling() -> bool:
    """Whether ``torch.compile`` is tracing the calling code."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return False


def warn_if_outside_unit_range(x: torch.Tensor, tolerance: float = 1e-3) -> bool:
    """Warns when float images lie outside [0, 1]; one host read (``aminmax``). Returns whether it warned.

    Skipped (returns ``False``) while ``torch.compile`` traces, so that no graph break is added.
    """
    if is_compiling() or not x.is_floating_point() or x.numel() == 0:
        return False
    lo, hi = (float(v) for v in torch.stack(torch.aminmax(x.detach())).float().cpu())
    if lo >= -tolerance and hi <= 1.0 + tolerance:
        return False
    warnings.warn(
        f"the training images are not in [0, 1] (min {lo:.3g}, max {hi:.3g}); the built-in BYOL views assume float "
        "images in [0, 1] or uint8 (colour jitter, solarize and the normalisation depend on it). If your DataLoader "
        "normalises, drop its Normalize and let the learner normalise (mean=/std=), or pass your own augment_fn. "
        "Checked once, on the first training forward; check_input_range=False silences it.",
        stacklevel=4,
    )
    return True
