"""The ``byol-train`` command line (``python -m byol_wrapper.train`` or ``python -m byol_wrapper.cli``)."""

from .trainer import main

__all__ = ["main"]
