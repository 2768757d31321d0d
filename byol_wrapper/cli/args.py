"""The ``byol-train`` argument parser, its value types and the ``--demo`` settings."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._version import __version__
from ..decode import DECODE_CHOICES
from ..optim import OPTIMIZERS

__all__ = ["PROG", "UsageError", "apply_demo", "build_parser", "check_augment_kwargs", "default_threads"]

PROG = "byol-train"


class UsageError(ValueError):
    """Bad command-line input: reported as ``byol-train: error: ...`` with exit status 2."""


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


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    """The ``data`` flags."""
    g = parser.add_argument_group("data")
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


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The ``model`` flags."""
    g = parser.add_argument_group("model")
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


def _add_optimisation_flags(parser: argparse.ArgumentParser) -> None:
    """The ``optimisation`` flags."""
    g = parser.add_argument_group("optimisation")
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


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The ``run`` flags."""
    g = parser.add_argument_group("run")
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


def build_parser() -> argparse.ArgumentParser:
    """The ``byol-train`` argument parser."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="BYOL self-supervised pretraining of a torchvision (or timm) backbone on a folder of images. "
        "Re-running the same command with the same --out resumes from OUT/last.pt.",
        formatter_class=_HelpFormatter,
    )
    _add_data_flags(p)
    _add_model_flags(p)
    _add_optimisation_flags(p)
    _add_run_flags(p)
    return p


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


def apply_demo(
    args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str], say: Callable[[str], None] | None = None
) -> argparse.Namespace:
    """Re-parses with the demo settings before the user's flags (which win), and points the data at the demo set."""
    try:
        from .. import demo
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
        if say is not None:  # the first output of a demo run: generation takes seconds, never start silently
            say(f"demo: preparing the synthetic data set in {Path(args.out).expanduser() / 'demo_data'} "
                "(reused if already complete)")
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


def check_augment_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuses an ``--augment-kwargs`` keyword that the views do not take, naming the close ones.

    Called before anything is written to ``--out``, so a typo leaves no folder behind.

    Raises:
        UsageError: An unknown keyword (with the closest valid ones and the full list).
    """
    import difflib
    import inspect

    from ..augmentations import BYOLView

    # image_size, mean and std come from the learner (--image-size, --channels), not from --augment-kwargs
    valid = [n for n in inspect.signature(BYOLView.__init__).parameters if n not in ("self", "image_size", "mean", "std")]
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.75)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise UsageError(f"--augment-kwargs: unknown keyword {key!r}; {hint}The view keywords are: {', '.join(valid)}")
