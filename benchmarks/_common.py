"""Environment helpers shared by the benchmark scripts (device choice, device name, package versions)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["device_name", "package_version", "pick_device", "setup_torch"]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical CPUs)"


def package_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "not installed"


def setup_torch(device: str, threads: int | None) -> torch.device:
    """Picks the device, sets the intra-op thread count and enables cuDNN autotuning on CUDA."""
    picked = pick_device(device)
    if threads:
        torch.set_num_threads(threads)
    if picked.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return picked
