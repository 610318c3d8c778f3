"""pick_device: the one rule for choosing where models run, shared by indexing, curation and distillation."""
from __future__ import annotations

import torch

from index.errors import UserError


class DeviceUnavailable(UserError, ValueError):
    pass


def pick_device(name: str | None = None) -> str:
    """None or "auto": "cuda" when CUDA is available, else "cpu"; any other name is used as given,
    except that a CUDA device is refused up front where CUDA is not available (rather than failing
    at the first tensor moved there)."""
    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {name!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return name
