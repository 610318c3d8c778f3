"""pick_device: the one rule for choosing where models run, shared by indexing, curation and distillation."""
from __future__ import annotations

import torch

from index.core.errors import ConfigError


class DeviceUnavailable(ConfigError):
    pass


def pick_device(name: str | None = None) -> str:
    """None, "" or "auto": "cuda" when CUDA is available, else "cpu". Any other name must be a device
    this machine has: an unknown name, or a CUDA device where there is none (or not that many), is
    refused up front with the choices, rather than failing at the first tensor moved there."""
    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}; valid choices: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {name!r} requested but CUDA is not available here; use 'cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name
