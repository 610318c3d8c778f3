"""train_student: the student-training worker, in-process or as the body of each data-parallel worker.

It reads only files (config, curated shards, OUT/caches.json and the caches, OUT/teachers.json), so
it runs the same in a Ray Train worker; rank 0 writes OUT/student.pt and OUT/train_result.json.
Several workers are started by a `Launcher` the caller passes to `run_distill` (the `distill`
command passes jobs.train_ray.train_with_ray), so this package never imports a cluster framework.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
import torch.distributed as dist

from distill.adaptation import read_teacher_mix
from distill.cache import CacheLookup
from distill.caching import open_caches, read_caches
from distill.config import DistillConfig
from distill.data import ShardSet, labelled_batches, load_labelled, steps_per_epoch, transfer_batches, transfer_shards
from distill.methods import MULTI_TEACHER, Task, build_task, phases
from distill.students import build_student, student_resolution
from distill.trainer import PhasePlan, train_phase
from index.core.atomic import atomic_path, fingerprint, write_json
from index.device import pick_device

TRAIN_RESULT = "train_result.json"


class Launcher(Protocol):
    def __call__(self, cfg: dict[str, Any], num_workers: int) -> dict[str, Any]:
        """Run train_student on `num_workers` workers (cfg as DistillConfig.to_dict()); rank 0's result."""
        ...


def worker_device() -> torch.device:
    """A data-parallel worker's device: its GPU under NCCL (the launcher gives each worker one), else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def per_source_weights(mu: torch.Tensor, names: tuple[str, ...] | list[str], dims: list[int]) -> list[dict[str, Any]]:
    """AFT's weights sigmoid(s) summarised per pretrained model (its block of the concatenated features)."""
    if len(names) != len(dims) or sum(dims) != mu.numel():
        raise ValueError(f"feature blocks {dict(zip(names, dims))} do not cover the {mu.numel()} weights")
    out, start = [], 0
    for name, d in zip(names, dims):
        block = mu[start:start + d]
        out.append({"name": name, "dim": d, "mean": float(block.mean()), "min": float(block.min()),
                    "max": float(block.max())})
        start += d
    return out


def _feature_weights_summary(task: Task, cfg: DistillConfig, lookups: list[CacheLookup]) -> dict[str, Any] | None:
    mu = task.feature_weights()
    if mu is None:
        return None
    features = next((lk.features for lk in lookups if lk.features), [])
    return {"mean": float(mu.mean()), "min": float(mu.min()), "max": float(mu.max()),
            "per_source": per_source_weights(mu, cfg.feature_sources, [int(c.features.shape[1]) for c in features])}


def train_student(cfg: DistillConfig, *, rank: int = 0, world: int = 1, distributed: bool = False) -> dict[str, Any]:
    """Train the student through the method's phases; rank 0 writes OUT/student.pt and OUT/train_result.json."""
    out = Path(cfg.out)
    device = torch.device(pick_device(cfg.device)) if not distributed else worker_device()
    ls = load_labelled(cfg.transfer)
    shards = transfer_shards(cfg.transfer)
    plan = phases(cfg.method, cfg, bool(shards))
    shardset = ShardSet.scan(shards) if "transfer" in plan else None
    caches = read_caches(out)
    transfer_lookup = CacheLookup(open_caches(caches, "transfer_logits"), open_caches(caches, "transfer_features"))
    labelled_lookup = CacheLookup(None, open_caches(caches, "labelled_features"))
    feature_dim = transfer_lookup.feature_dim or labelled_lookup.feature_dim
    resolution = student_resolution(cfg.student, cfg.resolution)
    student = build_student(cfg.student, len(ls.classes), weights=cfg.student_weights, resolution=resolution,
                            seed=cfg.seed)
    mix = read_teacher_mix(out) if cfg.method in MULTI_TEACHER else None
    task = build_task(cfg.method, student, cfg, feature_dim, seed=cfg.seed, mix=mix)
    run_fp = fingerprint({"config": cfg.training_fingerprint(), "caches": {k: v["fingerprint"] for k, v in caches.items()},
                          "world": world, **({"mix": dataclasses.asdict(mix)} if mix else {})})
    skipped: Counter = Counter()
    results, offset = [], 0
    for i, phase in enumerate(plan):
        if phase == "transfer":
            assert shardset is not None
            n, bs, lr = shardset.count, cfg.batch_size, cfg.lr
            spe = steps_per_epoch(n, bs, world)
            total = cfg.transfer_steps if cfg.transfer_steps is not None else spe * cfg.transfer_epochs
            lookup = transfer_lookup if (transfer_lookup.logits or transfer_lookup.features) else None

            def batches(epoch: int, skip: int, n=n, bs=bs, lookup=lookup) -> Iterator[dict[str, Any]]:
                return transfer_batches(list(shardset.shards), n, seed=cfg.seed, epoch=epoch, batch_size=bs,
                                        resolution=resolution, augment=cfg.augment, shuffle_buffer=cfg.shuffle_buffer,
                                        rank=rank, world=world, skip=skip, lookup=lookup,
                                        decode_threads=cfg.decode_threads, skipped=skipped)
        else:
            n, lr = len(ls), cfg.finetune_learning_rate
            bs = min(cfg.labels_batch_size, max(2, n // world))
            spe = steps_per_epoch(n, bs, world)
            total = spe * cfg.finetune_epochs
            lookup = labelled_lookup if labelled_lookup.features else None

            def batches(epoch: int, skip: int, bs=bs, lookup=lookup) -> Iterator[dict[str, Any]]:
                return labelled_batches(ls, seed=cfg.seed, epoch=epoch, batch_size=bs, resolution=resolution,
                                        augment=cfg.augment, rank=rank, world=world, skip=skip, lookup=lookup,
                                        decode_threads=cfg.decode_threads)
        phase_plan = PhasePlan(phase, total, spe, lr, cfg.weight_decay, int(cfg.warmup_frac * total))
        stop = None if cfg.stop_at_step is None else cfg.stop_at_step - offset
        res = train_phase(task, phase_plan, batches, ckpt_dir=out / "checkpoints" / phase, run_fingerprint=run_fp,
                          seed=cfg.seed + i, device=device, amp=cfg.amp, checkpoint_every=cfg.checkpoint_every,
                          stop_at=stop, is_main=rank == 0, distributed=distributed, progress=cfg.progress)
        results.append(res.to_dict())
        offset += total
        if not res.completed:
            return {"completed": False, "phases": results, "skipped": dict(skipped)}
    result: dict[str, Any] = {"completed": True, "phases": results, "skipped": dict(skipped),
                              "resolution": resolution, "world": world}
    weights = _feature_weights_summary(task, cfg, [transfer_lookup, labelled_lookup])
    if weights is not None:
        result["aft_mu"] = weights
    if rank == 0:
        with atomic_path(out / "student.pt") as tmp:
            torch.save(student.state_dict(), tmp)
        write_json(out / TRAIN_RESULT, result)
    return result
