"""The indexing stage: gallery shards -> embedding shards -> [trained quantizer] -> FAISS index per
shard group -> manifest.

`build_gallery_index(cfg, out_dir, executor)` fans `embed_shard` out over gallery shards, runs
`train_quantizer` once (IVF factories with `faiss.shared_quantizer`: the coarse quantizer and PQ
codebooks trained on a sample drawn across the whole gallery, saved as an empty trained index) and
`build_group` over shard groups, each filling a copy of that trained index, all through any
executor (jobs.executors); then it writes ``manifest.json`` last. Every unit of work is skipped on
rerun when its done record matches and refused when it differs, so a killed job reruns to the
same result.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index import faiss_io, knn, recall, store
from index.config import FaissConfig, IndexConfig
from index.core import contract
from index.core.atomic import CODE_VERSION, check_done, fingerprint, read_json, write_json
from index.core.images import LOADER_VERSION
from index.core.executor import LocalExecutor
from index.core.outdir import Owner, invalidate, owned_dir, pattern_dirs
from index.device import pick_device
from index.embed import EmbedTask, Embedder, ShardResult
from index.encoders import EncoderSpec, resolve_encoders
from index.gallery import list_shards
from index.gallery_index import GalleryIndex
from index.skips import SkipCounts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainTask:
    """Train the index's quantizer (and PQ codebooks) once, for every group to share."""
    out_dir: str
    shards: tuple[dict[str, Any], ...]   # every manifest shard entry: name, offset, num_vectors, fingerprint
    encoders: tuple[str, ...]
    dim: int
    factory: str
    nprobe: int
    seed: int = 0
    train_size: int | None = None        # None: knn.training_size(factory)

    file = contract.TRAINED_INDEX_FILE

    @property
    def size(self) -> int:
        return int(self.train_size or knn.training_size(self.factory))

    def fingerprint(self) -> str:
        return fingerprint({"shards": [(s["name"], s["offset"], s["num_vectors"], s["fingerprint"])
                                       for s in self.shards],
                            "factory": self.factory, "dim": self.dim, "seed": self.seed, "train_size": self.size})


def gallery_training_sample(out_dir: str | Path, shards: list[dict[str, Any]], encoders: list[str],
                            size: int, seed: int) -> np.ndarray:
    """float32 [min(size, n), dim]: combined vectors of a seeded sample across every shard.

    Each shard gives its proportional share (`knn.gallery_sample_rows`); only the sampled rows of
    its memory-mapped .npy matrices are read, so the sample of a gallery of any size costs the
    sample's bytes (about 20 GB for 3.3M x 1,536 dims, IVF65536) plus one page per row.
    """
    plan = knn.gallery_sample_rows([s["num_vectors"] for s in shards], size, seed)
    parts = [knn.combine_features([store.load_features(out_dir, s["name"], e)[rows] for e in encoders])
             for s, rows in zip(shards, plan) if len(rows)]
    if not parts:
        raise ValueError("gallery_training_sample: the gallery has no vectors to train on")
    return np.ascontiguousarray(np.concatenate(parts))


def train_quantizer(task: TrainTask) -> dict[str, Any]:
    """Sample across the gallery, train an empty index of the factory, save it: the shared quantizer."""
    def make() -> dict[str, Any]:
        out = Path(task.out_dir)
        sample = gallery_training_sample(out, list(task.shards), list(task.encoders), task.size, task.seed)
        trained = knn.train_index(task.factory, task.dim, sample, nprobe=task.nprobe, seed=task.seed)
        faiss_io.save_index(trained, out / task.file)
        return {"factory": task.factory, "num_train": int(len(sample))}
    return _committed(task.out_dir, task.file, task.fingerprint(), make)


def _committed(out_dir: str, file: str, fp: str, make) -> dict[str, Any]:
    """`file`'s done record if it matches `fp` (raises if it differs); else `make()` writes the file
    and returns its record fields, and the record (with fingerprint, file and seconds) is written last."""
    done_path = Path(out_dir) / (file + ".done.json")
    record = check_done(done_path, fp)
    if record is not None:
        return record
    t0 = time.perf_counter()
    invalidate(out_dir, contract.MANIFEST_FILE)
    record = {"fingerprint": fp, "file": file, **make(), "seconds": 0.0}
    record["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(done_path, record)
    return record


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
    trained: dict[str, Any] | None = None   # train_quantizer's record: fill its index, train nothing

    @property
    def file(self) -> str:
        return f"{contract.FAISS_DIR}/group-{self.group:03d}.index"

    def fingerprint(self) -> str:
        inputs = {"shards": [(s["name"], s["offset"], s["fingerprint"]) for s in self.shards],
                  "factory": self.factory, "dim": self.dim, "seed": self.seed}
        if self.trained is not None:
            inputs["trained"] = self.trained["fingerprint"]
        return fingerprint(inputs)


def build_group(task: GroupTask) -> dict[str, Any]:
    """Fill one FAISS index from the group's embedding shards: a copy of the shared trained index,
    or (no `task.trained`) an index trained on a sample of this group alone."""
    return _committed(task.out_dir, task.file, task.fingerprint(), functools.partial(_fill_group, task))


def _fill_group(task: GroupTask) -> dict[str, Any]:
    out = Path(task.out_dir)
    shards = list(task.shards)
    num_vectors = sum(s["num_vectors"] for s in shards)
    train, trained = None, None
    if task.trained is not None:
        trained = faiss_io.load_index(out / task.trained["file"])
    elif knn.needs_training(task.factory):
        train = knn.training_sample(store.iter_blocks(out, shards, list(task.encoders)), num_vectors,
                                    knn.training_size(task.factory), task.seed)
    index = knn.build_index(
        ((np.arange(off, off + len(v), dtype=np.int64), v)
         for off, v in store.iter_blocks(out, shards, list(task.encoders))),
        factory=task.factory, dim=task.dim, train_sample=train, nprobe=task.nprobe, seed=task.seed,
        trained=trained)
    faiss_io.save_index(index, out / task.file)
    return {"shards": [s["name"] for s in shards], "factory": task.factory, "num_vectors": int(index.ntotal)}


def _groups(entries: list[dict[str, Any]], per_group: int) -> list[list[dict[str, Any]]]:
    return [entries[i:i + per_group] for i in range(0, len(entries), per_group)]


def summary_line(stage: str, manifest: dict[str, Any], seconds: float) -> str:
    skipped = manifest["skipped"]
    skip = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"
    rate = manifest["num_vectors"] / seconds if seconds > 0 else float("nan")
    return (f"{stage}: {manifest['num_images']} images read, skipped {sum(skipped.values())} ({skip}), "
            f"{manifest['num_vectors']} vectors written, {len(manifest['shards'])} shards, "
            f"{len(manifest['groups'])} index group(s) [{manifest['index_factory']}"
            f"{', one shared quantizer' if manifest.get('shared_quantizer') else ''}], "
            f"{seconds:.1f} s, {rate:.0f} vectors/s")


def build_faiss_groups(out_dir: str | Path, entries: list[dict[str, Any]], encoders: tuple[str, ...], dim: int,
                       faiss_cfg: FaissConfig, seed: int, executor) -> dict[str, Any]:
    """The FAISS half of the stage, over embedding shards already written under `out_dir`.

    `entries` are the manifest's shard entries (name, offset, num_vectors, fingerprint). Returns
    the manifest's index fields: index_factory, nprobe, groups, shared_quantizer, trained_index.
    With a shared quantizer and a factory that trains, `train_quantizer` runs first as one task
    and every group is filled from its output.
    """
    groups = [g for g in _groups(entries, faiss_cfg.shards_per_group) if sum(s["num_vectors"] for s in g)]
    largest = max((sum(s["num_vectors"] for s in g) for g in groups), default=0)
    total = sum(s["num_vectors"] for s in entries)
    shared = faiss_cfg.shared_quantizer
    factory = faiss_cfg.factory
    if factory == "auto":
        # shared quantizer: the groups act as one index, so the lists are sized for the whole gallery
        factory = knn.choose_factory(largest, dim, int(faiss_cfg.memory_budget_gb * 2**30),
                                     flat_threshold=faiss_cfg.flat_threshold,
                                     total_vectors=total if shared else None)
    if groups:   # before any training: say so, rather than fail inside faiss
        knn.check_trainable(factory, dim, total if shared else min(sum(s["num_vectors"] for s in g) for g in groups),
                            "the gallery gave" if shared else "the smallest shard group holds")
    trained = None
    if shared and groups and knn.needs_training(factory, dim):
        ttask = TrainTask(out_dir=str(out_dir), shards=tuple(s for g in groups for s in g), encoders=encoders,
                          dim=dim, factory=factory, nprobe=faiss_cfg.nprobe or knn.DEFAULT_NPROBE, seed=seed,
                          train_size=faiss_cfg.train_size)
        trained = executor.map(_train_worker, [ttask], desc="train quantizer")[0]
    gtasks = [GroupTask(out_dir=str(out_dir), group=i, shards=tuple(g), encoders=encoders,
                        dim=dim, factory=factory, nprobe=faiss_cfg.nprobe or knn.DEFAULT_NPROBE, seed=seed,
                        trained=trained)
              for i, g in enumerate(groups)]
    group_records = executor.map(_group_worker, gtasks, desc="build indexes")
    return {
        "index_factory": factory,
        "nprobe": faiss_cfg.nprobe or knn.DEFAULT_NPROBE,
        "rerank": faiss_cfg.rerank or 0,
        "groups": [{"file": r["file"], "shards": r["shards"], "factory": r["factory"],
                    "num_vectors": r["num_vectors"]} for r in group_records],
        "shared_quantizer": trained is not None,
        "trained_index": None if trained is None else
        {k: trained[k] for k in ("file", "fingerprint", "num_train", "factory")},
    }


OWNER = Owner("build_index", (re.escape(contract.MANIFEST_FILE), re.escape(contract.EMBEDDINGS_DIR),
                             re.escape(contract.VECTORS_DIR), re.escape(contract.FAISS_DIR)),
              done_record=contract.MANIFEST_FILE, lazy=True)


def build_gallery_index(cfg: IndexConfig, out_dir: str | Path, executor=None) -> dict[str, Any]:
    """Validate everything that can be checked before work (encoders, gallery, device, the factory
    against the dimension and the most vectors the gallery can hold), take `out_dir`
    (`index.core.outdir.owned_dir`), then embed, build the FAISS groups and write the manifest last.
    Returns the manifest; `build-index` prints ``summary_line("index", manifest, manifest["seconds"])``."""
    executor = executor or LocalExecutor()
    t0 = time.perf_counter()
    cfg.check_gallery()
    specs: list[EncoderSpec] = resolve_encoders(list(cfg.encoders), dict(cfg.weights), cfg.image_size)
    gallery = cfg.gallery if isinstance(cfg.gallery, str) else list(cfg.gallery)
    shards = list_shards(gallery)
    if isinstance(executor, LocalExecutor):
        pick_device(cfg.device)
    dim = sum(s.embed_dim for s in specs)
    if cfg.faiss.factory != "auto":
        knn.validate_factory(cfg.faiss.factory, dim)
        knn.check_trainable(cfg.faiss.factory, dim, max_vectors(shards, cfg.crops.crops_per_image),
                            "the gallery can hold at most")
    with owned_dir(out_dir, OWNER, {"the gallery": pattern_dirs(gallery)}) as owned:
        return _build(cfg, owned.path, executor, specs, shards, dim, t0)


def max_vectors(shards, crops_per_image: int) -> int:
    """An upper bound on the vectors a gallery gives, without reading it: a tar sample takes at least
    1,024 bytes (a header block and a data block), a folder image one file."""
    n = 0
    for s in shards:
        if s.kind == "tar":
            n += os.path.getsize(s.path) // 1024
        else:
            walk = os.walk(s.path) if s.recursive else [(s.path, [], os.listdir(s.path))]
            n += sum(len(files) for _, _, files in walk)
    return n * crops_per_image


def _build(cfg: IndexConfig, out: Path, executor, specs: list[EncoderSpec], shards, dim: int,
           t0: float) -> dict[str, Any]:
    tasks = [EmbedTask(shard=s, out_dir=str(out), encoders=tuple(specs), crops=cfg.crops, seed=cfg.seed,
                       batch_size=cfg.batch_size) for s in shards]
    streaming = getattr(executor, "embed_shards", None)  # a cluster executor's own embedding pipeline
    results: list[ShardResult] = (
        streaming(tasks, tuple(specs), cfg.device) if streaming is not None else
        executor.map(functools.partial(Embedder, tuple(specs), cfg.device), tasks, desc="embed shards"))

    entries, offset, skipped = [], 0, SkipCounts()
    for shard, r in zip(shards, results):
        entries.append({"name": r.shard, "source": shard.to_dict(), "offset": offset, "num_vectors": r.num_vectors,
                        "num_images": r.num_images, "fingerprint": r.fingerprint, "skipped": r.skipped})
        offset += r.num_vectors
        for reason, n in r.skipped.items():
            skipped.add(reason, n)
    return index_embeddings(out, entries, [s.to_dict() for s in specs], cfg.faiss, cfg.seed, executor, t0,
                            num_images=sum(e["num_images"] for e in entries), skipped=skipped.to_dict(),
                            config=cfg.to_dict())


def index_embeddings(out: str | Path, entries: list[dict[str, Any]], encoders: list[dict[str, Any]],
                     faiss_cfg: FaissConfig, seed: int, executor, t0: float | None = None,
                     **fields: Any) -> dict[str, Any]:
    """The FAISS half of the stage over embedding shards already under `out`: the groups
    (`build_faiss_groups`), the operating point (`operating_point`), then the manifest, written last.

    `entries` are the manifest's shard entries, `encoders` the EncoderSpec dicts of the stored
    matrices; `fields` go into the manifest as given (num_images, skipped, config...). Also builds
    an index over vectors made elsewhere, written with `index.store.write_shard`.
    """
    t0 = time.perf_counter() if t0 is None else t0
    out = Path(out)
    dim = sum(int(e["embed_dim"]) for e in encoders)
    faiss_part = build_faiss_groups(out, entries, tuple(e["name"] for e in encoders), dim, faiss_cfg, seed,
                                    executor)
    manifest = {
        "num_images": sum(e.get("num_images", e["num_vectors"]) for e in entries),
        "num_vectors": sum(e["num_vectors"] for e in entries),
        "skipped": {},
        "encoders": list(encoders),
        "metric": "inner_product (mean cosine over encoders)",
        "dim": dim,
        "shards": entries,
        **faiss_part,
        "store_format": contract.STORE_FORMAT,
        "code_version": CODE_VERSION,
        "image_loader": LOADER_VERSION,
        **fields,
    }
    manifest.update(operating_point(out, manifest, faiss_cfg, seed, executor))
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(out / contract.MANIFEST_FILE, manifest)
    return manifest


def operating_point(out: Path, manifest: dict[str, Any], fcfg: FaissConfig, seed: int, executor) -> dict[str, Any]:
    """The manifest's search fields: ``nprobe`` and ``rerank`` in force, ``recall`` (the measured
    operating points and their sample, index.recall) and ``operating_point`` (which point and why).

    IVF indexes are measured once (`measure_recall`, a committed unit of work, so a rerun reuses
    the points and chooses the same one): recall@10/100/1000 and query time per (nprobe, rerank),
    against exact search over a sample of groups. The point in force is the fastest one reaching
    ``faiss.recall_target`` at ``faiss.recall_k``, unless ``faiss.nprobe`` fixes it.
    """
    factory = manifest["index_factory"]
    nlist = knn.ivf_lists(factory)
    target, k = fcfg.recall_target, fcfg.recall_k
    fixed = {"nprobe": fcfg.nprobe or knn.DEFAULT_NPROBE, "rerank": fcfg.rerank or 0}
    if nlist is None or target is None or not manifest["groups"]:
        why = ("exact search (Flat): recall 1" if factory == "Flat" else
               "recall not measured: " + ("faiss.recall_target is null" if target is None else
                                          "no index groups" if not manifest["groups"] else
                                          f"{factory} has no IVF lists to probe"))
        return {**fixed, "recall": None, "operating_point": {**fixed, "k": k, "target": target,
                                                            "recall": 1.0 if factory == "Flat" else None, "why": why}}
    measured = measure_recall(out, manifest, fcfg, seed, executor, nlist)
    point = recall.point_for({"recall": measured, "rerank": fcfg.rerank or 0}, k, fcfg.nprobe, fcfg.rerank, target)
    if point["recall"] is not None and point["recall"] < target:
        log.warning("index search recall@%d is %.3f at nprobe %d, rerank %d, below the target %.3f (%s)", k,
                    point["recall"], point["nprobe"], point["rerank"], target, point["why"])
    return {"nprobe": point["nprobe"], "rerank": point["rerank"], "recall": measured, "operating_point": point}


def measure_recall(out: Path, manifest: dict[str, Any], fcfg: FaissConfig, seed: int, executor,
                   nlist: int) -> dict[str, Any]:
    """The index's operating points (index.recall.measure_operating_points), measured once: gallery
    vectors held out as queries (each one's own row excluded from both lists), exact search over a
    seeded sample of groups of about ``faiss.recall_sample_vectors`` vectors. Written to
    contract.OPERATING_POINTS_FILE under a done record; a rerun with the same inputs reads it back."""
    inputs = {"shards": [(s["name"], s["offset"], s["fingerprint"]) for s in manifest["shards"]],
              "groups": [(g["file"], g["num_vectors"]) for g in manifest["groups"]],
              "factory": manifest["index_factory"], "seed": seed, "queries": fcfg.recall_queries,
              "sample_vectors": fcfg.recall_sample_vectors, "points": recall.POINTS_VERSION}

    def make() -> dict[str, Any]:
        gindex = GalleryIndex(out, executor=None if isinstance(executor, LocalExecutor) else executor,
                              manifest=manifest)
        shards = manifest["shards"]
        plan = knn.gallery_sample_rows([s["num_vectors"] for s in shards], fcfg.recall_queries, seed + 1)
        gids = np.concatenate([rows + s["offset"] for rows, s in zip(plan, shards)])
        ks = recall.depths(manifest["num_vectors"] - 1)
        sample = recall.exact_sample(gindex, gindex.vectors_at(gids), max(ks), fcfg.recall_sample_vectors,
                                     seed, exclude=gids)
        points = recall.measure_operating_points(gindex, sample, nlist, knn.lossy_codes(manifest["index_factory"]),
                                                 ks, log=log.info)
        write_json(out / contract.OPERATING_POINTS_FILE,
                   {"sample": sample.describe(len(manifest["groups"]), "gallery vectors, own row excluded"),
                    "points": points})
        return {"points": len(points)}
    _committed(str(out), contract.OPERATING_POINTS_FILE, fingerprint(inputs), make)
    return read_json(out / contract.OPERATING_POINTS_FILE)


def _group_worker():
    return build_group


def _train_worker():
    return train_quantizer
