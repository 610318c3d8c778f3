"""The indexing stage: gallery shards -> embedding shards -> FAISS index per shard group -> manifest.

`build_gallery_index(cfg, out_dir, executor)` fans `embed_shard` out over gallery shards and
`build_group` over shard groups through any executor (jobs.executors), then writes
``manifest.json`` last. Every unit of work is skipped on rerun when its done record matches and
refused when it differs, so a killed job reruns to the same result.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index import contract, knn, store
from index.atomic import CODE_VERSION, check_done, fingerprint, write_json
from index.config import IndexConfig
from index.embed import EmbedTask, Embedder, ShardResult
from index.encoders import EncoderSpec, resolve_encoders
from index.gallery import SkipCounts, list_shards


@dataclass(frozen=True)
class GroupTask:
    out_dir: str
    group: int
    shards: tuple[dict[str, Any], ...]   # manifest shard entries: name, offset, num_vectors, fingerprint
    encoders: tuple[str, ...]
    dim: int
    factory: str
    nprobe: int
    seed: int = 0

    @property
    def file(self) -> str:
        return f"{contract.FAISS_DIR}/group-{self.group:03d}.index"

    def fingerprint(self) -> str:
        return fingerprint({"shards": [(s["name"], s["offset"], s["fingerprint"]) for s in self.shards],
                            "factory": self.factory, "dim": self.dim, "seed": self.seed})


def build_group(task: GroupTask) -> dict[str, Any]:
    """Train (on a sample) and fill one FAISS index from the group's embedding shards."""
    out = Path(task.out_dir)
    done_path = out / (task.file + ".done.json")
    fp = task.fingerprint()
    record = check_done(done_path, fp)
    if record is not None:
        return record
    t0 = time.perf_counter()
    shards = list(task.shards)
    num_vectors = sum(s["num_vectors"] for s in shards)
    train = None
    if knn.needs_training(task.factory):
        train = knn.training_sample(store.iter_blocks(out, shards, list(task.encoders)), num_vectors,
                                    knn.training_size(task.factory), task.seed)
    index = knn.build_index(
        ((np.arange(off, off + len(v), dtype=np.int64), v)
         for off, v in store.iter_blocks(out, shards, list(task.encoders))),
        factory=task.factory, dim=task.dim, train_sample=train, nprobe=task.nprobe, seed=task.seed)
    knn.save_index(index, out / task.file)
    record = {"fingerprint": fp, "file": task.file, "shards": [s["name"] for s in shards],
              "factory": task.factory, "num_vectors": int(index.ntotal),
              "seconds": round(time.perf_counter() - t0, 3)}
    write_json(done_path, record)
    return record


def _groups(entries: list[dict[str, Any]], per_group: int) -> list[list[dict[str, Any]]]:
    return [entries[i:i + per_group] for i in range(0, len(entries), per_group)]


def summary_line(stage: str, manifest: dict[str, Any], seconds: float) -> str:
    skipped = manifest["skipped"]
    skip = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"
    rate = manifest["num_vectors"] / seconds if seconds > 0 else float("nan")
    return (f"{stage}: {manifest['num_images']} images read, skipped {sum(skipped.values())} ({skip}), "
            f"{manifest['num_vectors']} vectors written, {len(manifest['shards'])} shards, "
            f"{len(manifest['groups'])} index group(s) [{manifest['index_factory']}], "
            f"{seconds:.1f} s, {rate:.0f} vectors/s")


def build_gallery_index(cfg: IndexConfig, out_dir: str | Path, executor=None) -> dict[str, Any]:
    from jobs.executors import LocalExecutor  # the default executor needs no Ray

    executor = executor or LocalExecutor()
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs: list[EncoderSpec] = resolve_encoders(list(cfg.encoders), dict(cfg.weights), cfg.image_size)
    shards = list_shards(cfg.gallery if isinstance(cfg.gallery, str) else list(cfg.gallery))
    tasks = [EmbedTask(shard=s, out_dir=str(out), encoders=tuple(specs), crops=cfg.crops, seed=cfg.seed,
                       batch_size=cfg.batch_size) for s in shards]
    results: list[ShardResult] = executor.map(
        functools.partial(Embedder, tuple(specs), cfg.device), tasks, desc="embed shards")

    entries, offset, skipped = [], 0, SkipCounts()
    for shard, r in zip(shards, results):
        entries.append({"name": r.shard, "source": shard.to_dict(), "offset": offset, "num_vectors": r.num_vectors,
                        "num_images": r.num_images, "fingerprint": r.fingerprint, "skipped": r.skipped})
        offset += r.num_vectors
        for reason, n in r.skipped.items():
            skipped.add(reason, n)
    dim = sum(s.embed_dim for s in specs)
    groups = [g for g in _groups(entries, cfg.faiss.shards_per_group) if sum(s["num_vectors"] for s in g)]
    largest = max((sum(s["num_vectors"] for s in g) for g in groups), default=0)
    factory = cfg.faiss.factory
    if factory == "auto":
        factory = knn.choose_factory(largest, dim, int(cfg.faiss.memory_budget_gb * 2**30),
                                     flat_threshold=cfg.faiss.flat_threshold)
    gtasks = [GroupTask(out_dir=str(out), group=i, shards=tuple(g), encoders=tuple(s.name for s in specs),
                        dim=dim, factory=factory, nprobe=cfg.faiss.nprobe, seed=cfg.seed)
              for i, g in enumerate(groups)]
    group_records = executor.map(_group_worker, gtasks, desc="build indexes")

    manifest = {
        "num_images": sum(e["num_images"] for e in entries),
        "num_vectors": offset,
        "skipped": skipped.to_dict(),
        "encoders": [s.to_dict() for s in specs],
        "index_factory": factory,
        "metric": "inner_product (mean cosine over encoders)",
        "dim": dim,
        "nprobe": cfg.faiss.nprobe,
        "shards": entries,
        "groups": [{"file": r["file"], "shards": r["shards"], "factory": r["factory"],
                    "num_vectors": r["num_vectors"]} for r in group_records],
        "config": cfg.to_dict(),
        "code_version": CODE_VERSION,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(out / contract.MANIFEST_FILE, manifest)
    print(summary_line("index", manifest, time.perf_counter() - t0), flush=True)
    return manifest


def _group_worker():
    return build_group
