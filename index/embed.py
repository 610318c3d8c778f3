"""The embedding stage's unit of work: one gallery shard -> one embedding shard.

`embed_shard(task)` reads the shard's images, cuts each into its crops (recipes are a pure function of
(image id, crop index, seed)), embeds every crop with every encoder (batched, no_grad, CUDA when
present) and writes float16 L2-normalised matrices + the row table (each row with its image's location
in the gallery shard, contract.ROW_LOC_FIELDS), then the done record last.
A rerun skips shards whose done record matches the task's fingerprint and refuses a mismatch.

Workers receive `EmbedTask`s (plain data) and build their encoders once (`Embedder`), so the same
function runs in-process and in Ray actors.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from index import contract, store
from index.errors import ConfigError
from index.atomic import CODE_VERSION, file_digest, fingerprint, tree_digest
from index.crops import CropConfig, materialize, recipes_for
from index.encoders import Encoder, EncoderSpec, build_encoder
from index.gallery import ShardRef, SkipCounts, iter_images


@dataclass(frozen=True)
class EmbedTask:
    shard: ShardRef
    out_dir: str
    encoders: tuple[EncoderSpec, ...]
    crops: CropConfig
    seed: int = 0
    batch_size: int = 64

    def fingerprint(self) -> str:
        return fingerprint({
            "shard": self.shard.name, "input": shard_digest(self.shard),
            "encoders": [e.identity() for e in self.encoders],
            "crops": self.crops.to_dict(), "seed": self.seed, "rows_format": contract.ROWS_FORMAT,
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


def shard_digest(shard: ShardRef) -> str:
    p = Path(shard.path)
    if p.is_dir():
        files = p.rglob("*") if shard.recursive else p.glob("*")
        return tree_digest(p, [f for f in files if f.is_file()])
    return file_digest(p)


def pick_device(device: str | None = None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: str | None) -> str:
    """`device` if this machine has it (None: the default); refused with the choices otherwise."""
    name = pick_device(device)
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; valid choices: cpu, cuda, cuda:N (or leave it unset)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available here; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def crops_of_shard(task: EmbedTask, counts: SkipCounts) -> Iterator[tuple[store.Row, np.ndarray]]:
    """(row, crop pixels uint8 HxWx3) for every crop of every readable image of the shard."""
    for img in iter_images(task.shard, counts):
        for i, recipe in enumerate(recipes_for(img.id, img.image.size, task.seed, task.crops)):
            yield store.Row(img.id, i, recipe.to_dict(), img.loc), np.asarray(materialize(img.image, recipe))


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


def prepare(pixels: torch.Tensor, spec: EncoderSpec) -> torch.Tensor:
    """uint8 [B,H,W,3] crops -> the encoder's normalised input [B,3,S,S] (on the crops' device)."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != spec.image_size or x.shape[-2] != spec.image_size:
        x = F.interpolate(x, size=(spec.image_size, spec.image_size), mode="bilinear",
                          antialias=True, align_corners=False)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode(models: list[Encoder], pixels: np.ndarray, device: str) -> list[np.ndarray]:
    """L2-normalised float16 features of a batch of crops, one matrix per encoder."""
    t = torch.from_numpy(pixels).to(device, non_blocking=True)
    out = []
    for m in models:
        with torch.autocast("cuda", enabled=device.startswith("cuda")):
            f = m(prepare(t, m.spec))
        out.append(F.normalize(f.float(), dim=-1).cpu().numpy().astype(np.float16))
    return out


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
    """

    def __init__(self, encoders: tuple[EncoderSpec, ...], device: str | None = None,
                 prefetch: bool | None = None):
        self.device = pick_device(device)
        self.models = [build_encoder(s, self.device) for s in encoders]
        self.prefetch = core_free_for_decode(self.device) if prefetch is None else prefetch

    def __call__(self, task: EmbedTask) -> ShardResult:
        return embed_shard(task, self)


def embed_shard(task: EmbedTask, embedder: Embedder | None = None) -> ShardResult:
    fp = task.fingerprint()
    record = store.done_record(task.out_dir, task.shard.name, fp)
    if record is not None:
        return ShardResult(**{**record["result"], "reused": True})
    embedder = embedder or Embedder(task.encoders)
    t0 = time.perf_counter()
    counts = SkipCounts()
    rows: list[store.Row] = []
    feats: list[list[np.ndarray]] = [[] for _ in task.encoders]
    batches = _batches(crops_of_shard(task, counts), task.batch_size)
    for batch_rows, pixels in (_prefetch(batches) if embedder.prefetch else batches):
        rows.extend(batch_rows)
        for acc, f in zip(feats, encode(embedder.models, pixels, embedder.device)):
            acc.append(f)
    features = {
        spec.name: (np.concatenate(acc) if acc else np.zeros((0, spec.embed_dim), np.float16))
        for spec, acc in zip(task.encoders, feats)
    }
    num_images = len({r.id for r in rows})
    result = ShardResult(shard=task.shard.name, num_images=num_images, num_vectors=len(rows),
                         skipped=counts.to_dict(), seconds=round(time.perf_counter() - t0, 3),
                         fingerprint=fp)
    store.write_shard(task.out_dir, task.shard.name, features, rows, {
        "fingerprint": fp, "code_version": CODE_VERSION, "result": result.to_dict(),
        "encoders": [e.to_dict() for e in task.encoders], "crops": task.crops.to_dict(),
        "seed": task.seed, "source": str(Path(task.shard.path)), "rows_format": contract.ROWS_FORMAT,
    })
    return result


@torch.no_grad()
def embed_images(models: list[Encoder], images: list, batch_size: int = 64) -> list[np.ndarray]:
    """Whole images (resize + centre crop, each encoder's own preprocessing) -> one L2-normalised
    float32 matrix per encoder. This is how queries, references and original images are embedded."""
    from index.encoders import image_transform

    out = []
    for m in models:
        tf = image_transform(m.spec)
        device = next(m.parameters()).device
        parts = [np.zeros((0, m.spec.embed_dim), np.float32)]
        for a in range(0, len(images), batch_size):
            x = torch.stack([tf(im) for im in images[a:a + batch_size]]).to(device)
            with torch.autocast("cuda", enabled=device.type == "cuda"):
                f = m(x)
            parts.append(F.normalize(f.float(), dim=-1).cpu().numpy())
        out.append(np.concatenate(parts))
    return out
