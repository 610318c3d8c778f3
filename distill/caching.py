"""The cache pass: every teacher output a method reads, computed once and fingerprinted (cache.py).

    OUT/cache/ (--cache-dir)   <model>-<adaptation>/<split>-<data>/ per model and split
    OUT/caches.json            {role: {dir, fingerprint, reused, count}}: what training opens

Roles: `transfer_logits:<i>` (the i-th teacher's outputs on the transfer set, KD methods),
`transfer_features:<i>` and `labelled_features:<i>` (the i-th pretrained model's features, AFT and
feature KD). A rerun, or another run over the same data with the same models, reuses them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from distill.adaptation import labelled_manifest, teacher_adaptation
from distill.cache import (OutputCache, build_or_load_cache, cache_fingerprint_inputs, cache_pass, data_dir_name,
                           load_cache, pretrained_features_inputs)
from distill.config import DistillConfig
from distill.data import EVAL_TRANSFORM_ID, LabelledSet, ShardSet, labelled_batches, transfer_batches
from distill.methods import METHODS, phases
from distill.teachers import Teacher, build_feature_model, weights_hash
from index.core.atomic import fingerprint, read_json
from index.core.contract import encoder_slug

CACHES_FILE = "caches.json"
Caches = dict[str, dict[str, Any]]


def prepare_caches(cfg: DistillConfig, ls: LabelledSet, shardset: ShardSet | None,
                   teachers: Teacher | list[Teacher] | None, device: torch.device) -> Caches:
    """Build (or reuse) the caches the method reads; returns {role: {dir, fingerprint, reused, count}}.

    `teachers`: the adapted teacher, or the selected teachers of a multi-teacher method in order
    (one transfer-logits cache each: `transfer_logits:<i>`)."""
    teachers = [teachers] if isinstance(teachers, Teacher) else list(teachers or [])
    teacher = teachers[0] if teachers else None
    method = METHODS.get(cfg.method)
    plan = phases(cfg.method, cfg, shardset is not None)
    root = cfg.cache_root
    caches: Caches = {}
    transfer_data = shardset.manifest() if shardset is not None else None

    def transfer_iter(resolution: int) -> Iterator[dict[str, Any]]:
        assert shardset is not None
        return transfer_batches(list(shardset.shards), shardset.count, seed=0, epoch=0,
                                batch_size=cfg.eval_batch_size, resolution=resolution, augment=False,
                                shuffle=False, decode_threads=cfg.decode_threads)

    def labelled_iter(resolution: int) -> Iterator[dict[str, Any]]:
        return labelled_batches(ls, seed=0, epoch=0, batch_size=cfg.eval_batch_size, resolution=resolution,
                                augment=False, shuffle=False)

    def record(role: str, cache: OutputCache, inputs: dict[str, Any]) -> None:
        caches[role] = {"dir": str(cache.directory), "fingerprint": fingerprint(inputs), "reused": cache.reused,
                        "count": len(cache.keys)}

    adapt = teacher_adaptation(cfg)
    for i, t in enumerate(teachers if method.transfer_needs == "logits" and "transfer" in plan else ()):
        spec = t.spec
        hashed = t.head if adapt in ("linear_probe", "source") else t
        inputs = cache_fingerprint_inputs(
            model={"spec": spec.identity(), "adapt": adapt}, weights=weights_hash(hashed),
            data=transfer_data, transform={"id": EVAL_TRANSFORM_ID, "resolution": spec.image_size},
            outputs=["logits", "features"])
        d = root / f"{encoder_slug(spec.name)}-{adapt}" / data_dir_name("transfer", transfer_data)
        t.eval()
        record(f"transfer_logits:{i}", build_or_load_cache(
            d, inputs, cache_pass(t.forward_both, transfer_iter(spec.image_size), device, True)), inputs)

    splits = []
    if method.transfer_needs == "features" and "transfer" in plan:
        splits.append("transfer")
    if method.labelled_needs == "features":
        splits.append("labelled")
    for i, name in enumerate(cfg.feature_sources if splits else ()):
        if teacher is not None and name == cfg.teacher and cfg.teacher_adapt == "linear_probe":
            model, spec = teacher.features, teacher.spec   # the frozen encoder is the pretrained one
        else:
            fm = build_feature_model(name, image_size=cfg.teacher_image_size, device=device)
            model, spec = fm, fm.spec
        for split in splits:
            data = transfer_data if split == "transfer" else labelled_manifest(cfg, ls)
            inputs = pretrained_features_inputs(spec, data, EVAL_TRANSFORM_ID)
            d = root / f"{encoder_slug(spec.name)}-pretrained" / data_dir_name(split, data)
            batches = transfer_iter(spec.image_size) if split == "transfer" else labelled_iter(spec.image_size)
            record(f"{split}_features:{i}", build_or_load_cache(d, inputs, cache_pass(model, batches, device, False)),
                   inputs)
    return caches


def read_caches(out: Path) -> Caches:
    """OUT/caches.json as the cache pass wrote it ({} for a method that reads no cache)."""
    return read_json(out / CACHES_FILE) if (out / CACHES_FILE).exists() else {}


def open_caches(caches: Caches, prefix: str) -> list[OutputCache]:
    """The caches of one kind (`transfer_logits`, `transfer_features`, `labelled_features`) in role order."""
    out = []
    for role in sorted((r for r in caches if r.startswith(prefix)), key=lambda r: int(r.rsplit(":", 1)[-1])):
        c = load_cache(caches[role]["dir"], caches[role]["fingerprint"])
        if c is None:
            raise FileNotFoundError(f"teacher cache {caches[role]['dir']} is missing")
        out.append(c)
    return out
