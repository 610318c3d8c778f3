"""DistillConfig: every option of a distillation run, with CPU-sized defaults.

Paper defaults where they exist: AdamW + cosine decay with warmup (Vemulapalli et al. 2024, A.4),
AFT beta = 10, s initialised at 0 with its own Adam group at lr 1e-2 and no weight decay (Qiu et al.
2024, A.1). The fully resolved config is written to OUT/config.json by `run_distill`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.methods import METHODS, MULTI_TEACHER
from distill.similarity import SIMILARITIES
from index.core.atomic import fingerprint
from index.core.errors import ConfigError
from index.core.registry import choice

TEACHER_ADAPTATIONS = ("linear_probe", "finetune")
TEACHER_HEADS = ("probe", "source")
FEATURE_LOSSES = ("cosine", "contrastive", "cosine+contrastive")
DEVICES = ("auto", "cpu", "cuda")


# (field, lowest value, whether None is allowed): integers, then positive numbers
_INTEGERS = (("resolution", 8, True), ("teacher_image_size", 8, True), ("probe_steps", 1, False),
             ("teacher_epochs", 0, False), ("transfer_epochs", 0, False), ("transfer_steps", 1, True),
             ("finetune_epochs", 0, False), ("label_batch_size", 1, True), ("shuffle_buffer", 1, False),
             ("decode_threads", 0, False), ("checkpoint_every", 1, False), ("seed", 0, False),
             ("query_seed", 0, False), ("stop_at_step", 0, True), ("threads", 1, True))
_POSITIVE = (("lr", False), ("finetune_lr", True), ("teacher_lr", False), ("aft_lr", False),
             ("contrastive_temperature", False))
_NON_NEGATIVE = ("weight_decay", "probe_weight_decay", "beta")


def _check_numbers(cfg: "DistillConfig") -> None:
    for name, low, optional in _INTEGERS:
        v = getattr(cfg, name)
        if optional and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"{name} must be an integer >= {low}{' (or unset)' if optional else ''}; got {v!r}")
    for name, optional in _POSITIVE:
        v = getattr(cfg, name)
        if optional and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"{name} must be a finite number > 0; got {v!r}")
    for name in _NON_NEGATIVE:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
            raise ConfigError(f"{name} must be a finite number >= 0; got {v!r}")


@dataclass(frozen=True)
class DistillConfig:
    method: str                                  # a name in distill.methods.METHODS
    transfer: str                                # curated directory (transfer-*.tar, queries-*.tar, queries.json)
    queries: str                                 # named query set: its test split is the evaluation set
    out: str                                     # run directory
    # teacher (a VFM from the encoder registry) and its adaptation on the labelled set
    teacher: str = "efficientnet_lite0"
    teacher_weights: str | None = None
    teacher_image_size: int | None = None        # override the teacher's input resolution (CNN teachers)
    teacher_adapt: str = "linear_probe"          # linear_probe | finetune
    probe_steps: int = 100                       # LBFGS iterations of the logistic regression head
    probe_weight_decay: float = 1e-4             # L2 penalty of the logistic regression head
    teacher_epochs: int = 10                     # finetune only
    teacher_lr: float = 1e-5                     # finetune only
    teacher_batch_size: int = 32
    # several teachers (kd_nearest, kd_weighted): ranked by task similarity on the labelled probe set
    teachers: tuple[str, ...] = ()               # candidate teachers (default: the teacher alone)
    similarity: str = "parc"                     # parc | cka | rsa (distill.similarity.SIMILARITIES)
    weight_temperature: float = 10.0             # p of w = softmax(p * similarity): 0 equal weights, inf the nearest
    teacher_head: str = "probe"                  # pseudo-labels: probe (target classes) | source (the model's own head)
    # pretrained feature sources for AFT / feature KD (default: the teachers, else the teacher's encoder), concatenated
    feature_encoders: tuple[str, ...] = ()
    # student
    student: str = "mobilenetv3_large_100"
    student_weights: str | None = None
    resolution: int | None = None                # None: the student's default input size
    # data
    data_root: str | None = None
    query_seed: int = 0
    batch_size: int = 32
    label_batch_size: int | None = None          # None: batch_size
    augment: bool = True                         # RandomResizedCrop + horizontal flip
    shuffle_buffer: int = 1000
    decode_threads: int = 0                      # threads decoding/augmenting a batch; 0 = inline
    # schedule
    transfer_epochs: int = 1
    transfer_steps: int | None = None            # overrides transfer_epochs
    finetune_epochs: int = 10
    lr: float = 7e-4                             # transfer phase (paper: 7e-4 for distillation)
    finetune_lr: float | None = None             # None: lr
    weight_decay: float = 0.05
    warmup_frac: float = 0.05                    # warmup steps as a fraction of each phase's steps
    # method options
    temperature: float = 1.0                     # KD
    beta: float = 10.0                           # AFT regularisation weight
    aft_lr: float = 1e-2                         # AFT's s (its own Adam group, no weight decay)
    aft_on_transfer: bool = True                 # AFT on the transfer set too (kernel loss only)
    feature_loss: str = "cosine"                 # feature_kd: cosine | contrastive | cosine+contrastive
    contrastive_temperature: float = 0.07
    # run
    seed: int = 0
    device: str = "auto"                         # auto | cpu | cuda
    amp: bool = True                             # bfloat16 autocast on CUDA (ignored on CPU)
    checkpoint_every: int = 100                  # steps
    workers: int = 1                             # >1: data-parallel training with Ray Train (gloo, CPU)
    baseline: bool = False                       # also train labels_only and report its accuracy
    cache_dir: str | None = None                 # teacher output cache (default OUT/cache)
    eval_batch_size: int = 64
    progress: bool = True
    stop_at_step: int | None = None              # end training after this many steps without saving (a kill)
    threads: int | None = None                   # CPU threads (None: the CPUs other processes leave free)

    def __post_init__(self) -> None:
        METHODS.get(self.method)  # raises with the valid names

        SIMILARITIES.get(self.similarity)
        choice("teacher adaptation", self.teacher_adapt, TEACHER_ADAPTATIONS)
        choice("teacher head", self.teacher_head, TEACHER_HEADS)
        if not self.weight_temperature >= 0:
            raise ConfigError(f"weight_temperature must be >= 0 (0: equal weights, inf: the nearest teacher), "
                             f"got {self.weight_temperature}")
        choice("feature loss", self.feature_loss, FEATURE_LOSSES)
        choice("device", self.device, DEVICES)
        positive = {"batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size,
                    "workers": self.workers, "temperature": self.temperature,
                    "teacher_batch_size": self.teacher_batch_size}
        for k, v in positive.items():
            if v <= 0:
                raise ConfigError(f"{k} must be > 0, got {v}")
        _check_numbers(self)
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ConfigError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        for k in ("feature_encoders", "teachers"):
            if isinstance(getattr(self, k), list):
                object.__setattr__(self, k, tuple(getattr(self, k)))
        if len(set(self.teacher_sources)) != len(self.teacher_sources):
            raise ConfigError(f"teachers must be distinct, got {list(self.teacher_sources)}")

        if self.method not in MULTI_TEACHER:
            if self.teacher_head != "probe":
                raise ConfigError(f"teacher_head={self.teacher_head!r} applies to {', '.join(MULTI_TEACHER)}; "
                                 f"method {self.method!r} uses the teacher adapted on the labels")
            if self.method == "kd" and len(self.teachers) > 1:
                raise ConfigError(f"kd distils one teacher (--teacher); for several use {' or '.join(MULTI_TEACHER)}")

    # ------------------------------------------------------------------ derived values

    @property
    def feature_sources(self) -> tuple[str, ...]:
        return self.feature_encoders or self.teachers or (self.teacher,)

    @property
    def teacher_sources(self) -> tuple[str, ...]:
        return self.teachers or (self.teacher,)

    @property
    def cache_root(self) -> Path:
        """Where teacher outputs are cached: cache_dir, or OUT/cache."""
        return Path(self.cache_dir) if self.cache_dir else Path(self.out) / "cache"

    @property
    def labels_batch_size(self) -> int:
        return self.label_batch_size or self.batch_size

    @property
    def finetune_learning_rate(self) -> float:
        return self.finetune_lr if self.finetune_lr is not None else self.lr

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["feature_encoders"] = list(self.feature_encoders)
        d["teachers"] = list(self.teachers)
        return d

    def replace(self, **changes: Any) -> "DistillConfig":
        return dataclasses.replace(self, **changes)

    def training_fingerprint(self) -> str:
        """What determines the trained weights; options that only affect speed, logging or where
        outputs go are left out, so a resumed run with those changed still matches."""
        d = self.to_dict()
        for k in ("out", "cache_dir", "progress", "stop_at_step", "baseline", "decode_threads",
                  "checkpoint_every", "eval_batch_size", "data_root", "threads"):
            d.pop(k)
        return fingerprint(d)


