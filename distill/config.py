"""DistillConfig: every option of a distillation run, with CPU-sized defaults.

Paper defaults where they exist: AdamW + cosine decay with warmup (Vemulapalli et al. 2024, A.4),
AFT beta = 10, s initialised at 0 with its own Adam group at lr 1e-2 and no weight decay (Qiu et al.
2024, A.1). The fully resolved config is written to OUT/config.json by `run_distill`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.methods import METHODS, MULTI_TEACHER
from distill.similarity import SIMILARITIES
from index.core.atomic import fingerprint
from index.core.config import check_integer
from index.core.errors import ConfigError
from index.core.registry import choice
from index.threads import HELP as THREADS_HELP

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
        check_integer(name, getattr(cfg, name), low, optional)
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
    method: str = field(metadata={"help": "distillation method: labels_only | kd | feature_kd | aft | kd_nearest | "
                                          "kd_weighted (distill.methods)"})
    transfer: str = field(metadata={"help": "curated directory (transfer-*.tar, queries-*.tar, queries.json)"})
    queries: str = field(metadata={"help": "named query set; its test split is the evaluation set"})
    out: str = field(metadata={"help": "run directory (config, checkpoints, caches, metrics.json)"})
    # teacher (a VFM from the encoder registry) and its adaptation on the labelled set
    teacher: str = field(default="efficientnet_lite0", metadata={
        "help": "VFM encoder name from the encoder registry (index.encoders)"})
    teacher_weights: str | None = field(default=None, metadata={
        "help": "local weights file for the teacher (nothing is downloaded)"})
    teacher_image_size: int | None = field(default=None, metadata={
        "help": "teacher input resolution (CNN teachers; default: the encoder's own)"})
    teacher_adapt: str = field(default="linear_probe", metadata={
        "help": "how the teacher learns the task: linear_probe | finetune"})
    probe_steps: int = field(default=100, metadata={
        "help": "LBFGS iterations of the teacher's logistic-regression head"})
    probe_weight_decay: float = field(default=1e-4, metadata={"help": "L2 penalty of the logistic-regression head"})
    teacher_epochs: int = field(default=10, metadata={"help": "teacher finetuning epochs (teacher_adapt finetune)"})
    teacher_lr: float = field(default=1e-5, metadata={
        "help": "teacher finetuning learning rate (teacher_adapt finetune)"})
    teacher_batch_size: int = field(default=32, metadata={
        "help": "teacher finetuning batch size (teacher_adapt finetune)"})
    # several teachers (kd_nearest, kd_weighted): ranked by task similarity on the labelled probe set
    teachers: tuple[str, ...] = field(default=(), metadata={
        "help": "comma-separated candidate teachers for kd_nearest / kd_weighted "
                "(default: the teacher alone)"})
    similarity: str = field(default="parc", metadata={
        "help": "task similarity that ranks the teachers: parc | cka | rsa"})
    weight_temperature: float = field(default=10.0, metadata={
        "help": "p of the teacher weights softmax(p * similarity): 0 equal weights, "
                "inf the nearest"})
    teacher_head: str = field(default="probe", metadata={
        "help": "multi-teacher pseudo-labels: probe (linear probe on the labels) | "
                "source (the model's own head)"})
    feature_encoders: tuple[str, ...] = field(default=(), metadata={
        "help": "comma-separated encoders whose features AFT / feature_kd use, "
                "concatenated (default: the teachers, else the teacher)"})
    # student
    student: str = field(default="mobilenetv3_large_100", metadata={
        "help": "timm model name or a registered student (test-tiny-student)"})
    student_weights: str | None = field(default=None, metadata={
        "help": "local pretrained weights file for the student (nothing is downloaded)"})
    resolution: int | None = field(default=None, metadata={
        "help": "student input resolution (default: the student's own)"})
    # data
    data_root: str | None = field(default=None, metadata={"help": "where the query set's dataset lives"})
    query_seed: int = field(default=0, metadata={"help": "seed of the query set's draw"})
    batch_size: int = field(default=32, metadata={"help": "transfer-set batch size"})
    label_batch_size: int | None = field(default=None, metadata={
        "help": "labelled-set batch size (default: batch_size)"})
    augment: bool = field(default=True, metadata={"help": "RandomResizedCrop + horizontal flip on training images"})
    shuffle_buffer: int = field(default=1000, metadata={"help": "samples in the transfer set's shuffle buffer"})
    decode_threads: int = field(default=0, metadata={"help": "threads decoding and augmenting a batch; 0: inline"})
    # schedule
    transfer_epochs: int = field(default=1, metadata={"help": "epochs over the transfer set"})
    transfer_steps: int | None = field(default=None, metadata={
        "help": "steps on the transfer set; overrides transfer_epochs"})
    finetune_epochs: int = field(default=10, metadata={"help": "epochs of finetuning on the labels"})
    lr: float = field(default=7e-4, metadata={
        "help": "transfer-phase learning rate (the paper: 7e-4 for distillation)"})
    finetune_lr: float | None = field(default=None, metadata={"help": "finetuning learning rate (default: lr)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    warmup_frac: float = field(default=0.05, metadata={"help": "warmup steps as a fraction of each phase's steps"})
    # method options
    temperature: float = field(default=1.0, metadata={"help": "KD softmax temperature"})
    beta: float = field(default=10.0, metadata={"help": "AFT regularisation weight"})
    aft_lr: float = field(default=1e-2, metadata={
        "help": "learning rate of AFT's feature weights s (own Adam group, no weight decay)"})
    aft_on_transfer: bool = field(default=True, metadata={"help": "AFT on the transfer set too (kernel loss only)"})
    feature_loss: str = field(default="cosine", metadata={
        "help": "feature_kd loss: cosine | contrastive | cosine+contrastive"})
    contrastive_temperature: float = field(default=0.07, metadata={
        "help": "temperature of the contrastive feature loss"})
    # run
    seed: int = field(default=0, metadata={"help": "training seed"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    amp: bool = field(default=True, metadata={"help": "bfloat16 autocast on CUDA (ignored on CPU)"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    workers: int = field(default=1, metadata={"help": "data-parallel workers; > 1 trains with Ray Train (gloo, CPU)"})
    baseline: bool = field(default=False, metadata={
        "help": "also train labels_only with the same student and report its accuracy"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "teacher output cache directory (default: OUT/cache); reused across runs"})
    eval_batch_size: int = field(default=64, metadata={"help": "evaluation and caching batch size"})
    progress: bool = field(default=True, metadata={"help": "progress bars on stderr"})
    stop_at_step: int | None = field(default=None, metadata={
        "help": "end training after this many steps without saving, as a kill would "
                "(testing resume)"})
    threads: int | None = field(default=None, metadata={"help": THREADS_HELP})

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


