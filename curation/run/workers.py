"""Units of work the curation stages fan out over an executor, and the ordered shard writer.

Workers get specs and paths (the index's, and the gallery's new root if it moved), never live models or
open indexes, and build those where they run (as `index.build` does with its embedder); tasks and
results are plain data, so `LocalExecutor` and `RayExecutor` give the same results in the same order.

    originals_worker(...)  task: gallery image ids  -> their features (+ pixel keys), unreadable ids
    crops_worker(...)      task: transfer records   -> JPEG bytes of each crop (None: unreadable), and
                                                       report thumbnails of the crops/originals asked for

Each image travels with its location and the content hash its index row records, so a worker reads
no row table and an image replaced since indexing comes back unreadable as 'changed'.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from curation import pixelkey
from curation.features import embed_originals
from curation.report_data import ReportLimits, thumbnail_png
from curation.report_thumbs import write_report_thumbs
from curation.shards import AtomicShardWriter, jpeg_bytes, materialized_crops, remove_stale, write_order
from index.core import contract
from index.core.executor import Executor, chunks
from index.device import pick_device
from index.encoders import EncoderSpec, build_encoder
from index.gallery_index import GalleryIndex
from index.ranged import ReadStats
from index.skips import SkipCounts

IMAGES_PER_TASK = 512    # originals per embedding task
CROPS_PER_TASK = 256     # transfer samples per materialisation task


# ---------------------------------------------------------------- original images

def _reads(gindex: GalleryIndex) -> dict[str, int]:
    """The gallery bytes this worker's index has read since the last call (then reset)."""
    stats, gindex.read_stats = gindex.read_stats.to_dict(), ReadStats()
    return stats


def _embed_task(task: list[tuple[str, dict | None, str | None]], gindex: GalleryIndex, models: list,
                batch_size: int, with_keys: bool) -> dict[str, Any]:
    # locations and content hashes travel with the task: no row table is read here
    gindex.remember({i: loc for i, loc, _ in task}, {i: h for i, _, h in task})
    ids = [i for i, _, _ in task]
    feats: dict[str, list[np.ndarray]] = {}
    keys: dict[str, np.ndarray] | None = {} if with_keys else None
    unreadable = embed_originals(gindex, models, ids, feats, batch_size, keys_into=keys)
    ok = [i for i in ids if i in feats]
    return {"ids": ok, "unreadable": unreadable, "reads": _reads(gindex),
            "feats": [np.stack([feats[i][e] for i in ok]) if ok else np.zeros((0, m.spec.embed_dim), np.float32)
                      for e, m in enumerate(models)],
            "keys": None if keys is None else (np.stack([keys[i] for i in ok]) if ok
                                               else np.zeros((0, pixelkey.DIM), np.float32))}


def originals_worker(index_root: str, gallery_root: str | None, specs: list[EncoderSpec], device: str | None,
                     batch_size: int, with_keys: bool
                     ) -> Callable[[list[tuple[str, dict | None, str | None]]], dict[str, Any]]:
    gindex = GalleryIndex(index_root, gallery_root=gallery_root)
    models = [build_encoder(s, pick_device(device)) for s in specs]
    return lambda task: _embed_task(task, gindex, models, batch_size, with_keys)


def embed_original_images(executor: Executor, make_worker: Callable, gindex: GalleryIndex, image_ids: Sequence[str],
                          into: dict[str, list[np.ndarray]], keys_into: dict[str, np.ndarray] | None,
                          per_task: int = IMAGES_PER_TASK) -> dict[str, str]:
    """Embed these gallery originals over the executor (ids sorted, so by shard, each with its
    location); return unreadable. The workers' gallery reads are added to ``gindex.read_stats``."""
    ids = sorted(image_ids)
    locs, hashes = gindex.locations(ids), gindex.hashes(ids)
    tasks = chunks([(i, locs.get(i), hashes.get(i)) for i in ids], per_task)
    results = executor.map(make_worker, tasks, desc="embed originals", units=[len(t) for t in tasks], unit="image")
    unreadable: dict[str, str] = {}
    for res in results:
        gindex.read_stats.merge(ReadStats(**res["reads"]))
        for row, i in enumerate(res["ids"]):
            into[i] = [f[row] for f in res["feats"]]
            if keys_into is not None:
                keys_into[i] = res["keys"][row]
        unreadable.update(res["unreadable"])
    return unreadable


# ---------------------------------------------------------------- transfer crops

def _crops_task(task: tuple[list[dict], dict[str, dict | None], dict[str, str | None], list[str], list[str]],
                gindex: GalleryIndex, quality: int, thumb_size: int) -> dict[str, Any]:
    recs, locs, hashes, thumb_keys, thumb_originals = task
    gindex.remember(locs, hashes)
    counts = SkipCounts()
    unreadable: dict[str, str] = {}
    records = [contract.TransferRecord.from_dict(d) for d in recs]
    want_crop, want_orig = set(thumb_keys), set(thumb_originals)
    got: dict[str, bytes | None] = {}
    thumbs: dict[str, dict[str, bytes]] = {}
    for r, crop, original in materialized_crops(gindex, records, counts, with_originals=True,
                                                unreadable=unreadable):
        got[r.key] = None if crop is None else jpeg_bytes(crop, quality)
        if crop is None:
            continue
        t = {}
        if r.key in want_crop:
            t["crop"] = thumbnail_png(crop, thumb_size)
        if r.source_id in want_orig:   # the first record of its source in this task carries it
            want_orig.discard(r.source_id)
            t["original"] = thumbnail_png(original, thumb_size)
        if t:
            thumbs[r.key] = t
    return {"jpg": [got[r.key] for r in records], "thumbs": [thumbs.get(r.key) for r in records],
            "skipped": counts.to_dict(), "unreadable": unreadable, "reads": _reads(gindex)}


def crops_worker(index_root: str, gallery_root: str | None, quality: int, thumb_size: int = ReportLimits().thumb_size
                 ) -> Callable[[tuple[list[dict], dict, dict, list[str], list[str]]], dict[str, Any]]:
    gindex = GalleryIndex(index_root, gallery_root=gallery_root)
    return lambda task: _crops_task(task, gindex, quality, thumb_size)


def write_transfer(out: Path, gindex: GalleryIndex, records: Sequence[contract.TransferRecord], shard_size: int,
                   executor: Executor, make_worker: Callable, per_task: int = CROPS_PER_TASK,
                   thumb_keys: set[str] = frozenset(), thumb_originals: set[str] = frozenset(),
                   on_unreadable: Callable[[dict[str, str]], None] | None = None) -> dict[str, Any]:
    """Materialise the crops over the executor and write ``transfer-*.tar`` in order on this process;
    returns {"written", "unreadable", "skipped", "files", "shardlist"} (stale shards of an earlier run
    are removed; "shardlist" as `AtomicShardWriter.shardlist`).
    `on_unreadable` sees {source id: reason} of the originals that could not be read before anything
    is written, and may raise to refuse them.

    The crops of ``thumb_keys`` (record keys) and the originals of ``thumb_originals`` (source ids)
    are also returned as report thumbnails, made from the images decoded for the crops, and written
    to ``DIR/contract.REPORT_THUMBS_FILE`` (see `write_report_thumbs`)."""
    ordered = write_order(gindex, records)
    parts = chunks([r.to_dict() for r in ordered], per_task)
    sources = [sorted({r["source_id"] for r in part}) for part in parts]
    tasks = [(part, gindex.locations(src), gindex.hashes(src),
              sorted(r["key"] for r in part if r["key"] in thumb_keys),
              sorted(set(src) & set(thumb_originals))) for part, src in zip(parts, sources)]
    results = executor.map(make_worker, tasks, desc="write crops", units=[len(t[0]) for t in tasks], unit="crop")
    if on_unreadable is not None:
        on_unreadable({i: why for res in results for i, why in res["unreadable"].items()})
    writer = AtomicShardWriter(out, contract.TRANSFER_PATTERN, shard_size)
    skipped = SkipCounts()
    written = unreadable = 0
    thumbs: list[tuple[dict, dict[str, bytes]]] = []
    for part, res in zip(parts, results):
        skipped.merge(res["skipped"])
        gindex.read_stats.merge(ReadStats(**res["reads"]))
        for rec, jpg, t in zip(part, res["jpg"], res["thumbs"]):
            if t:
                thumbs.append((rec, t))
            if jpg is None:
                unreadable += 1
                continue
            writer.write({"__key__": rec["key"], "jpg": jpg, "json": json.dumps(rec, sort_keys=True).encode()})
            written += 1
    files = writer.close()
    remove_stale(out, contract.TRANSFER_PATTERN, files)
    write_report_thumbs(out / contract.REPORT_THUMBS_FILE, thumbs)
    return {"written": written, "unreadable": unreadable, "skipped": skipped.to_dict(), "files": files,
            "shardlist": writer.shardlist()}
