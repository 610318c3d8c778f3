"""Random access to gallery images by the location recorded at index time (contract.ROW_LOC_FIELDS).

A curated set needs N images out of a gallery of ~140k shards; reading them by scanning their shards
(`index.gallery.read_images`) reads most of the gallery. Here each image costs one range read of its
tar member (the 512-byte header block before it, checked, then exactly its bytes) and of its ``.json``
member when the sample has one (the index-time reader skips a sample whose json is not an object,
'bad_meta', so the same check runs here); adjacent members come in one read. In a folder gallery it
is one read of the image file (and of its json). The bytes
go through the very same `index.core.images.decode_image`, with the same skip reasons as `iter_images`; a
location that no longer matches the gallery is the counted reason 'stale_location', never a crash.

`read_located` reads a batch sorted by (file, offset), each file opened once, so reads within a shard
are sequential. `read_by_id` resolves ids through a `GalleryIndex` (its remembered row locations) and
falls back to scanning only for an index built before locations were recorded. `ReadStats` counts the
bytes and files read, for the "bytes read from gallery files" figure.

Local paths only. An object store plugs in at `_RangeFile` and nowhere else: with an fsspec filesystem
``fs`` (``fsspec.core.url_to_fs(path)``), ``open`` becomes ``fs.open(path, "rb")`` (a seekable file:
the same ``seek``/``read`` below, one ranged GET per read with ``block_size=0``/``cache_type="none"``)
or, statelessly, ``read(start, n)`` becomes ``fs.cat_file(path, start, start + n)``; ``size`` becomes
``fs.size(path)``. For many small members ``fs.cat_ranges(paths, starts, ends)`` batches the requests.

Why one module: tar members and folder files are read by one path (open, range read, header or
size check, `decode_image`, the same skip reasons, ReadStats), and the object-store seam is the one
class `_RangeFile`; splitting by gallery kind would duplicate that path.
"""
from __future__ import annotations

import logging
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterable

from PIL import Image

from index import content
from index.core.contract import IMAGE_EXTS, image_id, split_image_id
from index.core.images import DEFAULT_MAX_PIXELS, decode_image
from index.gallery import ShardRef, meta_of, read_gallery_images
from index.skips import SkipCounts

log = logging.getLogger(__name__)

STALE = "stale_location"
CHANGED = "changed"
CHANGED_REASONS = (CHANGED, STALE)   # the gallery no longer holds what was indexed there
_warned_scan = False
_warned_unhashed = False


@dataclass
class ReadStats:
    """What reads by location cost: bytes read from gallery files, files opened, range reads issued."""
    bytes: int = 0
    files: int = 0
    reads: int = 0
    scanned_files: int = 0   # shards read whole by the fallback scan (old indexes); their size is in bytes
    by_file: dict[str, int] = field(default_factory=dict)   # path -> bytes read from it

    def add(self, path: str, n: int) -> None:
        self.bytes += n
        self.by_file[path] = self.by_file.get(path, 0) + n

    def merge(self, other: "ReadStats") -> "ReadStats":
        """Add another reader's counts (its `by_file` may be empty: a worker sends `to_dict()`)."""
        self.bytes += other.bytes
        self.files += other.files
        self.reads += other.reads
        self.scanned_files += other.scanned_files
        for path, n in other.by_file.items():
            self.by_file[path] = self.by_file.get(path, 0) + n
        return self

    def to_dict(self) -> dict[str, int]:
        return {"bytes": self.bytes, "files": self.files, "reads": self.reads,
                "scanned_files": self.scanned_files}


@dataclass
class ReadResult:
    images: dict[str, Image.Image] = field(default_factory=dict)   # image id -> RGB image
    unreadable: dict[str, str] = field(default_factory=dict)       # image id -> skip reason


class _RangeFile:
    """One gallery file opened for range reads; counts what it reads. The object-store plug point
    (module docstring): replace `open`, `os.fstat` and `seek`/`read` with the fsspec calls."""

    def __init__(self, path: str, stats: ReadStats):
        self.path, self.stats = path, stats
        self._f: BinaryIO = content.open_regular(path)   # never a FIFO or device swapped in
        stats.files += 1
        self.size = os.fstat(self._f.fileno()).st_size

    def read(self, start: int, n: int) -> bytes | None:
        """Exactly n bytes from start, or None if the file is shorter (a stale location)."""
        if start < 0 or n < 0 or start + n > self.size:
            return None
        self._f.seek(start)
        data = self._f.read(n)
        self.stats.reads += 1
        self.stats.add(self.path, len(data))
        return data if len(data) == n else None

    def close(self) -> None:
        self._f.close()


def _header_matches(block: bytes, name: str, size: int) -> bool:
    """Whether a tar header block describes the regular member `name` (case-insensitively: suffixes
    are recorded lower case) of `size` bytes. Names longer than the 100-byte header field are stored in
    a pax/GNU header before it; the field then holds a prefix of the name."""
    try:
        info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    got, want = info.name.lower(), name.lower()
    if not info.isreg() or info.size != size:
        return False
    return got == want or (len(info.name.encode(tarfile.ENCODING, "surrogateescape")) >= 99
                           and want.startswith(got))


def _tar_members(f: _RangeFile, spans: list[tuple[Any, Any, str]]) -> list[bytes | None]:
    """The data of tar members given as (data offset, size, name), each checked against its header
    block; None for a member whose location is stale. Members whose header+data spans lie within one
    block of each other (a sample's image and json, as img2dataset writes them) are read in one range
    read, which on an object store is one request instead of two; the padding between them is read too."""
    out: list[bytes | None] = [None] * len(spans)
    ok = [i for i, (o, n, _) in enumerate(spans) if isinstance(o, int) and isinstance(n, int)
          and o >= tarfile.BLOCKSIZE and n >= 0]
    ok.sort(key=lambda i: spans[i][0])
    runs: list[list[int]] = []
    for i in ok:
        start = spans[i][0] - tarfile.BLOCKSIZE
        if runs and start >= _end(spans[runs[-1][-1]]) and start - _end(spans[runs[-1][-1]]) < tarfile.BLOCKSIZE:
            runs[-1].append(i)
        else:
            runs.append([i])
    for run in runs:
        start = spans[run[0]][0] - tarfile.BLOCKSIZE
        block = f.read(start, _end(spans[run[-1]]) - start)
        if block is None:
            continue
        for i in run:
            offset, size, name = spans[i]
            header = block[offset - tarfile.BLOCKSIZE - start: offset - start]
            if _header_matches(header, name, size):
                out[i] = block[offset - start: offset - start + size]
    return out


def _end(span: tuple[int, int, str]) -> int:
    return span[0] + span[1]


def _folder_file(root: str, rel: Any, stats: ReadStats, size: int | None = None) -> bytes | None:
    """The file's bytes; None if the location leaves the shard folder, the file is gone or not regular,
    or (`size` given, no content hash to decide by) its size differs from the recorded one."""
    if not isinstance(rel, str) or posixpath.isabs(rel) or posixpath.normpath(rel).startswith(".."):
        return None  # a location never leaves its shard folder
    try:
        f = _RangeFile(os.path.join(root, *rel.split("/")), stats)
    except OSError:
        return None
    try:
        if size is not None and f.size != size:
            return None
        return f.read(0, f.size)
    finally:
        f.close()


def _decode(data: bytes | None, meta: bytes | None, has_meta: bool, max_pixels: int,
            min_side: int, expected: str | None = None) -> tuple[Image.Image | None, str | None]:
    """The same checks in the same order as the index-time reader: meta, then the image; with the
    content hash recorded at index time (`expected`), bytes that differ are 'changed'."""
    if has_meta:
        if meta is None:
            return None, STALE
        if meta_of(meta) is None:
            return None, "bad_meta"
    if data is None:
        return None, STALE
    if expected is not None and content.image_hash(data) != expected:
        return None, CHANGED
    image, reason = decode_image(data, max_pixels=max_pixels, min_side=min_side)
    return image, None if image is not None else (reason or "corrupt")


def _sort_key(item: tuple[str, ShardRef, dict[str, Any]]) -> tuple[str, int, str]:
    _, shard, loc = item
    off = loc.get("offset")
    return shard.path, off if isinstance(off, int) else 0, str(loc.get("file", ""))


def read_located(items: Iterable[tuple[str, ShardRef, dict[str, Any]]], counts: SkipCounts | None = None,
                 stats: ReadStats | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int = 0, hashes: dict[str, str | None] | None = None) -> ReadResult:
    """Read (image id, shard, loc) items by their recorded locations, sorted by (file, offset) so each
    tar is opened once and read forward. Unreadable items are counted in `counts` under their reason
    and listed in the result; a malformed or stale location is 'stale_location'. `hashes` (image id ->
    the content hash its index row records) makes an image whose bytes differ 'changed'; a folder
    file whose size changed is then read and 'changed' too."""
    hashes = hashes or {}
    counts = SkipCounts() if counts is None else counts
    stats = ReadStats() if stats is None else stats
    out = ReadResult()
    current: _RangeFile | None = None
    try:
        for iid, shard, loc in sorted(items, key=_sort_key):
            key = split_image_id(iid)[1]
            ext = loc.get("ext")
            if ext not in IMAGE_EXTS:
                image, reason = None, STALE
            elif shard.kind == "tar":
                if current is None or current.path != shard.path:
                    if current is not None:
                        current.close()
                        current = None
                    try:
                        current = _RangeFile(shard.path, stats)
                    except OSError:
                        pass
                if current is None:
                    image, reason = None, STALE
                else:
                    spans = [(loc.get("offset"), loc.get("size"), f"{key}.{ext}")]
                    j = loc.get("json")
                    if "json" in loc:
                        spans.append((j[0], j[1], f"{key}.json") if isinstance(j, list) and len(j) == 2
                                     else (None, None, ""))
                    data, *meta = _tar_members(current, spans)
                    image, reason = _decode(data, meta[0] if meta else None, "json" in loc, max_pixels,
                                            min_side, hashes.get(iid))
            elif shard.kind == "folder":
                meta = _folder_file(shard.path, loc["json"], stats) if "json" in loc else None
                size = None if hashes.get(iid) else loc.get("size")   # the hash decides where there is one
                data = _folder_file(shard.path, loc.get("file"), stats, size) \
                    if "json" not in loc or meta is not None else None
                image, reason = _decode(data, meta, "json" in loc, max_pixels, min_side, hashes.get(iid))
            else:
                raise ValueError(f"unknown shard kind {shard.kind!r}; valid choices: tar, folder")
            if image is None:
                counts.add(reason or "corrupt")
                out.unreadable[iid] = reason or "corrupt"
            else:
                out.images[iid] = image
    finally:
        if current is not None:
            current.close()
    return out


def read_one(iid: str, shard: ShardRef, loc: dict[str, Any], counts: SkipCounts | None = None,
             stats: ReadStats | None = None, **limits: int) -> Image.Image | None:
    """One image by its location; None (counted) if unreadable."""
    return read_located([(iid, shard, loc)], counts, stats, **limits).images.get(iid)


def read_by_id(gindex, ids: Iterable[str], counts: SkipCounts | None = None,
               stats: ReadStats | None = None, **limits: int) -> ReadResult:
    """Gallery images by id through `gindex` (a GalleryIndex: `locations`, `shard_ref`, `read_stats`).

    Ids with a recorded location are read by range; ids the index holds without one (an index built
    before locations were recorded, or a compressed tar) are read by scanning their shard once, with a
    warning the first time; ids the index does not hold are 'missing'. Bytes read are added to `stats`
    (default: ``gindex.read_stats``), a scanned shard counting its whole size. Every image whose row
    records a content hash (``gindex.hashes``) is checked against it: other bytes are 'changed'.
    """
    global _warned_scan, _warned_unhashed
    counts = SkipCounts() if counts is None else counts
    stats = getattr(gindex, "read_stats", None) if stats is None else stats
    stats = ReadStats() if stats is None else stats
    wanted = sorted(set(map(str, ids)))
    locs = gindex.locations(wanted)
    hashes = gindex.hashes(wanted) if hasattr(gindex, "hashes") else None
    if hashes is None:
        hashes = {}
    elif not _warned_unhashed and any(hashes.get(i) is None for i in locs):
        _warned_unhashed = True
        log.warning("%s: its rows record no content hash (an index built before they were); a gallery image "
                    "replaced since indexing cannot be noticed. Rebuild the index to have them checked.",
                    getattr(gindex, "root", "index"))
    located, scan = [], {}
    out = ReadResult()
    for iid in wanted:
        if iid not in locs:
            counts.add("missing")
            out.unreadable[iid] = "missing"
            continue
        shard, key = split_image_id(iid)
        if locs[iid] is None:
            scan.setdefault(shard, set()).add(key)
        else:
            located.append((iid, gindex.shard_ref(shard), locs[iid]))
    got = read_located(located, counts, stats, hashes=hashes, **limits)
    out.images.update(got.images)
    out.unreadable.update(got.unreadable)
    if scan and not _warned_scan:
        _warned_scan = True
        log.warning("%s: no byte ranges recorded for %d image(s) in %d shard(s) (an index built before "
                    "locations were recorded, or a compressed tar?); reading them by scanning their shards. Rebuild "
                    "the index to read by range.", getattr(gindex, "root", "index"), sum(map(len, scan.values())),
                    len(scan))
    for shard, keys in sorted(scan.items()):
        ref = gindex.shard_ref(shard)
        shard_counts = SkipCounts()
        images = {}
        for key, item in read_gallery_images(ref, keys, shard_counts, **limits).items():
            expected = hashes.get(image_id(shard, key))
            if expected is not None and item.hash != expected:
                shard_counts.add(CHANGED)
                out.unreadable[image_id(shard, key)] = CHANGED
            else:
                images[key] = item.image
        counts.merge(shard_counts)
        stats.scanned_files += 1
        stats.files += 1
        stats.add(ref.path, _tree_size(ref))
        reason = ",".join(sorted(shard_counts.to_dict())) or "unreadable"
        for key in sorted(keys):
            if key in images:
                out.images[image_id(shard, key)] = images[key]
            else:
                out.unreadable.setdefault(image_id(shard, key), reason)
    return out


def _tree_size(shard: ShardRef) -> int:
    if shard.kind == "tar":
        return os.path.getsize(shard.path) if os.path.isfile(shard.path) else 0
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(shard.path) for n in names)
