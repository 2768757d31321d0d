"""BYOL pretraining from the command line: ``byol-train`` or ``python -m byol_wrapper.train``.

Example:
    byol-train --data ~/images --eval-data ~/cifar10 --backbone resnet18 --cifar-stem --image-size 32 \\
        --batch-size 256 --epochs 200 --out runs/cifar

Re-running the same command with the same ``--out`` resumes from ``OUT/last.pt``. Resuming restores the step
counter, the position in the epoch (the epoch's shuffled order is recomputed from ``--seed`` and the epoch
number and the batches already trained are skipped, so the data order is the one of an uninterrupted run),
the optimizer, the loss scaler and all random number generators; the learning-rate and tau schedules are
functions of the step counter. See :func:`main` and ``--help`` for the flags.

Several processes: ``torchrun --nproc_per_node=N -m byol_wrapper.train ...`` trains
``DistributedDataParallel(learner)`` on N ranks (``cuda:LOCAL_RANK`` with NCCL, or CPUs with gloo).
``--batch-size`` is the global batch, split evenly: rank ``r`` takes every N-th index of each global batch
(:class:`~byol_wrapper.data.EpochSampler`), so the global batches are those of one process. Rank 0 writes every
output; the ranks agree on skipped batches and on stopping through one small host-side all-reduce per step.

Only one process writes an ``OUT``: rank 0 holds ``OUT/.byol-train.lock`` (:mod:`byol_wrapper.lock`) and a second
run on the same folder exits with status 2. No NaN or infinite state is ever saved (status 3, see :func:`main`).

Outputs in ``OUT``: ``last.pt`` and ``last.prev.pt`` (checkpoints, see :mod:`byol_wrapper.checkpoint`),
``backbone.pt`` and ``backbone_ema.pt`` (plain ``state_dict`` of the online and of the EMA target backbone, same
keys; rebuild the module with :func:`build_backbone`), ``metrics.jsonl``, ``metrics.png`` and ``config.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import importlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ._version import __version__
from ._extras import missing_train_extras, train_extras_notice
from ._workers import install_exit_guard, shutdown_loader
from .byol import BYOL
from .checkpoint import atomic_save, load_latest_checkpoint, remove_stale_temporaries, rng_state, save_checkpoint, set_rng_state
from .checkpoint import CheckpointUnreadableError, ForeignCheckpointError, nonfinite_entries, set_aside
from .data import EpochSampler, ImageFolderDataset, LabelledImageFolder, collate_pairs, collate_skip_none
from .decode import DECODE_CHOICES, FastDecode
from .lock import RunLock, RunLockedError
from .optim import OPTIMIZERS, build_optimizer, warmup_cosine_lr

__all__ = ["MODEL_KEYS", "apply_cifar_stem", "build_backbone", "build_parser", "default_threads", "main", "plot_metrics"]

PROG = "byol-train"

BASE_LR = {"lars": 0.2, "sgd": 0.05, "adamw": 1e-3}
"""Default peak learning rate per 256 images (scaled linearly with ``--batch-size``)."""

DEFAULT_WEIGHT_DECAY = {"lars": 1.5e-6, "sgd": 1e-4, "adamw": 1e-2}
"""Default weight decay per optimizer (LARS: the paper's 1.5e-6)."""

MODEL_KEYS = (
    "backbone",
    "backbone_kwargs",
    "cifar_stem",
    "channels",
    "hidden_layer",
    "projection_size",
    "projection_hidden_size",
    "image_size",
    "optimizer",
)
"""Settings that must match the checkpoint when resuming (they change the model or the optimizer state)."""

_EVAL_CACHE_BYTES = 2 * 1024**3
_PLOT_INTERVAL_S = 60.0


class UsageError(ValueError):
    """Bad command-line input: reported as ``byol-train: error: ...`` with exit status 2."""


EXIT_DIVERGED = 3
"""Exit status when the loss or the model state became NaN or infinite (nothing non-finite was saved)."""


class _Diverged(RuntimeError):
    """The loss, or the model or optimizer state, became NaN or infinite."""


class _OutputError(RuntimeError):
    """Writing to ``--out`` failed (full disk, read-only file system...): reported with exit status 2."""


def _out_problem(out: Path, exc: OSError) -> str:
    """One line naming what is wrong with ``--out`` and what to do."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        fix = "free some space (or raise the quota)"
    elif exc.errno == errno.EROFS:
        fix = "choose a folder on a writable file system"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        fix = "fix the folder's permissions or choose another --out"
    else:
        fix = "check the disk or choose another --out"
    return f"cannot write to --out {out} ({reason}); {fix}"


def _lock_out(out_arg: str, ranks: "_Ranks") -> RunLock | None:
    """Creates ``--out`` and locks it for this run (rank 0 only); every rank raises the same UsageError if not."""
    lock: RunLock | None = None
    problem: str | None = None
    if ranks.main:
        out = Path(out_arg).expanduser()
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = RunLock(out).acquire()
        except RunLockedError as exc:
            problem = f"{exc}: a second byol-train must not write the same --out. Wait for it, stop it, or use another --out"
        except (FileExistsError, NotADirectoryError):
            problem = f"--out {out} (or a folder above it) is a file, not a folder; pass a folder path"
        except OSError as exc:
            problem = _out_problem(out, exc)
    if ranks.sum(int(problem is not None))[0]:  # a collective: the other ranks refuse with rank 0
        raise UsageError(problem or "rank 0 cannot use --out (see its message)")
    return lock


class _NoEvalData(RuntimeError):
    """No readable image in an evaluation split."""


# ---------------------------------------------------------------------------------------------- command line
def _hidden_layer(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value


def _json_dict(value: str) -> dict[str, Any]:
    try:
        out = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}); pass e.g. '{{\"num_classes\": 10}}'") from exc
    if not isinstance(out, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return out


def _bounded(kind: type, minimum: float, inclusive: bool, what: str) -> Callable[[str], Any]:
    """An argparse ``type`` parsing ``kind`` (int or float) that is finite and above ``minimum``."""

    def parse(value: str) -> Any:
        try:
            out = kind(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}") from exc
        if not math.isfinite(out) or out < minimum or (not inclusive and out == minimum):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}")
        return out

    return parse


_positive_int = _bounded(int, 0, False, "a positive integer")
_non_negative_int = _bounded(int, 0, True, "an integer >= 0")
_non_negative_float = _bounded(float, 0.0, True, "a finite number >= 0")


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """The default of ``--threads``: half the usable CPU cores, at least 1.

    Torch's own default (one intra-op thread per core) oversubscribes a machine on which anything else runs, the
    DataLoader workers included, and OpenMP threads that wait for a busy core make each step of a small model
    several times slower (``benchmarks/RESULTS.md``); half the cores keeps most of the speed of all of them on an
    idle machine.
    """
    return max(1, _usable_cpus() // 2)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it is a value (not None, False or an empty dict)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == {}:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``byol-train`` argument parser."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="BYOL self-supervised pretraining of a torchvision (or timm) backbone on a folder of images. "
        "Re-running the same command with the same --out resumes from OUT/last.pt.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        metavar="DIR",
        help="training images: an ImageFolder tree or a flat folder (scanned recursively; labels unused)",
    )
    g.add_argument("--eval-data", metavar="DIR", help="labelled DIR/train/<class>/* and DIR/test/<class>/* for the kNN monitor")
    g.add_argument(
        "--demo",
        action="store_true",
        help="generate a small synthetic data set in OUT/demo_data and use the demo settings",
    )
    g.add_argument(
        "--channels",
        type=_positive_int,
        default=None,
        metavar="N",
        help="input channels: 1 (grayscale), 3 or N; decodes 16-bit PNG/TIFF at full precision, multi-page TIFF "
        "and .npy files, and adapts the backbone's first convolution (default: 8-bit RGB decoding)",
    )
    g.add_argument("--image-size", type=_positive_int, default=224, help="augmented view size (pixels)")
    g.add_argument(
        "--load-size",
        type=_positive_int,
        default=None,
        help="decoded image size before augmentation (default: image size, or 8/7 of it above 64 px)",
    )
    g.add_argument(
        "--workers",
        type=_non_negative_int,
        default=min(4, os.cpu_count() or 1),
        help="DataLoader worker processes (default: %(default)s, min(4, CPU count))",
    )
    g.add_argument("--out", metavar="DIR", default="runs/byol", help="output folder (checkpoints, backbones, metrics)")
    g.add_argument(
        "--cache",
        metavar="DIR",
        default=None,
        help="decode --data once into a memory-mapped uint8 array in DIR, reused by later runs and resumes while the "
        "folder and --load-size are unchanged (rebuilt when they change); batches are then slices of the map, no "
        "decoding. Disk cost: images x channels x load-size^2 bytes (CIFAR-10 at 32 px: 154 MB; 1.28M images at "
        "160 px RGB: 98 GB). Pays off when decoding limits the run: small images, few CPU cores, many epochs",
    )
    g.add_argument(
        "--decode",
        choices=DECODE_CHOICES,
        default="auto",
        help="where the folder path decodes images: auto (GPU nvJPEG batches on CUDA, else the fastest CPU decoder "
        "per format), cpu, or gpu (falls back to the CPU with an info line where it cannot run); with --cache, "
        "the cache is built with the CPU decoders",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--backbone",
        default="resnet18",
        help="torchvision model name (torchvision.models.list_models()), timm:NAME, hf:MODEL_ID_OR_PATH for a Hugging "
        "Face transformers vision model (pretrained weights unless --no-pretrained; use --hidden-layer -1), or "
        "MODULE:CALLABLE for your own model (e.g. mypkg.nets:MyCNN, called with --backbone-kwargs)",
    )
    g.add_argument(
        "--no-pretrained",
        action="store_true",
        help="hf: backbones start from random weights (the model's config only) instead of its pretrained weights",
    )
    g.add_argument(
        "--backbone-kwargs",
        type=_json_dict,
        default={},
        metavar="JSON",
        help="keyword arguments for the model builder",
    )
    g.add_argument("--cifar-stem", action="store_true", help="ResNet stem for 32 px images: 3x3 stride-1 conv1, no max-pool")
    g.add_argument(
        "--hidden-layer",
        type=_hidden_layer,
        default=-2,
        help="representation layer: module name, or index into the top-level children",
    )
    g.add_argument("--projection-size", type=_positive_int, default=256, help="projector/predictor output size")
    g.add_argument("--projection-hidden-size", type=_positive_int, default=4096, help="projector/predictor hidden size")
    g.add_argument("--moving-average-decay", type=float, default=0.99, help="base tau of the target EMA (cosine-scheduled to 1)")
    g.add_argument(
        "--augment-kwargs",
        type=_json_dict,
        default={},
        metavar="JSON",
        help="overrides of the paper's augmentations for both views (byol_wrapper.byol_views keywords), "
        "e.g. '{\"crop_scale\": [0.3, 1.0], \"grayscale_p\": 0.4}'",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        help="images per optimizer step, over all processes under torchrun (each takes an equal share)",
    )
    g.add_argument("--epochs", type=_positive_int, default=100, help="passes over --data")
    g.add_argument("--max-steps", type=_positive_int, default=None, help="total optimizer steps (overrides --epochs)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="lars", help="LARS as in the paper, AdamW or SGD with momentum")
    g.add_argument(
        "--lr",
        type=_non_negative_float,
        default=None,
        help="peak learning rate (default: 0.2 LARS, 0.05 SGD, 1e-3 AdamW, times batch-size/256)",
    )
    g.add_argument("--final-lr", type=_non_negative_float, default=0.0, help="learning rate at the end of the cosine decay")
    g.add_argument(
        "--weight-decay",
        type=_non_negative_float,
        default=None,
        help="weight decay, biases and norm parameters excluded (default: 1.5e-6 LARS, 1e-4 SGD, 1e-2 AdamW)",
    )
    g.add_argument("--momentum", type=_non_negative_float, default=0.9, help="LARS/SGD momentum")
    g.add_argument("--trust-coefficient", type=_non_negative_float, default=1e-3, help="LARS eta")
    g.add_argument(
        "--warmup-epochs",
        type=_non_negative_float,
        default=None,
        help="linear warmup length in epochs (default: the paper's 10 epochs, at most a tenth of the training steps)",
    )
    g.add_argument(
        "--warmup-steps",
        type=_non_negative_int,
        default=None,
        help="linear warmup length in steps (overrides --warmup-epochs)",
    )
    g.add_argument(
        "--precision",
        choices=("32", "bf16", "fp16"),
        default="32",
        help="autocast precision (fp16 uses a GradScaler; CUDA only)",
    )
    g.add_argument(
        "--channels-last",
        action="store_true",
        help="channels-last memory format for the backbone and the views (faster convolutions on recent GPUs)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training forward (augmentations, both networks and the loss; minutes of compilation "
        "at the start of each run and resume)",
    )

    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help=f"intra-op CPU threads of the training process (default: {default_threads()}, half of this machine's "
        f"{_usable_cpus()} usable CPU cores: the rest is left to the --workers and to other programs, because more "
        "threads than free cores make small models several times slower)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and augmentations")
    g.add_argument(
        "--eval-every",
        type=_non_negative_int,
        default=1,
        help="kNN evaluation every N epochs (0: only before and after training)",
    )
    g.add_argument("--knn-k", type=_positive_int, default=200, help="neighbours of the kNN monitor")
    g.add_argument("--knn-temperature", type=float, default=0.1, help="temperature of the kNN neighbour weights")
    g.add_argument("--eval-batch-size", type=_positive_int, default=256, help="batch size of feature extraction")
    g.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=500,
        help="write OUT/last.pt every N optimizer steps (and at the end)",
    )
    g.add_argument(
        "--log-every",
        type=_positive_int,
        default=10,
        help="fetch the loss from the device and write metrics every N steps",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


# ---------------------------------------------------------------------------------------------- model
def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """Replaces a ResNet's stem by a 3x3 stride-1 ``conv1`` and removes its max-pool (for 32 px images).

    Args:
        model: A ResNet-style model with a ``conv1`` ``nn.Conv2d`` and a ``maxpool`` attribute (modified in
            place).

    Returns:
        ``model``.

    Raises:
        ValueError: The model has no ``conv1`` convolution or no ``maxpool``.
    """
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(
            f"--cifar-stem needs a ResNet-style model with a conv1 convolution and a maxpool layer; "
            f"{type(model).__name__} has none. Drop --cifar-stem for this backbone"
        )
    new = nn.Conv2d(conv1.in_channels, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    model.conv1 = new.to(conv1.weight.device, conv1.weight.dtype)
    model.maxpool = nn.Identity()
    return model


def build_backbone(
    name: str, *, cifar_stem: bool = False, channels: int | None = None, pretrained: bool = True, **kwargs: Any
) -> nn.Module:
    """Creates a randomly initialised backbone by name, as ``byol-train`` does.

    Use it to rebuild the module that ``OUT/backbone.pt`` loads into:
    ``build_backbone("resnet18", cifar_stem=True).load_state_dict(torch.load("OUT/backbone.pt"))``.

    Args:
        name: A torchvision model name (``torchvision.models.list_models()``), ``"timm:NAME"`` for a timm model
            (a name torchvision does not know is also tried in timm when timm is installed), or
            ``"MODULE:CALLABLE"`` for any importable class or function that returns an ``nn.Module`` (e.g.
            ``"byol_wrapper.demo:SmallCNN"`` or ``"mypkg.models:MyNet"``; the module must be importable, so run
            from its folder or install it).
            ``"hf:MODEL_ID_OR_PATH"`` builds a Hugging Face ``transformers`` vision model (``AutoModel``) from a
            local folder written by ``save_pretrained`` or a hub id.
        cifar_stem: Apply :func:`apply_cifar_stem`.
        channels: Input channels: timm models get ``in_chans``, ``hf:`` models ``num_channels``, torchvision
            models their first convolution adapted (:func:`byol_wrapper.channels.adapt_first_conv`);
            ``MODULE:CALLABLE`` models are used as built. ``None``: the model's default (3).
        pretrained: ``hf:`` models only: load the pretrained weights (``False``: random init from the config).
        **kwargs: Passed to the model builder (e.g. ``num_classes``).

    Returns:
        The model, with random weights (``weights=None``), except ``hf:`` models with ``pretrained``.

    Raises:
        TypeError: ``name`` is not a string, the builder rejects ``kwargs``, or a ``MODULE:CALLABLE`` is not
            callable or does not return an ``nn.Module``.
        ValueError: Unknown name (with the closest torchvision names), timm requested but not installed, a
            ``MODULE:CALLABLE`` whose module cannot be imported or has no such attribute, or ``cifar_stem`` on a
            model without a ResNet stem.
    """
    import torchvision

    if not isinstance(name, str) or not name:
        raise TypeError(f"backbone must be a model name such as 'resnet18', got {name!r}")
    if channels is not None and name.startswith("timm:"):
        kwargs = {"in_chans": channels, **kwargs}
    if name.startswith("timm:"):
        model = _timm_model(name[len("timm:") :], kwargs)
    elif name.startswith("hf:"):
        model = _hf_model(name[len("hf:") :], pretrained, channels, kwargs)
    elif ":" in name:
        model = _imported_model(name, kwargs)
    else:
        try:
            builder = torchvision.models.get_model_builder(name)
        except ValueError:
            try:
                import timm  # noqa: F401
            except ImportError:
                close = difflib.get_close_matches(name, torchvision.models.list_models(), n=5)
                hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
                raise ValueError(f"--backbone {name!r} is not a torchvision model (and timm is not installed){hint}") from None
            try:
                model = _timm_model(name, {"in_chans": channels, **kwargs} if channels is not None else kwargs)
            except ValueError:
                import timm

                if name in timm.list_models():
                    raise
                close = difflib.get_close_matches(name, [*torchvision.models.list_models(), *timm.list_models()], n=5)
                hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models() and timm.list_models()"
                raise ValueError(f"--backbone {name!r} is neither a torchvision nor a timm model{hint}") from None
        else:
            model = builder(weights=None, **kwargs)
            if channels is not None:
                from .channels import adapt_first_conv

                adapt_first_conv(model, channels)
    if cifar_stem:
        apply_cifar_stem(model)
    return model


def _hf_model(spec: str, pretrained: bool, channels: int | None, kwargs: dict[str, Any]) -> nn.Module:
    """A ``transformers`` vision model from a folder or hub id: pretrained, or random from its config."""
    if not spec:
        raise ValueError("write hf:MODEL_ID_OR_PATH, e.g. hf:facebook/dinov2-small or hf:./my_vit (a save_pretrained folder)")
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError:
        raise ValueError(f"--backbone hf:{spec} needs transformers; install it with `pip install transformers`") from None
    overrides = dict(kwargs)
    if channels is not None:
        overrides["num_channels"] = channels
    try:
        config = AutoConfig.from_pretrained(spec, **overrides)
    except Exception as exc:  # noqa: BLE001 - OSError (not found, offline), ValueError (not a model config)
        raise ValueError(f"cannot read the configuration of hf:{spec} ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    if channels is not None and not hasattr(config, "num_channels"):
        raise ValueError(f"hf:{spec} ({type(config).__name__}) has no num_channels setting, so --channels cannot be applied")
    if not pretrained:
        return AutoModel.from_config(config)
    try:
        return AutoModel.from_pretrained(spec, config=config)
    except Exception as exc:  # noqa: BLE001 - no weights file, offline hub, or weights that do not fit the config
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"cannot load the pretrained weights of hf:{spec} ({type(exc).__name__}: {first}); pass --no-pretrained to "
            "start from random weights"
            + (", or drop --channels to keep the pretrained number of input channels" if channels is not None else "")
        ) from exc


def _imported_model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    """Builds ``MODULE:CALLABLE`` (``CALLABLE`` may be dotted, e.g. ``pkg.mod:Outer.build``) with ``kwargs``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"--backbone {spec!r}: write MODULE:CALLABLE with one colon, e.g. mypkg.models:MyNet")
    # Like `python -m` (and unlike a console script, whose sys.path starts with its bin folder), a module in the
    # current folder is importable: `byol-train --backbone mynets:Net` run next to mynets.py finds it.
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)  # appended: never shadows an installed package
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"--backbone {spec!r}: cannot import module {module_name!r} ({exc}); install it, or run from the folder "
            "that holds it"
        ) from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([module_name, *attr.split(".")[:i]])
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; it has {', '.join(names[:20]) or 'no public names'}"
            raise ValueError(f"--backbone {spec!r}: {owner} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"--backbone {spec!r}: {attr} is a {type(obj).__name__}, not a class or function building a model")
    model = obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"--backbone {spec!r}: {attr}(...) returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _timm_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ValueError(f"--backbone timm:{name} needs timm; install it with `pip install timm`") from None
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:  # timm raises RuntimeError("Unknown model ...")
        raise ValueError(f"--backbone {name!r}: {exc}") from exc


class _Embedder(nn.Module):
    """Images in [0, 1] -> the learner's normalised representation (what the kNN monitor sees)."""

    def __init__(self, learner: BYOL) -> None:
        super().__init__()
        self.learner = learner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.learner(x, return_embedding=True, return_projection=False)


# ---------------------------------------------------------------------------------------------- helpers
def _resolve_device(spec: str | None) -> torch.device:
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"--device {spec!r} is not a torch device; use e.g. cpu, cuda or cuda:1") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec} requested but CUDA is not available; use --device cpu")
    if device.type == "meta":
        raise UsageError("--device meta holds no data and cannot train; use --device cpu or cuda")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"--device {spec} requested but MPS (Apple GPU) is not available here; use --device cpu")
    if device.type != "cpu":
        try:
            torch.empty(1, device=device)  # e.g. cuda:3 on a 1-GPU machine, or a backend this build lacks
        except (RuntimeError, AssertionError, AttributeError) as exc:
            detail = (str(exc).splitlines() or [""])[0][:160]
            raise UsageError(f"--device {spec} cannot be used ({detail}); use --device cpu or a device that exists") from exc
    return device


class _Ranks:
    """The ranks of a ``torchrun`` launch (``WORLD_SIZE > 1``), or the one process of a plain run.

    Collectives that only carry host values (flags, RNG states) go over a gloo group, so they never wait for
    the GPU: with NCCL a separate gloo group is created for them.
    """

    def __init__(self, world: int = 1, rank: int = 0, host_group: Any = None) -> None:
        self.world = world
        self.rank = rank
        self.host_group = host_group
        self.main = rank == 0

    def sum(self, *values: int) -> list[int]:
        """The element-wise sum of ``values`` over all ranks (host ints, gloo)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, group=self.host_group)
        return [int(v) for v in t.tolist()]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.host_group)
        return out

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over all ranks (a device collective)."""
        if self.world == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.host_group)


def _start_ranks(spec: str | None) -> tuple[_Ranks, torch.device]:
    """Joins the ``torchrun`` process group when ``WORLD_SIZE > 1``; returns the ranks and this rank's device.

    Each rank uses ``cuda:LOCAL_RANK`` (NCCL) when the device is CUDA, else the CPU (gloo).
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or "1")
    except ValueError as exc:
        raise UsageError(f"WORLD_SIZE must be an int (set by torchrun), got {os.environ.get('WORLD_SIZE')!r}") from exc
    device = _resolve_device(spec)
    if world <= 1:
        return _Ranks(), device
    if not dist.is_available():
        raise UsageError(f"WORLD_SIZE={world} (torchrun) but this torch build has no torch.distributed")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UsageError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible; launch at most that many "
                "processes per node (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return _Ranks(dist.get_world_size(), dist.get_rank(), host_group), device


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "fp16" and device.type != "cuda":
        warnings.warn(
            f"--precision fp16 (with a GradScaler) needs a CUDA device; training in float32 on {device.type} "
            "(use --precision bf16 for bfloat16 autocast on the CPU)",
            RuntimeWarning,
            stacklevel=2,
        )
        return "32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16 is not supported by this GPU; use --precision fp16 or 32")
    return precision


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _grad_scaler(device: torch.device) -> Any:
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()  # torch < 2.3


def _default_load_size(image_size: int) -> int:
    return image_size if image_size <= 64 else int(round(image_size * 8 / 7))


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if isinstance(rec, dict):
                    records.append(rec)
    return records


def _truncate_metrics(path: Path, keep_up_to_step: int) -> None:
    """Keeps the records with ``step <= keep_up_to_step`` (the part of the log the checkpoint covers)."""
    if not path.exists():
        return
    keep = [r for r in _read_metrics(path) if isinstance(r.get("step"), int) and r["step"] <= keep_up_to_step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in keep:
            f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_metrics(metrics_path: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> bool:
    """Plots the training loss and kNN accuracy of a ``metrics.jsonl`` against the step.

    Args:
        metrics_path: The JSON-lines log written by ``byol-train``.
        png_path: Where to write the PNG.

    Returns:
        ``True`` if the plot was written, ``False`` (with a warning) if matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping metrics.png (pip install matplotlib)", RuntimeWarning, stacklevel=2)
        return False
    from .plot import render_metrics_png  # loss, lr/tau, kNN against chance and random init, collapse statistics

    render_metrics_png(_read_metrics(Path(metrics_path)), png_path)
    return True


class _NoBar:
    """Stand-in for tqdm when it is missing or disabled: prints a line per logging window."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.n, self.total, self.enabled = initial, total, enabled

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, values: dict[str, str], refresh: bool = True) -> None:
        if self.enabled:
            print(f"step {self.n}/{self.total} " + " ".join(f"{k}={v}" for k, v in values.items()), file=sys.stderr)

    def write(self, msg: str, file: Any = None) -> None:
        print(msg, file=file or sys.stderr)

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, disable: bool) -> Any:
    if disable:
        return _NoBar(total, initial, enabled=False)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar(total, initial, enabled=True)
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops at a step boundary."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def _graceful_stop() -> Iterator[dict[str, int]]:
    """SIGINT/SIGTERM set a flag (the loop saves a checkpoint and stops); a second signal interrupts at once."""
    flag: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        if flag:
            raise KeyboardInterrupt
        flag["signal"] = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
            # Restart interrupted system calls (SA_RESTART): the flag is read at step boundaries anyway, and a
            # signal must not fail a blocking call inside the DataLoader or a collective (EINTR).
            signal.siginterrupt(sig, False)
        except (ValueError, OSError):  # pragma: no cover
            pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------------------------- the run
class _Trainer:
    """Holds the state of one ``byol-train`` invocation."""

    def __init__(self, args: argparse.Namespace, ranks: _Ranks | None = None, device: torch.device | None = None) -> None:
        self.args = args
        self.out = Path(args.out).expanduser()
        self.ranks = ranks or _Ranks()
        self.device = device if device is not None else _resolve_device(args.device)
        self.precision = _resolve_precision(args.precision, self.device)
        if args.data is None:
            raise UsageError("--data DIR is required (a folder of images), or use --demo")
        self.image_size = args.image_size
        self.load_size = args.load_size or _default_load_size(args.image_size)
        if self.load_size < args.image_size:
            warnings.warn(
                f"--load-size {self.load_size} is smaller than --image-size {args.image_size}: views are upsampled",
                RuntimeWarning,
                stacklevel=2,
            )
        if not math.isfinite(args.knn_temperature) or args.knn_temperature <= 0:
            raise UsageError(f"--knn-temperature must be > 0, got {args.knn_temperature}")
        if not 0.0 <= args.moving_average_decay <= 1.0:
            raise UsageError(f"--moving-average-decay must be in [0, 1] (e.g. 0.99 or the paper's 0.996), got {args.moving_average_decay}")

        # Data: scan now so that a missing or empty folder fails before anything starts.
        try:
            self.dataset = ImageFolderDataset(args.data, self.load_size, channels=args.channels)
        except ValueError as exc:
            raise UsageError(f"--data: {exc}") from exc
        if args.channels is None:  # --channels decodes at full precision with byol_wrapper.image_io instead
            self.dataset = FastDecode(self.dataset)  # the fastest decoder per format (byol_wrapper.decode)
        elif args.cache is not None:
            raise UsageError("--cache holds 8-bit RGB images and cannot be used with --channels (full-precision "
                             "decoding); drop --cache, or drop --channels for 8-bit RGB data")
        self.steps_per_epoch = len(self.dataset) // args.batch_size
        if self.steps_per_epoch == 0:
            raise UsageError(
                f"--batch-size {args.batch_size} is larger than the {len(self.dataset)} images in --data "
                f"{args.data}; lower --batch-size to at most {len(self.dataset)}"
            )
        if args.batch_size < 2:
            raise UsageError("--batch-size must be at least 2 (BatchNorm in the BYOL heads needs batch statistics)")
        world = self.ranks.world
        if args.batch_size % world or args.batch_size // world < 2:
            raise UsageError(
                f"--batch-size is the global batch, split over the {world} processes: it must be a multiple of {world} "
                f"with at least 2 images per process; got {args.batch_size}"
            )
        self.rank_batch = args.batch_size // world
        self.eval_sets: tuple[Any, Any] | None = None
        if args.eval_data is not None:
            root = Path(args.eval_data).expanduser()
            try:
                train = LabelledImageFolder(root / "train", self.image_size, channels=args.channels)
                test = LabelledImageFolder(root / "test", self.image_size, classes=train.classes, channels=args.channels)
            except ValueError as exc:
                raise UsageError(f"--eval-data must hold train/<class>/* and test/<class>/* image folders: {exc}") from exc
            self.eval_sets = (train, test)

        self.total_steps = args.max_steps or args.epochs * self.steps_per_epoch
        if args.warmup_steps is not None:
            warmup = args.warmup_steps
        elif args.warmup_epochs is not None:
            warmup = int(round(args.warmup_epochs * self.steps_per_epoch))
        else:
            warmup = min(10 * self.steps_per_epoch, self.total_steps // 10)
        if warmup > self.total_steps:
            warnings.warn(f"warmup ({warmup} steps) is longer than training ({self.total_steps} steps); shortened", RuntimeWarning, stacklevel=2)
        self.warmup_steps = min(warmup, self.total_steps)
        self.base_lr = args.lr if args.lr is not None else BASE_LR[args.optimizer] * args.batch_size / 256
        self.weight_decay = args.weight_decay if args.weight_decay is not None else DEFAULT_WEIGHT_DECAY[args.optimizer]
        self.config = self._config()

        self.ckpt_path = self.out / "last.pt"
        self.metrics_path = self.out / "metrics.jsonl"
        refused: str | None = None
        set_aside_before = self._set_aside_files()
        if self.ranks.main:  # rank 0 first: it sets a corrupt checkpoint aside before the others read
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise UsageError(f"--out {self.out} (or a folder above it) is a file, not a folder; pass a folder path") from None
            except OSError as exc:
                raise UsageError(_out_problem(self.out, exc)) from exc
            remove_stale_temporaries(self.out)
            try:
                checkpoint, source = load_latest_checkpoint(self.ckpt_path, map_location="cpu")
            except CheckpointUnreadableError as exc:
                refused = f"{exc}; fix the file's permissions or the disk and re-run: nothing was changed in {self.out}"
            except ForeignCheckpointError as exc:
                refused = f"{exc}. Move it out of {self.out} or use another --out: byol-train will not train over it"
        if self.ranks.sum(int(refused is not None))[0]:  # also the barrier: every rank refuses with rank 0
            raise UsageError(refused or "rank 0 cannot use the checkpoint in --out (see its message)")
        if not self.ranks.main:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rank 0 already warned
                checkpoint, source = load_latest_checkpoint(self.ckpt_path, map_location="cpu")
        if checkpoint is not None:
            self._check_compatible(checkpoint.get("config", {}), source)
        else:
            self._seed_everything(args.seed)  # the same on every rank: identical initial weights

        # Model, learner, optimizer.
        try:
            backbone = build_backbone(
                args.backbone,
                cifar_stem=args.cifar_stem,
                channels=args.channels,
                pretrained=not args.no_pretrained,
                **args.backbone_kwargs,
            )
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--backbone {args.backbone} (--backbone-kwargs {json.dumps(args.backbone_kwargs)}): {exc}") from exc
        backbone = backbone.to(self.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
        try:
            self.learner = BYOL(
                backbone,
                self.image_size,
                hidden_layer=args.hidden_layer,
                projection_size=args.projection_size,
                projection_hidden_size=args.projection_hidden_size,
                moving_average_decay=args.moving_average_decay,
                total_steps=self.total_steps,
                augment_kwargs=args.augment_kwargs,
                channels=args.channels,
            )
        except (TypeError, ValueError) as exc:
            raise UsageError(
                f"cannot build the BYOL learner (--backbone {args.backbone}, --hidden-layer {args.hidden_layer}, "
                f"--augment-kwargs {json.dumps(args.augment_kwargs)}): {exc}"
            ) from exc
        self.optimizer = build_optimizer(
            args.optimizer,
            self.learner,
            lr=self.base_lr,
            weight_decay=self.weight_decay,
            momentum=args.momentum,
            trust_coefficient=args.trust_coefficient,
        )
        self.scaler = _grad_scaler(self.device) if self.precision == "fp16" else None
        self.model: nn.Module = self.learner
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Reads the learner's _ddp_params_and_buffers_to_ignore: no find_unused_parameters needed.
            self.model = DistributedDataParallel(self.learner, device_ids=[self.device] if self.device.type == "cuda" else None)
        if args.compile:
            # The whole forward in one graph (DDP-wrapped: compiled around DDP, as PyTorch recommends). The EMA
            # update stays eager; checkpoints and exports read the plain learner, so their keys do not change.
            self.model = torch.compile(self.model)

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped_total = 0
        self.elapsed_before = 0.0
        self.resumed_from: Path | None = None
        self.good_step: int | None = None  # step of the checkpoint on disk (always finite)
        if checkpoint is not None:
            self._restore(checkpoint)
            self.resumed_from = source
            self.good_step = self.step
        else:
            if self.ranks.main and self.metrics_path.exists():
                # A fresh start: the history of the lost run is kept aside, never deleted (checkpoints set aside as
                # corrupt, or deleted by the user, may still be wanted with it).
                new_aside = self._set_aside_files() - set_aside_before
                kept = set_aside(self.metrics_path, "old")
                warnings.warn(
                    f"starting from step 0: the earlier log {self.metrics_path.name} was kept as {kept.name}"
                    + (f" (with {', '.join(sorted(new_aside))})" if new_aside else ""),
                    RuntimeWarning,
                    stacklevel=2,
                )
            if world > 1:  # same weights everywhere, but each rank draws its own augmentations
                self._seed_everything(args.seed + self.ranks.rank)

        self.sampler = EpochSampler(len(self.dataset), seed=args.seed, num_replicas=world, rank=self.ranks.rank)
        loader_gen = torch.Generator()
        loader_gen.manual_seed(args.seed + self.ranks.rank)
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.rank_batch,
            sampler=self.sampler,
            num_workers=args.workers,
            collate_fn=collate_skip_none,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=args.workers > 0,
            generator=loader_gen,  # keeps the global RNG (augmentations) independent of loader creation
            worker_init_fn=_ignore_stop_signals,
        )
        self.decode = "cpu"
        self._setup_fast_data()  # --cache / --decode: replaces self.loader (same sampler, same batches)
        self._eval_cache: dict[str, Any] = {}
        if self.ranks.main:
            try:
                with open(self.out / "config.json", "w", encoding="utf-8") as f:
                    json.dump(self.config, f, indent=2)
            except OSError as exc:
                raise UsageError(_out_problem(self.out, exc)) from exc

    # ------------------------------------------------------------------ setup helpers
    def _set_aside_files(self) -> set[str]:
        """Names of the checkpoints set aside as corrupt in ``--out``."""
        try:
            return {p.name for p in self.out.glob("last*.corrupt*")}
        except OSError:
            return set()

    def _setup_fast_data(self) -> None:
        from .pipeline import fast_loader

        if self.args.channels is not None:  # full-precision decoding on the CPU (checked against --cache above)
            if self.args.decode == "gpu":
                self._say_now("info: --decode gpu decodes 8-bit RGB JPEGs only; --channels decodes on the CPU")
            return

        ordered = self.args.cache is not None and self.ranks.world > 1  # rank 0 builds (and reports) first
        if ordered and not self.ranks.main:
            self.ranks.barrier()
        try:
            self.loader, self.decode = fast_loader(self, self.args, self.dataset, self.sampler, self.loader, self._say_now)
        except ValueError as exc:
            raise UsageError(f"--cache: {exc}") from exc
        finally:
            if ordered and self.ranks.main:
                self.ranks.barrier()  # also on an error: the others then fail the same way instead of waiting

    def _say_now(self, msg: str) -> None:
        if self.ranks.main:
            print(msg, file=sys.stderr)

    def _config(self) -> dict[str, Any]:
        a = self.args
        return {
            "version": __version__,
            "data": str(a.data),
            "eval_data": None if a.eval_data is None else str(a.eval_data),
            "backbone": a.backbone,
            "backbone_kwargs": a.backbone_kwargs,
            "cifar_stem": bool(a.cifar_stem),
            "channels": a.channels,
            "hidden_layer": a.hidden_layer,
            "projection_size": a.projection_size,
            "projection_hidden_size": a.projection_hidden_size,
            "moving_average_decay": a.moving_average_decay,
            "augment_kwargs": a.augment_kwargs,
            "image_size": a.image_size,
            "load_size": self.load_size,
            "batch_size": a.batch_size,
            "epochs": a.epochs,
            "max_steps": a.max_steps,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "warmup_steps": self.warmup_steps,
            "optimizer": a.optimizer,
            "lr": self.base_lr,
            "final_lr": a.final_lr,
            "weight_decay": self.weight_decay,
            "momentum": a.momentum,
            "trust_coefficient": a.trust_coefficient,
            "precision": self.precision,
            "channels_last": bool(a.channels_last),
            "compile": bool(a.compile),
            "seed": a.seed,
            "device": str(self.device),
            "world_size": self.ranks.world,
        }

    def _check_compatible(self, saved: dict[str, Any], source: Path | None) -> None:
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {self.config[k]!r}" for k in MODEL_KEYS if saved.get(k) != self.config[k]]
        if diffs:
            flags = ", ".join("--" + d.split(":")[0].replace("_", "-") for d in diffs)
            raise UsageError(
                f"the checkpoint {source} was trained with different model settings ({'; '.join(diffs)}). "
                f"Resume with the same {flags}, or start a new run with a different --out"
            )

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            import numpy as np

            np.random.seed(seed % 2**32)
        except ImportError:  # pragma: no cover
            pass

    def _restore(self, ckpt: dict[str, Any]) -> None:
        try:
            self.learner.load_state_dict(ckpt["learner"])
        except RuntimeError as exc:
            raise UsageError(f"the checkpoint in {self.out} does not fit the model built from these flags: {exc}") from exc
        # The schedule follows this command's length and base tau (a longer --max-steps extends training).
        self.learner.total_steps = self.total_steps
        self.learner.moving_average_decay = float(self.args.moving_average_decay)
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, fresh):
            group.update(settings)  # hyper-parameters from this command, state (momentum) from the checkpoint
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.epoch = int(ckpt["epoch"])
        self.batch_in_epoch = int(ckpt["batch_in_epoch"])
        if self.batch_in_epoch >= self.steps_per_epoch:  # the data set shrank since the checkpoint
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.skipped_total = int(ckpt.get("skipped_images", 0))
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        saved = ckpt.get("config", {})
        per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]]
        if len(per_rank) == self.ranks.world:
            set_rng_state(per_rank[self.ranks.rank])
        else:  # another number of processes: the data order is the same, the augmentations' random draws are not
            self._seed_everything(self.args.seed + 1_000_003 * self.step + self.ranks.rank)
            if self.ranks.main:
                warnings.warn(
                    f"the checkpoint was written by {len(per_rank)} process(es), this run has {self.ranks.world}: the "
                    "random generators are re-seeded, so augmentations differ from an uninterrupted run (the data order "
                    "and the schedules do not)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        ignore = {*MODEL_KEYS, "version", "total_steps", "epochs", "max_steps", "device", "warmup_steps", "world_size"}
        changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in self.config.items() if k not in ignore and k in saved and saved[k] != v]
        if changed and self.ranks.main:
            warnings.warn(f"settings changed since the checkpoint: {', '.join(changed)}", RuntimeWarning, stacklevel=2)
        old_total = saved.get("total_steps")
        if old_total is not None and old_total != self.total_steps and self.ranks.main:
            warnings.warn(
                f"training length changed from {old_total} to {self.total_steps} steps: the learning-rate and tau "
                "schedules continue from the current step on the new length",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.ranks.main:
            _truncate_metrics(self.metrics_path, self.step)

    # ------------------------------------------------------------------ checkpoints and outputs
    def _state(self) -> dict[str, Any]:
        rngs = self.ranks.gather(rng_state())
        return {
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped_images": self.skipped_total,
            "elapsed_s": self._elapsed(),
            "rng": rngs[0],
            "rng_per_rank": rngs if self.ranks.world > 1 else None,
            "config": self.config,
        }

    def save(self) -> None:
        """Writes ``OUT/last.pt`` (previous one kept as ``last.prev.pt``); on rank 0, with every rank's RNG state."""
        epoch, batch = self.epoch, self.batch_in_epoch
        if batch >= self.steps_per_epoch:  # end of an epoch: resume at the start of the next one
            self.epoch, self.batch_in_epoch = epoch + 1, 0
        start = time.perf_counter()
        try:
            state = self._state()  # a collective: every rank takes part
            # Never write a diverged state over a finite checkpoint: one reduction per tensor on the device, one
            # host sync (the write below copies everything to the host anyway). Every rank checks its own copy and
            # they agree, so all of them stop together.
            bad = nonfinite_entries({k: state[k] for k in ("learner", "optimizer", "scaler")})
            if self.ranks.sum(int(bool(bad)))[0]:
                raise _Diverged(self._nonfinite_message(bad))
            if self.ranks.main:
                try:
                    save_checkpoint(state, self.ckpt_path)
                except OSError as exc:
                    kept = f"{self.ckpt_path} still holds step {self.good_step}" if self.good_step is not None else "no checkpoint was written"
                    raise _OutputError(f"{_out_problem(self.out, exc)}; {kept}, re-run the command to resume") from exc
            self.good_step = self.step
        finally:
            self.epoch, self.batch_in_epoch = epoch, batch
        self.window_start += time.perf_counter() - start  # images/s measures training only

    def _last_good(self) -> str:
        """What the checkpoint files hold, for divergence messages (true: nothing non-finite is ever saved)."""
        if self.good_step is None:
            return f"no checkpoint was written yet, so {self.out} has no state to resume from"
        return (
            f"{self.ckpt_path} still holds the last good checkpoint (step {self.good_step}, not overwritten); "
            f"re-running resumes from it, so lower --lr first"
        )

    def _nonfinite_message(self, bad: list[str]) -> str:
        since = f"after step {self.good_step}" if self.good_step is not None else "since the start"
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        return (
            f"the model state became NaN or infinite by step {self.step} (found when saving the step {self.step} "
            f"checkpoint; finite {since}): {names}. Not saved. Lower --lr, use --precision 32, or check the data; "
            f"{self._last_good()}"
        )

    def export_backbones(self) -> None:
        """Writes ``OUT/backbone.pt`` and ``OUT/backbone_ema.pt`` (plain ``state_dict``, CPU tensors); rank 0."""
        if not self.ranks.main:
            return
        cpu = lambda sd: {k: v.detach().cpu() for k, v in sd.items()}  # noqa: E731
        try:
            atomic_save(cpu(self.learner.net.state_dict()), self.out / "backbone.pt")
            if self.learner.target_encoder is not None:
                atomic_save(cpu(self.learner.target_encoder.net.state_dict()), self.out / "backbone_ema.pt")
        except OSError as exc:
            raise _OutputError(f"{_out_problem(self.out, exc)} (backbone export); re-run the command to export again") from exc

    def _say(self, msg: str) -> None:
        if self.ranks.main:
            self.bar.write(msg, file=sys.stderr)

    def _plot(self) -> None:
        self.last_plot = time.perf_counter()
        if self.ranks.main and "matplotlib" not in missing_train_extras():  # else said once at the start
            try:
                plot_metrics(self.metrics_path, self.out / "metrics.png")
            except OSError as exc:
                raise _OutputError(f"{_out_problem(self.out, exc)} (metrics.png); re-run the command to resume") from exc

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def _log(self, record: dict[str, Any]) -> None:
        if self.metrics_file is not None:
            try:
                self.metrics_file.write(json.dumps(record) + "\n")
            except OSError as exc:
                raise _OutputError(f"{_out_problem(self.out, exc)} (metrics.jsonl); re-run the command to resume") from exc

    # ------------------------------------------------------------------ evaluation
    def _eval_split(self, name: str, dataset: LabelledImageFolder) -> Any:
        """The split as decoded ``(images, labels)`` tensors (cached), or a DataLoader if it is too large."""
        if name in self._eval_cache:
            return self._eval_cache[name]
        gen = torch.Generator()
        gen.manual_seed(self.args.seed)
        loader = DataLoader(
            dataset,
            batch_size=self.args.eval_batch_size,
            num_workers=self.args.workers,
            collate_fn=collate_pairs,
            pin_memory=self.device.type == "cuda",
            generator=gen,  # never draws from the global RNG, so evaluation cannot change the training run
            worker_init_fn=_ignore_stop_signals,
        )
        if len(dataset) * 3 * self.image_size**2 > _EVAL_CACHE_BYTES:
            return loader  # too big to keep decoded in memory: decode at every evaluation
        batches = [(x, y) for x, y in loader if x.shape[0]]
        if not batches:
            raise _NoEvalData(f"--eval-data {name} split has no readable image")
        cached = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
        self._eval_cache[name] = cached
        return cached

    def evaluate(self) -> None:
        """kNN accuracy of the online backbone's representation, logged as an ``eval`` record (rank 0 only)."""
        if self.eval_sets is None or not self.ranks.main:
            return
        from .evaluate import collapse_stats, extract_features, knn_accuracy

        start = time.perf_counter()
        encoder = _Embedder(self.learner)
        try:
            train, test = (self._eval_split(n, d) for n, d in zip(("train", "test"), self.eval_sets))
        except _NoEvalData as exc:
            warnings.warn(f"{exc}: kNN evaluation disabled", RuntimeWarning, stacklevel=2)
            self.eval_sets = None
            return
        with _autocast(self.device, self.precision):
            train_f = extract_features(encoder, train, batch_size=self.args.eval_batch_size, device=self.device)
            test_f = extract_features(encoder, test, batch_size=self.args.eval_batch_size, device=self.device)
        acc = knn_accuracy(
            None,
            train_f,
            test_f,
            k=self.args.knn_k,
            temperature=self.args.knn_temperature,
            num_classes=len(self.eval_sets[0].classes),
        )
        record: dict[str, Any] = {"event": "eval", "step": self.step, "epoch": self.epoch, "knn_accuracy": acc,
                                  "num_classes": len(self.eval_sets[0].classes)}
        if test_f[0].shape[0] >= 2:
            stats = collapse_stats(test_f[0])
            record.update(std_ratio=stats["std_ratio"], effective_rank=stats["effective_rank"])
        seconds = time.perf_counter() - start
        self.window_start += seconds  # images/s measures training only
        record.update(eval_seconds=round(seconds, 3), time=round(self._elapsed(), 3))
        self._log(record)
        self._flush_file()
        self._say(f"step {self.step}: kNN accuracy {100 * acc:.2f}% (k={self.args.knn_k})")
        from .plot import health_warnings

        for message in health_warnings([record]):
            self._say(f"warning: {message}")
        if time.perf_counter() - self.last_plot > _PLOT_INTERVAL_S and self.step < self.total_steps:
            self._plot()  # refreshed during long runs; always written at the end

    # ------------------------------------------------------------------ training
    def _flush_file(self) -> None:
        if self.metrics_file is not None:
            try:
                self.metrics_file.flush()
            except OSError as exc:
                raise _OutputError(f"{_out_problem(self.out, exc)} (metrics.jsonl); re-run the command to resume") from exc

    def _flush(self) -> None:
        """Fetches the pending losses in one transfer and writes their per-step records.

        With several ranks the losses are averaged over the ranks first (one collective per flush, at the same
        steps on every rank), so the log shows the loss of the global batch and every rank sees a divergence.
        """
        if not self.pending:
            return
        losses = self.ranks.mean(torch.stack([p["loss"] for p in self.pending]).float()).cpu().tolist()
        now = time.perf_counter()
        rate = self.ranks.world * self.window_images / max(now - self.window_start, 1e-9)
        for p, loss in zip(self.pending, losses):
            p["loss"] = loss
            p["images_per_sec"] = round(rate, 2)
            self._log(p)
        self._flush_file()
        done, self.pending = self.pending, []
        last = done[-1]
        self.window_images, self.window_start = 0, now
        self.bar.set_postfix(
            {"loss": f"{last['loss']:.4f}", "tau": f"{last['tau']:.5f}", "lr": f"{last['lr']:.3g}", "img/s": f"{rate:.1f}"},
            refresh=False,
        )
        bad = next((p for p in done if not math.isfinite(p["loss"])), None)
        if bad is not None:
            raise _Diverged(
                f"the loss became {bad['loss']} at step {bad['step']}; lower --lr, use --precision 32, or check the "
                f"data. {self._last_good()}"
            )

    def _train_step(self, images: torch.Tensor) -> torch.Tensor:
        lr = warmup_cosine_lr(self.step, self.total_steps, self.warmup_steps, self.base_lr, self.args.final_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.current_lr, self.current_tau = lr, self.learner.tau
        images = images.to(self.device, non_blocking=True)
        with _autocast(self.device, self.precision):
            loss = self.model(images)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.learner.update_moving_average()
        self.step += 1
        return loss.detach()

    def run(self) -> int:
        """Trains to ``total_steps``; returns the exit status."""
        args = self.args
        self.t_start = self.last_plot = time.perf_counter()
        self.pending: list[dict[str, Any]] = []
        self.window_images, self.window_start = 0, time.perf_counter()
        self.bar = _progress_bar(self.total_steps, self.step, args.no_progress or not self.ranks.main)
        if self.resumed_from is not None:
            self._say(
                f"resuming from {self.resumed_from} at step {self.step}/{self.total_steps} "
                f"(epoch {self.epoch}, batch {self.batch_in_epoch}/{self.steps_per_epoch})"
            )
        if self.ranks.world > 1:
            self._say(f"{self.ranks.world} processes, {self.rank_batch} images each per step (global batch {args.batch_size})")
        try:
            self.metrics_file = open(self.metrics_path, "a", encoding="utf-8") if self.ranks.main else None
        except OSError as exc:
            self._say(f"{PROG}: error: {_out_problem(self.out, exc)} (metrics.jsonl)")
            self.bar.close()
            return 2
        try:
            with _graceful_stop() as stop:
                return self._loop(stop)
        except _Diverged as exc:
            self._say(f"{PROG}: error: {exc}")
            return EXIT_DIVERGED
        except _OutputError as exc:
            self._say(f"{PROG}: error: {exc}")
            return 2
        finally:
            self.bar.close()
            if self.metrics_file is not None:
                self.metrics_file.close()

    def _loop(self, stop: dict[str, int]) -> int:
        args = self.args
        self.learner.train()
        if self.step == 0 and self.resumed_from is None:
            self.evaluate()  # the randomly initialised backbone, logged as step 0
        while self.step < self.total_steps:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch * args.batch_size)
            skipped_epoch, step_at_start = 0, self.step
            for images, _, skipped in self.loader:
                self.batch_in_epoch += 1
                too_few = images.shape[0] < 2  # fewer readable images than BatchNorm needs: skip the batch
                stopping: bool | None = None  # one process: read the signal flag when it is needed
                if self.ranks.world > 1:
                    # Every rank must take the same steps and stop after the same one: agree on host flags (gloo,
                    # no GPU sync). A batch is skipped everywhere if any rank has too few images; a signal to any
                    # rank stops all of them (a signal arriving after this point counts at the next batch).
                    few, signalled, skipped = self.ranks.sum(int(too_few), int(bool(stop)), skipped)
                    too_few, stopping = few > 0, signalled > 0
                skipped_epoch += skipped
                self.skipped_total += skipped
                stepped = not too_few
                if stepped:
                    loss = self._train_step(images)
                    self.pending.append(
                        {
                            "event": "train",
                            "step": self.step,
                            "epoch": self.epoch,
                            "loss": loss,
                            "tau": self.current_tau,
                            "lr": self.current_lr,
                            "time": round(self._elapsed(), 3),
                            "skipped_images": self.skipped_total,
                        }
                    )
                    self.window_images += images.shape[0]
                    self.bar.update(1)
                    if len(self.pending) >= args.log_every:
                        self._flush()
                end_of_epoch = self.batch_in_epoch >= self.steps_per_epoch
                done = self.step >= self.total_steps
                if end_of_epoch and skipped_epoch:
                    warnings.warn(
                        f"skipped {skipped_epoch} unreadable image(s) in epoch {self.epoch} "
                        f"({self.skipped_total} in total); see the warnings above for the files",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                if end_of_epoch or done:
                    self._flush()
                    if done or (args.eval_every and (self.epoch + 1) % args.eval_every == 0):
                        self.evaluate()
                if stopping is None:
                    stopping = bool(stop)
                if done or stopping or (stepped and self.step % args.checkpoint_every == 0):
                    self._flush()
                    self.save()
                if done:
                    break
                if stopping:
                    sig = stop.get("signal", signal.SIGTERM)  # SIGTERM where another rank got the signal
                    self._plot()
                    self._say(
                        f"stopped by signal {sig} at step {self.step}; checkpoint saved to {self.ckpt_path}. "
                        f"To resume, run the same command again (same --out {self.out})"
                    )
                    return 128 + sig
            if self.step == step_at_start:
                self._say(f"{PROG}: error: no batch with at least 2 readable images in epoch {self.epoch}; check --data")
                return 1
            if self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
        self._finish()
        return 0

    def _finish(self) -> None:
        self._flush()
        self.export_backbones()
        self._plot()
        if not self.ranks.main:
            return
        msg = f"done: {self.step} steps; backbones in {self.out / 'backbone.pt'} and {self.out / 'backbone_ema.pt'}"
        if self.skipped_total:
            msg += f"; {self.skipped_total} unreadable image(s) skipped"
        self._say(msg)
        evals = [r for r in _read_metrics(self.metrics_path) if r.get("event") == "eval" and r.get("knn_accuracy") is not None]
        if len(evals) >= 2 and evals[0].get("step") == 0:
            first, last = evals[0], evals[-1]
            gain = 100 * (last["knn_accuracy"] - first["knn_accuracy"])
            self._say(
                f"kNN accuracy: {100 * first['knn_accuracy']:.2f}% with random weights (step 0) -> "
                f"{100 * last['knn_accuracy']:.2f}% after {last['step']} steps of BYOL ({gain:+.2f} points)"
            )


# ---------------------------------------------------------------------------------------------- entry point
def _demo_argv(config: dict[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    """``DEMO_CONFIG`` as command-line flags, so that they are validated like the user's own."""
    options = {a.dest: a for a in parser._actions if a.option_strings}  # noqa: SLF001
    argv: list[str] = []
    for key, value in config.items():
        dest = key.replace("-", "_")
        action = options.get(dest)
        if action is None or dest in ("data", "eval_data", "demo", "help", "version") or value is None:
            continue  # settings for the data generator, or not flags of this command
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
            if value:
                argv.append(flag)
        else:
            argv += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return argv


def _apply_demo(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Re-parses with the demo settings before the user's flags (which win), and points the data at the demo set."""
    try:
        from . import demo
    except ImportError as exc:
        raise UsageError(f"--demo needs byol_wrapper.demo, which cannot be imported: {exc}") from exc
    config = dict(demo.DEMO_CONFIG)
    try:
        args = parser.parse_args(_demo_argv(config, parser) + argv)
    except SystemExit as exc:
        raise UsageError(f"byol_wrapper.demo.DEMO_CONFIG holds an invalid setting (see above): exit {exc.code}") from exc
    if args.data is None or args.eval_data is None:
        # Reused when complete (same parameters), so a resumed demo run trains on the same images.
        sizes = {k: config[k] for k in ("n_train_per_class", "n_test_per_class", "image_size") if k in config}
        root = Path(
            demo.generate_demo_dataset(
                Path(args.out).expanduser() / "demo_data", seed=config.get("data_seed", 0), **sizes
            )
        )
        if args.data is None:
            args.data = str(root / "train")
        if args.eval_data is None:
            args.eval_data = str(root)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``byol-train``.

    Args:
        argv: Command-line arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        Exit status: 0 done, 1 no batch with 2 readable images, 2 bad command line, data or ``--out`` (message on
        stderr; also when another run holds ``--out``), 3 (:data:`EXIT_DIVERGED`) the loss or the model state
        became NaN or infinite (nothing non-finite was saved), 128 + signal number when stopped by SIGINT/SIGTERM
        after saving a checkpoint.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a parse error (already printed)
        return int(exc.code or 0)
    torch.set_num_threads(args.threads or default_threads())
    install_exit_guard()  # no DataLoader worker can keep the interpreter from exiting
    notice = train_extras_notice(progress=not args.no_progress)
    if notice and os.environ.get("RANK", "0") == "0":
        print(notice, file=sys.stderr, flush=True)  # once, at the start (not when the first plot is due)
    ranks: _Ranks | None = None
    lock: RunLock | None = None
    trainer: _Trainer | None = None
    try:
        try:
            ranks, device = _start_ranks(args.device)
            if args.data is not None or args.demo:
                lock = _lock_out(args.out, ranks)  # before anything is written to --out (the demo data too)
            if args.demo:
                if ranks.main:  # rank 0 generates the demo data; the others then find it complete and reuse it
                    args = _apply_demo(args, parser, argv)
                ranks.barrier()
                if not ranks.main:
                    args = _apply_demo(args, parser, argv)
            trainer = _Trainer(args, ranks, device)
        except UsageError as exc:
            if ranks is None or ranks.main:
                print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        if trainer.step >= trainer.total_steps:
            if ranks.main:
                try:
                    trainer.export_backbones()
                    if not (trainer.out / "metrics.png").exists():
                        plot_metrics(trainer.metrics_path, trainer.out / "metrics.png")
                except (_OutputError, OSError) as exc:
                    print(f"{PROG}: error: {exc}", file=sys.stderr)
                    return 2
                print(
                    f"training in {trainer.out} is already complete ({trainer.step}/{trainer.total_steps} steps); "
                    "backbones re-exported. Raise --epochs or --max-steps to train longer",
                    file=sys.stderr,
                )
            return 0
        try:
            status = trainer.run()
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once
            print(f"{PROG}: interrupted; resume from the last checkpoint in {trainer.out} by re-running the command", file=sys.stderr)
            return 130
        # Every rank ends here with the same status (they agree on every step and on stopping): rank 0 has written
        # its checkpoint and backbones before any rank leaves the process group.
        ranks.barrier()
        return status
    finally:
        if trainer is not None:  # on every path: done, error, signal (a traceback may keep the trainer alive)
            shutdown_loader(trainer.loader)
        if lock is not None:
            lock.release()
        if ranks is not None and ranks.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
