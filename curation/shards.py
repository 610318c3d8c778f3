"""Writing the curated set: transfer crops re-materialised from the gallery, and the query images.

Crops are never stored by the index; each is re-created from its recipe (index.crops.materialize),
its original read by the byte range recorded at index time (index.ranged: no gallery shard is scanned;
the bytes read are counted in ``gindex.read_stats``). Output order is (gallery shard in index order, curated rank), so the
writer streams and the same inputs give byte-identical shards (fixed tar mtimes, deterministic JPEG).
Each tar is written under a temporary name and renamed (webdataset's ShardWriter writes straight to
the final name, so a killed job could leave a truncated shard that looks complete). Every sample of a
kind has the same members and a JSON of one Arrow type (index.core.contract, CURATED_FORMAT), and the
writer counts each tar's samples (`AtomicShardWriter.shardlist`: what wids and the manifest take).
"""
from __future__ import annotations

import io
import itertools
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import webdataset as wds
from PIL import Image

from index.core import contract
from index.core.atomic import atomic_path
from index.core.images import to_rgb
from index.core.outdir import pattern_regex
from index.crops import CropRecipe, materialize
from index.ranged import read_by_id
from index.skips import SkipCounts


@dataclass
class WriteResult:
    written: int = 0
    unreadable: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    shardlist: list[dict] = field(default_factory=list)   # [{"url": file name, "nsamples"}]


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    to_rgb(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class AtomicShardWriter:
    """Like webdataset's ShardWriter (maxcount per tar, pattern names) but each tar is committed by
    rename when complete, and tar headers carry a fixed mtime so reruns are byte-identical."""

    def __init__(self, out: Path, pattern: str, maxcount: int):
        self.out, self.pattern, self.maxcount = out, pattern, maxcount
        self.files: list[str] = []
        self.counts: list[int] = []     # samples in each of `files`
        self._ctx = self._tar = self._fh = None

    def _open(self):
        name = self.pattern % len(self.files)
        self._ctx = atomic_path(self.out / name)
        tmp = self._ctx.__enter__()
        self._fh = open(tmp, "wb")
        self._tar = wds.TarWriter(self._fh, mtime=0.0)
        self.files.append(name)
        self.counts.append(0)

    def _close(self):
        if self._tar is not None:
            self._tar.close()
            self._fh.close()
            self._ctx.__exit__(None, None, None)
            self._tar = None

    def write(self, sample: dict) -> None:
        if self._tar is None or self.counts[-1] >= self.maxcount:
            self._close()
            self._open()
        self._tar.write(sample)
        self.counts[-1] += 1

    def close(self) -> list[str]:
        self._close()
        return self.files

    def shardlist(self) -> list[dict]:
        """[{"url": file name (relative to the output directory), "nsamples"}] per tar written, the
        entries of a wids shard list."""
        return [{"url": f, "nsamples": n} for f, n in zip(self.files, self.counts)]


def remove_stale(out: Path, pattern: str, keep: list[str]) -> None:
    """Remove every shard named by `pattern` (``transfer-%06d.tar``) in `out` that is not in `keep`
    (the shards just written). Only names the writer gives are touched (``transfer-000003.tar``,
    never ``transfer-my-set.tar``)."""
    regex = pattern_regex(pattern)
    for p in out.iterdir():
        if re.fullmatch(regex, p.name) and p.name not in keep:
            p.unlink()


def materialized_crops(gindex, records: Iterable[contract.TransferRecord], counts: SkipCounts,
                       with_originals: bool = False, unreadable: dict[str, str] | None = None) -> Iterator[tuple]:
    """(record, crop) in `write_order`; crop None where the original could not be read (its id and
    reason go into `unreadable`). With ``with_originals``: (record, crop, original), the decoded
    original the crop was cut from."""
    ordered = write_order(gindex, records)
    for _, group in itertools.groupby(ordered, key=lambda r: contract.split_image_id(r.source_id)[0]):
        recs = list(group)   # one shard's originals in memory at a time
        got = read_by_id(gindex, {r.source_id for r in recs}, counts)
        images = got.images
        if unreadable is not None:
            unreadable.update(got.unreadable)
        for r in recs:
            im = images.get(r.source_id)
            crop = None if im is None else materialize(im, CropRecipe.from_dict(r.recipe))
            yield (r, crop, im) if with_originals else (r, crop)


def write_order(gindex, records: Iterable[contract.TransferRecord]) -> list[contract.TransferRecord]:
    """(gallery shard in index order, curated rank): each shard's images are read together."""
    by_shard: dict[str, list[contract.TransferRecord]] = defaultdict(list)
    for r in records:
        by_shard[contract.split_image_id(r.source_id)[0]].append(r)
    return [r for s in gindex.shards if s["name"] in by_shard for r in sorted(by_shard[s["name"]], key=lambda r: r.rank)]


def write_transfer_shards(out: Path, gindex, records: list[contract.TransferRecord], shard_size: int,
                          quality: int = 95) -> WriteResult:
    res = WriteResult()
    counts = SkipCounts()
    writer = AtomicShardWriter(out, contract.TRANSFER_PATTERN, shard_size)
    for rec, crop in materialized_crops(gindex, records, counts):
        if crop is None:
            res.unreadable += 1
            continue
        writer.write({"__key__": rec.key, "jpg": jpeg_bytes(crop, quality),
                      "json": json.dumps(rec.to_dict(), sort_keys=True).encode()})
        res.written += 1
    res.files = writer.close()
    res.shardlist = writer.shardlist()
    res.skipped = counts.to_dict()
    remove_stale(out, contract.TRANSFER_PATTERN, res.files)
    return res


def write_query_shards(out: Path, qs, shard_size: int = 1000) -> list[dict]:
    """The labelled query images as ``queries-*.tar``; returns their shard list (`AtomicShardWriter.shardlist`)."""
    writer = AtomicShardWriter(out, contract.QUERIES_PATTERN, shard_size)
    for i, q in enumerate(qs.queries):
        label = int(q.label)
        if not 0 <= label < len(qs.classes):
            raise ValueError(f"query {q.id!r} has label {q.label!r}, not one of the {len(qs.classes)} classes")
        meta = dict(zip(contract.QUERY_JSON_FIELDS, (q.id, label, qs.classes[label])))
        writer.write({"__key__": f"q{i:06d}", "png": _png(q.load()), "cls": str(label).encode(),
                      "json": json.dumps(meta, sort_keys=True).encode()})
    files = writer.close()
    remove_stale(out, contract.QUERIES_PATTERN, files)
    return writer.shardlist()


def read_originals(gindex, ids: Iterable[str]) -> dict[str, Image.Image]:
    """Original gallery images by id, each read by its byte range; unreadable ids are absent."""
    return read_by_id(gindex, ids, SkipCounts()).images
