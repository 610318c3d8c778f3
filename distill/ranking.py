"""`distill rank` as a function: RankConfig, the probe set it names, the ranking (distill.rank).

    result = rank(RankConfig(queries="eurosat_10shot", teachers=("efficientnet_lite0", "efficientnet_lite1")))

The probe set is the curated directory's labelled query images (``transfer``: its caches are then
shared with `distill` runs on that directory), or else the named query set's shots.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from curation import querysets
from distill.adaptation import labelled_manifest
from distill.config import DEVICES
from distill.data import LabelledSet, load_labelled
from distill.rank import rank_teachers
from distill.similarity import SIMILARITIES
from index.core.atomic import fingerprint
from index.core.config import check_integer
from index.core.errors import ConfigError
from index.core.registry import choice
from index.device import pick_device
from index.threads import HELP as THREADS_HELP


@dataclass(frozen=True)
class RankConfig:
    queries: str = field(metadata={"help": "named query set: its labelled shots are the probe set"})
    teachers: tuple[str, ...] = field(metadata={"help": "comma-separated encoder names from the encoder registry"})
    transfer: str | None = field(default=None, metadata={
        "help": "curated directory: its labelled query images are the probe set (and its caches are shared with "
                "`distill` runs); without it they are drawn from the named query set"})
    out: str | None = field(default=None, metadata={
        "help": "directory for ranking.json and ranking.svg; without it the ranking is only printed"})
    probe_accuracy: bool = field(default=False, metadata={
        "help": "also rank by a linear probe's cross-validated accuracy on the probe set"})
    similarity: str = field(default="parc", metadata={"help": "metric the ranking is sorted by: parc | cka | rsa"})
    weight_temperature: float | None = field(default=None, metadata={
        "help": "also report kd_weighted's teacher weights softmax(p * similarity) for this p"})
    teacher_image_size: int | None = field(default=None, metadata={
        "help": "teacher input resolution (CNN teachers; default: the encoder's own)"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "feature cache directory (default: OUT/cache, or a temporary one without --out)"})
    data_root: str | None = field(default=None, metadata={"help": "where the query set's dataset lives"})
    query_seed: int = field(default=0, metadata={"help": "seed of the query set's draw"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    probe_steps: int = field(default=100, metadata={"help": "LBFGS iterations of each logistic-regression probe"})
    eval_batch_size: int = field(default=64, metadata={"help": "feature extraction batch size"})
    threads: int | None = field(default=None, metadata={"help": THREADS_HELP})

    def __post_init__(self) -> None:
        if isinstance(self.teachers, (list, str)):
            names = self.teachers.split(",") if isinstance(self.teachers, str) else self.teachers
            object.__setattr__(self, "teachers", tuple(names))
        if not self.teachers:
            raise ConfigError("rank needs at least one teacher (--teachers A,B,...)")
        SIMILARITIES.get(self.similarity)      # raises with the valid names
        choice("device", self.device, DEVICES)
        if self.weight_temperature is not None and not self.weight_temperature >= 0:
            raise ConfigError(f"weight_temperature must be >= 0 (0: equal weights, inf: the nearest teacher); "
                              f"got {self.weight_temperature}")
        for name, low, optional in (("query_seed", 0, False), ("probe_steps", 1, False), ("eval_batch_size", 1, False),
                                    ("teacher_image_size", 8, True), ("threads", 1, True)):
            check_integer(name, getattr(self, name), low, optional)



def probe_set(cfg: RankConfig) -> tuple[LabelledSet, dict[str, Any]]:
    """(the labelled probe set, its identity in fingerprints, as the feature caches key it)."""
    if cfg.transfer:
        ls = load_labelled(cfg.transfer)
        return ls, labelled_manifest(cfg, ls)   # keyed as `distill` runs on that directory key it
    qs = querysets.get_query_set(cfg.queries, data_root=cfg.data_root, seed=cfg.query_seed)
    ls = LabelledSet(keys=[q.id for q in qs.queries], images=[q.load() for q in qs.queries],
                     labels=[q.label for q in qs.queries], classes=list(qs.classes), name=qs.name)
    return ls, {"queries": fingerprint(qs.to_draw_dict()), "keys": fingerprint(ls.keys), "count": len(ls)}


def rank(cfg: RankConfig) -> dict[str, Any]:
    """The teachers of `cfg` ranked on its probe set (`distill.rank.rank_teachers`'s result, with the query set)."""
    ls, data = probe_set(cfg)
    cache = cfg.cache_dir or (str(Path(cfg.out) / "cache") if cfg.out else tempfile.mkdtemp(prefix="distill-rank-"))
    result = rank_teachers(list(cfg.teachers), ls, data, cache, metric=cfg.similarity,
                           image_size=cfg.teacher_image_size, device=torch.device(pick_device(cfg.device)),
                           probe_accuracy=cfg.probe_accuracy, probe_steps=cfg.probe_steps,
                           weight_temperature=cfg.weight_temperature, batch_size=cfg.eval_batch_size)
    result["queries"] = cfg.queries
    return result
