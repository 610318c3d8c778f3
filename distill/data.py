"""Data for distillation: transfer shards (streamed), labelled query shards, and the test split.

Every pipeline yields dict batches {"image": float [B, 3, R, R] in [0, 1], "key": [str], ...}; images
are NOT normalised (each model's InputAdapter does it). Data order is a pure function of
(seed, epoch): shard order and shuffle buffer use an RNG seeded by them, and each sample's
augmentation uses an RNG seeded by (seed, epoch, key), so a resumed run skips to the exact batch and
the result does not depend on how many threads decode. With `world > 1` (data-parallel), every rank
reads the same shuffled stream and keeps samples i with i % world == rank, truncated to
n // world samples so all ranks take the same number of steps; the remainder is counted.

Why one module: the three sources (transfer shards, labelled query shards, the test split) obey
one batch format and one determinism rule (order a pure function of (seed, epoch), per-sample
augmentation seeded by (seed, epoch, key), rank sharding with equal step counts), and the
transforms take that per-sample RNG; split by source, each would restate the rule.
"""
from __future__ import annotations

import json
import math
import random
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from index.core.atomic import fingerprint
from index.core.contract import QUERIES_DRAW_FILE, QUERIES_PATTERN, TRANSFER_PATTERN
from index.core.errors import InputError, MissingInputError
from index.core.images import decode_image, to_rgb

Batch = dict[str, Any]
Lookup = Callable[[list[str]], dict[str, torch.Tensor]]
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


# ------------------------------------------------------------------ transforms (pure, seeded)

def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The RNG of one sample's augmentation (str seeds hash with sha512: stable across processes)."""
    return random.Random(f"{seed}:{epoch}:{key}")


def to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def eval_transform(img: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution` (bicubic), centre crop a square."""
    img = to_rgb(img)
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return to_tensor(img.crop((left, top, left + resolution, top + resolution)))


EVAL_TRANSFORM_ID = "resize-shorter-bicubic+center-crop"


def random_resized_crop_box(w: int, h: int, rng: random.Random, scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with an explicit RNG: (left, top, width, height)."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def train_transform(img: Image.Image, resolution: int, rng: random.Random) -> torch.Tensor:
    """RandomResizedCrop (bicubic) + horizontal flip, driven by `rng`."""
    img = to_rgb(img)
    left, top, cw, ch = random_resized_crop_box(img.width, img.height, rng)
    img = img.resize((resolution, resolution), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(img)


def make_image(img: Image.Image, resolution: int, augment: bool, seed: int, epoch: int, key: str) -> torch.Tensor:
    return train_transform(img, resolution, sample_rng(seed, epoch, key)) if augment else eval_transform(img, resolution)


# ------------------------------------------------------------------ batching

def num_batches(n: int, batch_size: int) -> int:
    """Batches of `batch_size`; a last batch of one sample joins the one before (BatchNorm needs 2)."""
    if n <= 0:
        return 0
    full, rest = divmod(n, batch_size)
    if full == 0:
        return 1
    return full + (1 if rest >= 2 else 0)


def rank_count(n: int, world: int) -> int:
    return n if world == 1 else n // world


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    return num_batches(rank_count(n, world), batch_size)


def _batches_of(items: Iterable[Any], batch_size: int) -> Iterator[list[Any]]:
    """Chunks of batch_size; a final chunk of one item joins the previous chunk."""
    held: list[Any] | None = None
    cur: list[Any] = []
    for it in items:
        cur.append(it)
        if len(cur) == batch_size:
            if held is not None:
                yield held
            held, cur = cur, []
    if held is not None:
        if len(cur) == 1:
            held = held + cur
            cur = []
        yield held
    if cur:
        yield cur


def _collate(samples: list[tuple[str, torch.Tensor, int | None]], lookup: Lookup | None) -> Batch:
    keys = [k for k, _, _ in samples]
    batch: Batch = {"key": keys, "image": torch.stack([x for _, x, _ in samples])}
    labels = [y for _, _, y in samples]
    if all(y is not None for y in labels):
        batch["label"] = torch.tensor(labels, dtype=torch.long)
    if lookup is not None:
        batch.update(lookup(keys))
    return batch


# ------------------------------------------------------------------ curated directory

def shard_paths(curated: str | Path, pattern: str) -> list[str]:
    root = Path(curated)
    glob = pattern.split("%")[0] + "*.tar"
    return sorted(str(p) for p in root.glob(glob))


def transfer_shards(curated: str | Path) -> list[str]:
    return shard_paths(curated, TRANSFER_PATTERN)


def _tar_keys(path: str) -> list[str]:
    """Sample keys of a WebDataset tar from its member headers (no image data is read)."""
    keys: list[str] = []
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            d, _, base = m.name.rpartition("/")
            key = (d + "/" if d else "") + base.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


@dataclass(frozen=True)
class ShardSet:
    """A list of shards with their sample keys: counts for step planning, identity for cache fingerprints."""
    shards: tuple[str, ...]
    keys: tuple[tuple[str, ...], ...]

    @classmethod
    def scan(cls, shards: Sequence[str]) -> "ShardSet":
        return cls(tuple(shards), tuple(tuple(_tar_keys(s)) for s in shards))

    @property
    def count(self) -> int:
        return sum(len(k) for k in self.keys)

    def all_keys(self) -> list[str]:
        return [k for ks in self.keys for k in ks]

    def manifest(self) -> dict[str, Any]:
        return {"shards": [{"name": Path(s).name, "bytes": Path(s).stat().st_size, "count": len(k)}
                           for s, k in zip(self.shards, self.keys)],
                "keys": fingerprint(self.all_keys()), "count": self.count}


def _decode(sample: dict[str, Any], skipped: Counter) -> tuple[str, Image.Image] | None:
    key = sample["__key__"]
    field_ = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field_ is None:
        skipped["no_image"] += 1
        return None
    img, _ = decode_image(sample[field_])
    if img is not None:
        return key, img
    skipped["decode_error"] += 1  # a corrupt image is counted, never silently dropped
    return None


def transfer_batches(shards: Sequence[str], n: int, *, seed: int, epoch: int, batch_size: int, resolution: int,
                     augment: bool, shuffle: bool = True, shuffle_buffer: int = 1000, rank: int = 0, world: int = 1, skip: int = 0,
                     lookup: Lookup | None = None, labels: Callable[[str], int] | None = None,
                     decode_threads: int = 0, skipped: Counter | None = None) -> Iterator[Batch]:
    """One epoch over the transfer shards; `n` is their sample count (ShardSet.count), `skip` batches
    already done this epoch are passed over before decoding."""
    skipped = skipped if skipped is not None else Counter()
    order = list(shards)
    stages: list[Any] = [wds.tarfile_to_samples(handler=wds.reraise_exception)]
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100),
                                  rng=random.Random(f"buf:{seed}:{epoch}")))
    stream: Iterable[dict[str, Any]] = wds.DataPipeline(wds.SimpleShardList(order), *stages)
    per_rank = rank_count(n, world)

    def mine() -> Iterator[dict[str, Any]]:
        kept = 0
        for i, sample in enumerate(stream):
            if world > 1 and i % world != rank:
                continue
            if kept >= per_rank:
                skipped["ddp_remainder"] += 1
                continue
            kept += 1
            if kept <= skip * batch_size:
                continue
            yield sample

    def prepare(sample: dict[str, Any]) -> tuple[str, torch.Tensor, int | None] | None:
        dec = _decode(sample, skipped)
        if dec is None:
            return None
        key, img = dec
        return key, make_image(img, resolution, augment, seed, epoch, key), labels(key) if labels else None

    yield from _prepared_batches(mine(), prepare, batch_size, lookup, decode_threads)


def _prepared_batches(raw: Iterator[Any], prepare: Callable[[Any], Any], batch_size: int,
                      lookup: Lookup | None, threads: int) -> Iterator[Batch]:
    pool = ThreadPoolExecutor(threads) if threads > 0 else None
    try:
        def chunks() -> Iterator[list[Any]]:
            buf: list[Any] = []
            for item in raw:
                buf.append(item)
                if len(buf) == batch_size:
                    yield buf
                    buf = []
            if buf:
                yield buf

        def prepared() -> Iterator[tuple[str, torch.Tensor, int | None]]:
            for chunk in chunks():
                done = pool.map(prepare, chunk) if pool else map(prepare, chunk)
                yield from (d for d in done if d is not None)

        for group in _batches_of(prepared(), batch_size):
            yield _collate(group, lookup)
    finally:
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------ labelled query set

@dataclass
class LabelledSet:
    """The labelled query images of a curated directory, decoded once (they are few)."""
    keys: list[str]
    images: list[Image.Image]
    labels: list[int]
    classes: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.keys)


def load_labelled(curated: str | Path) -> LabelledSet:
    draw_path = Path(curated) / QUERIES_DRAW_FILE
    if not draw_path.exists():
        raise MissingInputError(f"{draw_path} is missing: is {curated} a curated directory (curate --out)?")
    draw = json.loads(draw_path.read_text())
    shards = shard_paths(curated, QUERIES_PATTERN)
    if not shards:
        raise MissingInputError(f"no {QUERIES_PATTERN.split('%')[0]}*.tar in {curated}")
    keys, images, labels = [], [], []
    skipped: Counter = Counter()
    for sample in wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=wds.reraise_exception)):
        dec = _decode(sample, skipped)
        if dec is None:
            continue
        if "cls" not in sample:
            raise InputError(f"query sample {sample['__key__']} in {sample.get('__url__')} has no .cls label")
        keys.append(dec[0])
        images.append(dec[1])
        labels.append(int(sample["cls"].decode().strip()))
    if skipped:
        raise InputError(f"unreadable labelled images in {curated}: {dict(skipped)}")
    if len(keys) != len(draw["queries"]):
        raise InputError(f"{curated}: {len(keys)} query samples in the shards but {len(draw['queries'])} "
                         f"in {QUERIES_DRAW_FILE}")
    n_cls = len(draw["classes"])
    bad = sorted({y for y in labels if not 0 <= y < n_cls})
    if bad:
        raise InputError(f"labels {bad} are outside the {n_cls} classes of {draw_path}")
    return LabelledSet(keys, images, labels, list(draw["classes"]), draw.get("name", ""))


def labelled_batches(ls: LabelledSet, *, seed: int, epoch: int, batch_size: int, resolution: int, augment: bool,
                     rank: int = 0, world: int = 1, skip: int = 0, lookup: Lookup | None = None,
                     shuffle: bool = True, decode_threads: int = 0) -> Iterator[Batch]:
    order = list(range(len(ls)))
    if shuffle:
        random.Random(f"labelled:{seed}:{epoch}").shuffle(order)
    if world > 1:
        order = order[rank::world][:rank_count(len(ls), world)]
    order = order[skip * batch_size:]

    def prepare(i: int) -> tuple[str, torch.Tensor, int]:
        return ls.keys[i], make_image(ls.images[i], resolution, augment, seed, epoch, ls.keys[i]), ls.labels[i]

    yield from _prepared_batches(iter(order), prepare, batch_size, lookup, decode_threads)


# ------------------------------------------------------------------ test split

def test_batches(items: Sequence[Any], resolution: int, batch_size: int) -> "EvalBatches":
    """Items with .label and .loader() -> PIL (curation.querysets); eval transform, in order."""
    return EvalBatches(items, resolution, batch_size)


class EvalBatches:
    """(images, labels) batches of a test split; ``len()`` is the number of images, so a progress
    bar over them has its total."""

    def __init__(self, items: Sequence[Any], resolution: int, batch_size: int):
        self.items, self.resolution, self.batch_size = items, resolution, batch_size

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.items), self.batch_size):
            chunk = self.items[start:start + self.batch_size]
            x = torch.stack([eval_transform(it.loader(), self.resolution) for it in chunk])
            yield x, torch.tensor([int(it.label) for it in chunk], dtype=torch.long)
