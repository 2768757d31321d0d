"""BYOL pretraining from the command line: ``byol-train`` or ``python -m byol_wrapper.train``.

The command line lives in :mod:`byol_wrapper.cli`; this module keeps the entry point ``byol_wrapper.train:main``
and the names it has always exported.
"""

from __future__ import annotations

import sys

from .backbones import apply_cifar_stem, build_backbone
from .cli import main
from .cli.args import UsageError, build_parser, default_threads
from .cli.metrics import plot_metrics
from .cli.runtime import EXIT_DIVERGED
from .cli.trainer import MODEL_KEYS

__all__ = ["MODEL_KEYS", "apply_cifar_stem", "build_backbone", "build_parser", "default_threads", "main", "plot_metrics"]

if __name__ == "__main__":
    sys.exit(main())
