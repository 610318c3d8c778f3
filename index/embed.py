"""The embedding stage's unit of work: one gallery shard -> one embedding shard.

`embed_shard(task)` reads the shard's images, cuts each into its crops (recipes are a pure function of
(image id, crop index, seed)), embeds every crop with every encoder (batched, no_grad, CUDA when
present) and writes float16 L2-normalised matrices + the row table (each row with its image's location
in the gallery shard, contract.ROW_LOC_FIELDS, and its content hash), then the done record last.
The fingerprint covers every byte of the gallery shard (`index.gallery.shard_digest`): hashed while
the shard is read for embedding, so the first build costs no extra pass; a rerun reads the shard once
(no decoding) to compute it, skips the shard when its done record matches and refuses a mismatch, so
an image replaced by another of the same size is never served from stale embeddings.

Workers receive `EmbedTask`s (plain data) and build their encoders once (`Embedder`), so the same
function runs in-process and in Ray actors. A shard is a stream of batches in two halves,
`Embedder.batches` (CPU: read, and on the CPU path decode + crop) and `Embedder.embed_batch` (device:
on CUDA, JPEG decode + crops from their recipes (index.device_batches), then the encoders in bf16),
which jobs.ray_data runs in separate Ray workers.

The encoder forward on pixel batches is `index.encode`'s.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from index import store
from index.core import contract
from index.core.atomic import CODE_VERSION, FingerprintMismatch, fingerprint
from index.core.images import LOADER_VERSION
from index.crops import CropConfig, materialize, recipes_for
from index.device import pick_device
from index.device_batches import ImageBatch, image_batches, materialize_batch
from index.encode import PendingFeatures, default_batch_size, encode_async, resolve
from index.encoders import EncoderSpec, build_encoder
from index.gallery import ShardRef, iter_images, shard_digest
from index.skips import SkipCounts


@dataclass(frozen=True)
class EmbedTask:
    shard: ShardRef
    out_dir: str
    encoders: tuple[EncoderSpec, ...]
    crops: CropConfig
    seed: int = 0
    batch_size: int | None = None   # crops per forward; None: default_batch_size of the worker's device

    def fingerprint(self, input_digest: str | None = None) -> str:
        """Over the config and the shard's bytes (`input_digest`: `shard_digest`, computed if None)."""
        return fingerprint({
            "shard": self.shard.name, "input": input_digest or shard_digest(self.shard),
            "encoders": [e.identity() for e in self.encoders],
            "crops": self.crops.to_dict(), "seed": self.seed, "store_format": contract.STORE_FORMAT,
            "image_loader": LOADER_VERSION,
        })


@dataclass
class ShardResult:
    shard: str
    num_images: int
    num_vectors: int
    skipped: dict[str, int]
    seconds: float
    fingerprint: str
    reused: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def crops_of_shard(task: EmbedTask, counts: SkipCounts,
                   on_digest: Callable[[str], None] | None = None) -> Iterator[tuple[store.Row, np.ndarray]]:
    """(row, crop pixels uint8 HxWx3) for every crop of every readable image of the shard;
    `on_digest` gets the shard's digest once it is read to the end (`iter_images`)."""
    for img in iter_images(task.shard, counts, on_digest=on_digest):
        for i, recipe in enumerate(recipes_for(img.id, img.image.size, task.seed, task.crops)):
            yield store.Row(img.id, i, recipe.to_dict(), img.loc, img.hash), np.asarray(materialize(img.image, recipe))


def _batches(it: Iterator[tuple[store.Row, np.ndarray]], size: int):
    rows, pix = [], []
    for row, arr in it:
        rows.append(row)
        pix.append(arr)
        if len(rows) == size:
            yield rows, np.stack(pix)
            rows, pix = [], []
    if rows:
        yield rows, np.stack(pix)


def shard_batches(task: EmbedTask, counts: SkipCounts, crops_on_device: bool, batch_size: int,
                  on_digest: Callable[[str], None] | None = None) -> Iterator[Any]:
    """The CPU half of the stage, what `Embedder.embed_batch` takes: (rows, uint8 crops) batches, or
    with `crops_on_device` ImageBatches of JPEG bytes. Skips found while reading go to `counts`;
    `on_digest` gets the shard's digest once it is read to its end."""
    if crops_on_device:
        return image_batches(task.shard, task.crops, counts, batch_size, on_digest)
    return _batches(crops_of_shard(task, counts, on_digest), batch_size)


def _prefetch(gen, depth: int = 2):
    """Run a generator in a background thread so decode/crop overlaps the encoder forward."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work():
        try:
            for item in gen:
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def core_free_for_decode(device: str) -> bool:
    """Whether decode/crop in a background thread can overlap the forward: on CUDA (the forward runs
    on the GPU), or on CPU when torch's intra-op threads leave a core idle. Otherwise the extra thread
    only competes with torch's OpenMP team, whose every op waits at a barrier for a descheduled
    member (bench/embed.py measures both ways)."""
    if device.startswith("cuda"):
        return True
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return torch.get_num_threads() < cpus


class Embedder:
    """Builds its encoders once; call it on tasks. One per worker (process or Ray actor).

    `prefetch`: decode/crop in a background thread while the encoder runs (None: where a core is
    free for it, see `core_free_for_decode`). It changes timing only, never the output.
    `crops_on_device`: decode JPEGs and cut crops on the encoders' device (index.device_batches;
    None: on CUDA). The rows are the same either way; pixels agree closely, not bit for bit.
    """

    def __init__(self, encoders: tuple[EncoderSpec, ...], device: str | None = None,
                 prefetch: bool | None = None, crops_on_device: bool | None = None):
        self.device = pick_device(device)
        self.models = [build_encoder(s, self.device) for s in encoders]
        if self.device.startswith("cuda"):
            self.models = [m.to(memory_format=torch.channels_last) for m in self.models]
        self.prefetch = core_free_for_decode(self.device) if prefetch is None else prefetch
        self.crops_on_device = self.device.startswith("cuda") if crops_on_device is None else crops_on_device

    def __call__(self, task: EmbedTask) -> ShardResult:
        return embed_shard(task, self)

    def batch_size(self, task: EmbedTask) -> int:
        return task.batch_size or default_batch_size(self.device)

    def batches(self, task: EmbedTask, counts: SkipCounts,
                on_digest: Callable[[str], None] | None = None) -> Iterator[Any]:
        return shard_batches(task, counts, self.crops_on_device, self.batch_size(task), on_digest)

    def embed_batch(self, batch: Any, task: EmbedTask,
                    counts: SkipCounts) -> tuple[list[store.Row], list[np.ndarray] | PendingFeatures]:
        """The device half: (rows, one float16 matrix per encoder) of one batch from `batches`; on
        CUDA the matrices may still be in flight (`resolve` them)."""
        if isinstance(batch, ImageBatch):
            rows, crops = materialize_batch(batch, task.crops, task.seed, self.device, counts)
            if crops is None:
                return [], [np.zeros((0, m.spec.embed_dim), np.float16) for m in self.models]
            return rows, encode_async(self.models, crops.permute(0, 2, 3, 1), self.device)
        rows, pixels = batch
        return rows, encode_async(self.models, pixels, self.device)


def reused_result(task: EmbedTask) -> ShardResult | None:
    """A rerun's result for a shard already written: reused only if its done record matches the task
    and the shard's bytes (read once, not decoded); None where there is none; a mismatch raises, and
    a shard of another store format (an index built by an earlier version) says so."""
    if not store.has_done(task.out_dir, task.shard.name):
        return None
    written = store.store_format(store.read_record(task.out_dir, task.shard.name))
    if written != contract.STORE_FORMAT:
        done = store.shard_dir(task.out_dir, task.shard.name) / contract.DONE_FILE
        raise FingerprintMismatch(
            f"{done} was written in embedding-store format {written}; this version writes format "
            f"{contract.STORE_FORMAT} (index.core.contract.STORE_FORMAT): build the index into a new output "
            f"directory, or delete {Path(task.out_dir) / contract.EMBEDDINGS_DIR} to rebuild it")
    record = store.done_record(task.out_dir, task.shard.name, task.fingerprint())
    return None if record is None else ShardResult(**{**record["result"], "reused": True})


def embed_shard(task: EmbedTask, embedder: Embedder | None = None) -> ShardResult:
    reused = reused_result(task)
    if reused is not None:
        return reused
    embedder = embedder or Embedder(task.encoders)
    t0 = time.perf_counter()
    counts, device_counts = SkipCounts(), SkipCounts()  # one per thread
    digest: list[str] = []
    rows: list[store.Row] = []
    feats: list[list[np.ndarray]] = [[] for _ in task.encoders]
    batches = embedder.batches(task, counts, digest.append)
    in_flight = None  # the previous batch's features: collected once the next batch is queued
    for batch in (_prefetch(batches) if embedder.prefetch else batches):
        batch_rows, batch_feats = embedder.embed_batch(batch, task, device_counts)
        rows.extend(batch_rows)
        for acc, f in zip(feats, resolve(in_flight) if in_flight is not None else ()):
            acc.append(f)
        in_flight = batch_feats
    for acc, f in zip(feats, resolve(in_flight) if in_flight is not None else ()):
        acc.append(f)
    counts.merge(device_counts)
    if len(digest) != 1:
        raise RuntimeError(f"{task.shard.path}: the shard was not read to its end")
    return write_result(task, digest[0], rows, feats, counts, time.perf_counter() - t0)


def write_result(task: EmbedTask, digest: str, rows: list[store.Row], feats: list[list[np.ndarray]],
                 counts: SkipCounts, seconds: float) -> ShardResult:
    """Write the shard's matrices, row table and done record (last); the shard's result. `digest` is
    the shard's `shard_digest`, hashed while it was read."""
    features = {
        spec.name: (np.concatenate(acc) if acc else np.zeros((0, spec.embed_dim), np.float16))
        for spec, acc in zip(task.encoders, feats)
    }
    fp = task.fingerprint(digest)
    num_images = len({r.id for r in rows})
    result = ShardResult(shard=task.shard.name, num_images=num_images, num_vectors=len(rows),
                         skipped=counts.to_dict(), seconds=round(seconds, 3), fingerprint=fp)
    store.write_shard(task.out_dir, task.shard.name, features, rows, {
        "fingerprint": fp, "code_version": CODE_VERSION, "result": result.to_dict(),
        "encoders": [e.to_dict() for e in task.encoders], "crops": task.crops.to_dict(),
        "seed": task.seed, "source": str(Path(task.shard.path)), "input_digest": digest,
    })
    return result
