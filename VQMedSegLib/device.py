"""Choosing where tensors live: ``auto`` uses CUDA when present, else the CPU."""

from __future__ import annotations

import torch

from .errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise InputError(f"--device {name!r}: expected one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "without CUDA support" if torch.version.cuda is None else f"with CUDA {torch.version.cuda}, but no GPU is visible"
            raise InputError(f"--device {name}: CUDA is not available (torch {torch.__version__} is built {build}); use --device auto or cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: found {torch.cuda.device_count()} GPU(s), expected index < that")
    return torch.device(name)
