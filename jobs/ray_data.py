"""The embedding stage as a Ray Data stream: readers on CPU tasks, encoders in an actor pool.

    embed_with_ray_data(tasks, specs, device=None, num_encoders=1, gpus_per_encoder=0) -> [ShardResult]

The dataset is the list of shards still to embed (a shard whose done record matches its fingerprint
is reused, as `embed_shard` does). `flat_map` reads each shard on a CPU task, emitting its batches
(`index.embed.shard_batches`: JPEG bytes when crops are cut on the GPU, else decoded, cropped pixels);
`map_batches` feeds them to a pool of `num_encoders` actors, each holding its encoders
(`index.embed.Embedder`, `num_gpus=gpus_per_encoder`), which decode and crop on the device when it
is CUDA and run the forward. Readers are scheduled on every free CPU, independently of the actors,
so a node with 8 GPUs and 128 cores is not held to one decode thread per GPU. The driver gathers each
shard's batches (small: float16 features and row records) and writes the shard with
`index.embed.write_result` once its last batch is in, so the files equal `embed_shard`'s, batch for
batch (the same batches go through the same forward).
"""
from __future__ import annotations

import pickle
import time
from collections import defaultdict
from typing import Any, Iterator

import numpy as np
import torch

from index import store
from index.core.allocator import tune_allocator
from index.embed import EmbedTask, Embedder, ShardResult, reused_result, shard_batches, write_result
from index.encode import default_batch_size, resolve
from index.encoders import EncoderSpec
from index.skips import SkipCounts


def encoder_device(device: str | None, gpus_per_encoder: float) -> str:
    """The encoder actors' device: `device` if given, else CUDA when each actor has a GPU share."""
    return device or ("cuda" if gpus_per_encoder > 0 else "cpu")


def _read_shard(item: dict[str, Any], tasks: list[EmbedTask], device: str,
                crops_on_device: bool) -> Iterator[dict[str, Any]]:
    """flat_map (a CPU task): one shard -> its batches, each a row {i, b, last, payload, skipped};
    the last row's `skipped` carries what reading found: the skips and the shard's digest."""
    i = int(item["i"])
    task = tasks[i]
    counts = SkipCounts()
    size = task.batch_size or default_batch_size(device)
    prev, b = None, 0
    digest: list[str] = []
    for batch in shard_batches(task, counts, crops_on_device, size, digest.append):
        if prev is not None:
            yield {"i": i, "b": b - 1, "last": False, "payload": pickle.dumps(prev), "skipped": b""}
        prev, b = batch, b + 1
    yield {"i": i, "b": max(b - 1, 0), "last": True, "payload": pickle.dumps(prev),
           "skipped": pickle.dumps((counts.to_dict(), digest[0]))}


class _Encoder:
    """map_batches actor: builds its encoders once; one reader row in, one result row out."""

    def __init__(self, tasks: list[EmbedTask], specs: tuple[EncoderSpec, ...], device: str,
                 crops_on_device: bool, torch_threads: int | None):
        tune_allocator()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.tasks = tasks
        self.embedder = Embedder(specs, device, crops_on_device=crops_on_device)
        self.specs = specs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = defaultdict(list)
        for i, b, last, payload, skipped in zip(batch["i"], batch["b"], batch["last"], batch["payload"],
                                                batch["skipped"]):
            item = pickle.loads(payload)
            read_counts, digest = pickle.loads(skipped) if last else ({}, "")
            counts = SkipCounts(read_counts)
            if item is None:
                rows: list[store.Row] = []
                feats = [np.zeros((0, s.embed_dim), np.float16) for s in self.specs]
            else:
                rows, pending = self.embedder.embed_batch(item, self.tasks[int(i)], counts)
                feats = resolve(pending)
            out["i"].append(int(i))
            out["b"].append(int(b))
            out["last"].append(bool(last))
            out["result"].append(pickle.dumps((rows, feats, counts.to_dict(), digest)))
        return dict(out)


class _Shard:
    """The driver's view of one shard in flight: its batches so far and whether the last one came."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.parts: dict[int, tuple[list[store.Row], list[np.ndarray]]] = {}
        self.counts = SkipCounts()
        self.num_batches: int | None = None
        self.digest = ""   # the shard's bytes, hashed by the reader (`index.gallery.shard_digest`)

    def add(self, b: int, last: bool, rows, feats, skipped: dict[str, int], digest: str) -> bool:
        """Take batch `b`; the last one also brings the shard's digest. True once all are in."""
        self.parts[b] = (rows, feats)
        self.counts.merge(skipped)
        if last:
            self.num_batches, self.digest = b + 1, digest
        return self.num_batches is not None and len(self.parts) == self.num_batches


def embed_with_ray_data(tasks: list[EmbedTask], specs: tuple[EncoderSpec, ...], device: str | None = None, *,
                        num_encoders: int = 1, gpus_per_encoder: float = 0, cpus_per_encoder: float = 1,
                        cpus_per_reader: float = 1, torch_threads: int | None = None,
                        crops_on_device: bool | None = None) -> list[ShardResult]:
    """Embed `tasks` on the Ray cluster this process is connected to; results in task order.
    `crops_on_device` as `Embedder`'s (None: when the encoders' device is CUDA)."""
    import ray  # lazy: ray

    if num_encoders < 1:
        raise ValueError(f"num_encoders must be >= 1; got {num_encoders}")
    results: dict[int, ShardResult] = {}
    for i, t in enumerate(tasks):
        reused = reused_result(t)
        if reused is not None:
            results[i] = reused
    pending = [i for i in range(len(tasks)) if i not in results]
    if pending:
        dev = encoder_device(device, gpus_per_encoder)
        on_device = dev.startswith("cuda") if crops_on_device is None else crops_on_device
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.from_items([{"i": i} for i in pending], override_num_blocks=len(pending))
        ds = ds.flat_map(_read_shard, fn_kwargs={"tasks": tasks, "device": dev, "crops_on_device": on_device}, num_cpus=cpus_per_reader)
        ds = ds.map_batches(_Encoder, fn_constructor_args=(tasks, specs, dev, on_device, torch_threads), batch_size=1,
                            batch_format="numpy", concurrency=min(num_encoders, len(pending)),
                            num_gpus=gpus_per_encoder or None, num_cpus=cpus_per_encoder)
        shards: dict[int, _Shard] = defaultdict(_Shard)
        for row in ds.iter_rows():
            i = int(row["i"])
            rows, feats, skipped, digest = pickle.loads(row["result"])
            if shards[i].add(int(row["b"]), bool(row["last"]), rows, feats, skipped, digest):
                shard = shards.pop(i)
                order = sorted(shard.parts)
                all_rows = [r for b in order for r in shard.parts[b][0]]
                all_feats = [[shard.parts[b][1][e] for b in order] for e in range(len(specs))]
                results[i] = write_result(tasks[i], shard.digest, all_rows, all_feats, shard.counts,
                                          time.perf_counter() - shard.started)
        if shards:
            raise RuntimeError(f"Ray Data stream ended with {len(shards)} shard(s) incomplete")
    return [results[i] for i in range(len(tasks))]
