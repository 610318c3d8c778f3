"""Students: a timm backbone (random init, or local pretrained weights) + a linear head for the target
classes, behind an InputAdapter with the student's own mean/std.

Any `timm.list_models()` name works (`fastvit_s12`, `mobilevitv2_100`, `mobilenetv3_large_100`,
`resnet18`, ...). Weights come only from a local file (`weights=PATH`, passed to timm as
`pretrained_cfg_overlay=dict(file=PATH)`); nothing is downloaded. STUDENTS holds extra named configs,
e.g. `test-tiny-student` (timm's `test_resnet`, 32 px) for fast CPU tests.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distill.adapter import InputAdapter
from index.core.errors import ConfigError, MissingInputError
from index.core.registry import Registry


@dataclass(frozen=True)
class StudentConfig:
    timm_name: str
    resolution: int | None = None     # None: the model's default input size
    kwargs: tuple[tuple[str, object], ...] = ()


STUDENTS: Registry[StudentConfig] = Registry("student")
STUDENTS.register("test-tiny-student", StudentConfig("test_resnet", resolution=32))


class Student(nn.Module):
    """forward(x in [0, 1]) -> logits; forward_features -> pooled penultimate features."""

    def __init__(self, backbone: nn.Module, num_classes: int, mean, std, resolution: int):
        super().__init__()
        self.adapter = InputAdapter(mean, std, resolution)
        self.backbone = backbone
        # the pooled pre-logits width (timm's head_hidden_size where a head conv follows the trunk)
        self.num_features = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        self.head = nn.Linear(self.num_features, num_classes)
        self.resolution = resolution

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.adapter(x))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.forward_features(x)
        return self.head(f), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def resolve_student(name: str) -> StudentConfig:
    if name in STUDENTS:
        return STUDENTS.get(name)
    import timm  # lazy: timm

    if name.split(".")[0] not in timm.list_models():
        close = difflib.get_close_matches(name, STUDENTS.names() + timm.list_models(), n=3, cutoff=0.5)
        raise ConfigError(f"unknown student {name!r}: not a timm model (timm.list_models()) nor one of "
                         f"{', '.join(STUDENTS.names())}. Closest: {close}")
    return StudentConfig(name)


def student_resolution(name: str, resolution: int | None = None) -> int:
    """The resolution the student trains at: explicit, else its registered or timm default."""
    if resolution is not None:
        return int(resolution)
    cfg = resolve_student(name)
    if cfg.resolution is not None:
        return cfg.resolution
    import timm  # lazy: timm

    return int(timm.get_pretrained_cfg(cfg.timm_name.split(".")[0]).input_size[-1])


def build_student(name: str, num_classes: int, *, weights: str | None = None, resolution: int | None = None,
                  seed: int = 0) -> Student:
    """Deterministic for a seed: the random init does not depend on (nor touch) the global RNG."""
    import timm  # lazy: timm

    cfg = resolve_student(name)
    kwargs = dict(cfg.kwargs)
    if weights is not None:
        if not Path(weights).is_file():
            raise MissingInputError(f"student weights not found: {weights}")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = timm.create_model(cfg.timm_name, num_classes=0, **kwargs)
        pcfg = backbone.pretrained_cfg
        res = student_resolution(name, resolution)
        return Student(backbone, num_classes, pcfg.get("mean", (0.485, 0.456, 0.406)),
                       pcfg.get("std", (0.229, 0.224, 0.225)), res)
