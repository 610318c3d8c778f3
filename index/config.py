"""Indexing job config: YAML/JSON mapped onto frozen dataclasses by plain field names (index.core.config).

No import paths or code in configs. Unknown keys raise with the valid field names. The fully
resolved config is written into the index manifest.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from index.core.config import check_fraction, check_integer, from_mapping, read_mapping
from index.core.errors import ConfigError
from index.crops import CropConfig
from index.threads import HELP as THREADS_HELP

@dataclass(frozen=True)
class FaissConfig:
    factory: str = field(default="auto", metadata={
        "help": "'auto' (the rule in index.knn.choose_factory) or a faiss factory string"})
    memory_budget_gb: float = field(default=8.0, metadata={"help": "budget for one group's index in RAM"})
    flat_threshold: int = field(default=200_000, metadata={
        "help": "below this many vectors per group: exact (Flat)"})
    shards_per_group: int = field(default=16, metadata={"help": "gallery shards per FAISS index"})
    nprobe: int | None = field(default=None, metadata={
        "help": "IVF lists probed at search time (default: chosen for recall_target from the measured "
                "operating points; 32 where recall is not measured)"})
    rerank: int | None = field(default=None, metadata={
        "help": "candidates re-scored exactly per result, from the stored vectors (0: none; default: "
                "chosen with nprobe)"})
    recall_target: float | None = field(default=0.95, metadata={
        "help": "recall@recall_k the chosen operating point must reach (null: recall not measured)"})
    recall_k: int = field(default=100, metadata={"help": "the depth recall_target applies to at build time "
                                                             "(curate chooses again at its own depth)"})
    recall_queries: int = field(default=100, metadata={
        "help": "gallery vectors held out as queries to measure recall"})
    recall_sample_vectors: int = field(default=1_000_000, metadata={
        "help": "vectors in the sample of index groups searched exactly to measure recall"})
    shared_quantizer: bool = field(default=True, metadata={
        "help": "train IVF/PQ once on a gallery-wide sample, fill every group from it"})
    train_size: int | None = field(default=None, metadata={
        "help": "training sample size (default: index.knn.training_size of the factory)"})

    def __post_init__(self):
        if not isinstance(self.factory, str) or not self.factory:
            raise ConfigError(f"faiss.factory must be 'auto' or a faiss factory string; got {self.factory!r}")
        if isinstance(self.memory_budget_gb, bool) or not isinstance(self.memory_budget_gb, (int, float)) \
                or not self.memory_budget_gb > 0:
            raise ConfigError(f"faiss.memory_budget_gb must be > 0; got {self.memory_budget_gb!r}")
        for name in ("shards_per_group", "recall_k", "recall_queries", "recall_sample_vectors"):
            check_integer(f"faiss.{name}", getattr(self, name), 1)
        check_integer("faiss.nprobe", self.nprobe, 1, optional=True)
        check_integer("faiss.rerank", self.rerank, 0, optional=True)
        check_fraction("faiss.recall_target", self.recall_target, optional=True)
        check_integer("faiss.flat_threshold", self.flat_threshold, 0)
        check_integer("faiss.train_size", self.train_size, 1, optional=True)
        if not isinstance(self.shared_quantizer, bool):
            raise ConfigError(f"faiss.shared_quantizer must be true or false; got {self.shared_quantizer!r}")


@dataclass(frozen=True)
class IndexConfig:
    gallery: str | tuple[str, ...] = field(default="", metadata={
        "help": "the gallery: a tar glob, a list of tars (config file) or an image folder"})
    encoders: tuple[str, ...] = field(default=("efficientnet_lite0",), metadata={
        "help": "encoder names from the encoder registry (index.encoders), indexed together"})
    weights: dict[str, str] = field(default_factory=dict, metadata={
        "help": "encoder name -> local weights path"})
    image_size: int | None = field(default=None, metadata={
        "help": "override the encoders' input resolution (CNN encoders)"})
    crops: CropConfig = field(default_factory=CropConfig, metadata={
        "help": "the crop recipe of every gallery image (index.crops.CropConfig)"})
    faiss: FaissConfig = field(default_factory=FaissConfig, metadata={
        "help": "the FAISS indexes (index.config.FaissConfig)"})
    seed: int = field(default=0, metadata={"help": "crop recipe and training sample seed"})
    batch_size: int | None = field(default=None, metadata={
        "help": "crops per forward (default: index.encode.default_batch_size)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:N (default: CUDA when present)"})
    executor: str = field(default="local", metadata={
        "help": "where the shards are embedded and indexed: local | ray (ray under `ray job submit`)"})
    num_workers: int | None = field(default=None, metadata={"help": "Ray actors (default: one per CPU)"})
    gpus_per_worker: float = field(default=0, metadata={"help": "GPUs per Ray actor"})
    threads: int | None = field(default=None, metadata={"help": THREADS_HELP})

    def __post_init__(self):
        if isinstance(self.encoders, (list, str)):
            enc = self.encoders.split(",") if isinstance(self.encoders, str) else self.encoders
            object.__setattr__(self, "encoders", tuple(enc))
        if not self.encoders or not all(isinstance(e, str) and e for e in self.encoders):
            raise ConfigError(f"encoders must be a non-empty list of encoder names; got {list(self.encoders)!r}")
        check_integer("image_size", self.image_size, 1, optional=True)
        check_integer("seed", self.seed, 0)
        check_integer("batch_size", self.batch_size, 1, optional=True)   # None: chosen by device
        check_integer("num_workers", self.num_workers, 1, optional=True)
        check_integer("threads", self.threads, 1, optional=True)
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ConfigError(f"unknown device {self.device!r}; valid choices: cpu, cuda, cuda:N, "
                                  "or null (CUDA when present)") from None
        if self.executor not in ("local", "ray"):
            raise ConfigError(f"executor must be one of local, ray; got {self.executor!r}")
        if isinstance(self.gpus_per_worker, bool) or not isinstance(self.gpus_per_worker, (int, float)) \
                or self.gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker must be a number >= 0; got {self.gpus_per_worker!r}")
        if not isinstance(self.weights, dict):
            raise ConfigError(f"weights must map encoder names to weight files; got {self.weights!r}")
        if isinstance(self.crops, dict):
            object.__setattr__(self, "crops", from_mapping(CropConfig, self.crops, "crops"))
        if isinstance(self.faiss, dict):
            object.__setattr__(self, "faiss", from_mapping(FaissConfig, self.faiss, "faiss"))

    def check_gallery(self) -> None:
        """Refuse a missing or empty gallery (a config without one serves as defaults elsewhere)."""
        gallery = [self.gallery] if isinstance(self.gallery, str) else self.gallery
        if not isinstance(gallery, (list, tuple)) or not gallery or not all(isinstance(g, str) and g for g in gallery):
            raise ConfigError(f"gallery must be a tar glob, a list of tars or an image folder; got {self.gallery!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["crops"] = self.crops.to_dict()
        d["encoders"] = list(self.encoders)
        return d


def load_index_config(path: str | Path, **overrides: Any) -> IndexConfig:
    """The job config a YAML file holds, with the given non-None overrides applied."""
    data = read_mapping(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(IndexConfig, data, str(path))
