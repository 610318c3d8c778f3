"""Per-model input adaptation: the data pipeline yields un-normalised [0, 1] images at the student's
resolution; every model resizes (if its own image size differs) and normalises with its own mean/std.

CLIP teachers and timm students normalise differently, so the normalisation lives with the model
(timm's distillation task re-normalises the teacher's input the same way).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class InputAdapter(nn.Module):
    """x in [0, 1], [B, 3, H, W] -> resized to image_size (if given and different) -> (x - mean) / std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], image_size: int | None = None):
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {mean} and {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(x.shape)}")
        s = self.image_size
        if s is not None and tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
