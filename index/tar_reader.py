"""Tar shards read as webdataset reads them, with each member's data offset kept and every break counted.

    tar_samples(path, counts, select, on_digest)   -> (key, members, where) per sample, in archive order

Members are grouped by key exactly as webdataset's ``tar_file_iterator`` groups them (same member
filter, same name split, `tar_key`), but each member's data offset is kept so an image can later be
read back by byte range (``index.ranged``). The archive's integrity is checked (`_tar_problem`): a
truncated or corrupt tar, a compressed stream that does not end cleanly, a file that is not a tar at
all, an empty file; each break is counted once under its `index.skips` reason and reading stops
there, keeping the sample assembled before it only when it is known complete.
"""
from __future__ import annotations

import logging
import lzma
import os
import re
import tarfile
import zlib
from typing import Any, Callable, Iterator

from webdataset.tariterators import base_plus_ext

from index import content
from index.skips import SkipCounts

log = logging.getLogger(__name__)

# A raw sample: key, members suffix -> bytes (tar) or file path (folder, read on demand), and where
# each member lives: suffix -> (data offset, size) in a plain tar, suffix -> path relative to the shard
# folder; empty where members cannot be sought (a compressed tar stream).
Members = dict[str, "bytes | str"]
Where = dict[str, "tuple[int, int] | str"]

# webdataset's tar_file_iterator skips these member names (its skip_meta and meta_prefix/suffix)
_SKIP_META = re.compile(r"__[^/]*__($|/)")


def _tar_members(fileobj: Any, handler: Callable[[Exception], bool],
                 select_files: Callable[[str], bool]) -> Iterator[tuple[str, bytes, int | None]]:
    """(name, data, data offset) per regular member: webdataset.tariterators.tar_file_iterator with
    the member's data offset kept (TarInfo.offset_data; None in a compressed stream, where offsets are
    not file offsets). Same member filter, same error handling: `handler(exn)` True continues."""
    stream = tarfile.open(fileobj=fileobj, mode="r|*")
    seekable = getattr(stream.fileobj, "comptype", "tar") == "tar"
    for tarinfo in stream:
        fname = tarinfo.name
        try:
            if not tarinfo.isreg() or fname is None:
                continue
            if "/" not in fname and fname.startswith("__") and fname.endswith("__"):
                continue
            if _SKIP_META.match(fname):
                continue
            if not select_files(fname):
                continue
            data = stream.extractfile(tarinfo).read()
            yield fname, data, tarinfo.offset_data if seekable else None
            stream.members = []
        except Exception as exn:  # noqa: BLE001 - the handler decides, as in tar_file_iterator
            if handler(exn):
                continue
            break


def _zero_tail(f: Any, offset: int | None = None) -> bool:
    """Whether every byte from `offset` (None: the current position) to the end is zero."""
    if offset is not None:
        f.seek(offset)
    while block := f.read(1 << 20):
        if block.count(0) != len(block):
            return False
    return True


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")   # gzip, bz2, xz: tarfile's "r:*" reads them


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(tarfile.BLOCKSIZE)


def _first_block_problem(path: str) -> str | None:
    """'empty_tar' or 'not_a_tar' from the file's first block; None if it may be a tar."""
    head = _head(path)
    if not head:
        return "empty_tar"
    if head.startswith(_COMPRESSED_MAGIC) or head.count(0) == len(head):
        return None
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
        return None
    except tarfile.HeaderError:
        return None if head[257:262] == b"ustar" else "not_a_tar"   # a tar whose first header is damaged


def _tar_problem(path: str) -> str | None:
    """None if the archive is intact: every header valid and only zero blocks after the last member
    (for a compressed tar: the stream complete, its checksum right, and only zeros after the members)."""
    first = _first_block_problem(path)
    if first:
        return first
    compressed = _head(path).startswith(_COMPRESSED_MAGIC)
    size = os.path.getsize(path)
    if not compressed and size % tarfile.BLOCKSIZE:
        return "tar_truncated"
    try:
        with tarfile.open(path, "r:*" if compressed else "r:") as tf:
            while tf.next() is not None:
                tf.members = []
            end = tf.offset
            if compressed:   # reading the stream to its end checks its length and checksum
                return None if _zero_tail(tf.fileobj) else "tar_corrupt"
    except tarfile.ReadError as e:
        return "tar_truncated" if "unexpected end" in str(e) else "tar_corrupt"
    except EOFError:
        return "tar_truncated"
    except (tarfile.CompressionError, OSError, ValueError, zlib.error, lzma.LZMAError):
        return "tar_corrupt"   # a damaged compressed stream (bad data or checksum)
    if end + tarfile.BLOCKSIZE > size:
        return "tar_truncated"  # no end-of-archive block: cut on a member boundary
    with open(path, "rb") as f:
        return None if _zero_tail(f, end) else "tar_corrupt"


def tar_samples(path: str, counts: SkipCounts, select: Callable[[str], bool] | None,
                on_digest: Callable[[str], None] | None = None) -> Iterator[tuple[str, Members, Where]]:
    """Members grouped by key, as webdataset groups them. At a break in the archive the sample being
    assembled is yielded only if a member of a later sample had begun (wanted or not), so it is known
    complete. `on_digest` gets the digest of the whole file (content.HashingReader), hashed while read."""
    errors: list[Exception] = []
    announced: list[str] = []  # the last member _tar_members has looked at

    def stop(exn: Exception) -> bool:
        errors.append(exn)
        return False  # stop this archive; the break is counted below

    def select_files(fname: str) -> bool:
        announced[:] = [fname]
        return select is None or select(tar_key(fname)[0])

    key: str | None = None
    members: Members = {}
    where: Where = {}
    not_tar = _first_block_problem(path)
    if not_tar:
        log.warning("gallery shard %s: %s; nothing in it is read", path, not_tar)
        counts.add(not_tar)
        if on_digest is not None:
            with open(path, "rb") as f:
                on_digest(content.file_hash(f))
        return
    with open(path, "rb") as raw:
        f = raw if on_digest is None else content.HashingReader(raw)
        try:
            for fname, data, offset in _tar_members(f, handler=stop, select_files=select_files):
                prefix, suffix = tar_key(fname)
                if key is not None and (prefix != key or suffix in members):
                    yield key, members, where
                    members, where = {}, {}
                key = prefix
                members[suffix] = data
                if offset is not None:
                    where[suffix] = (offset, len(data))
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exn:  # raised reading a header
            errors.append(exn)
        if on_digest is not None:
            on_digest(f.hexdigest())
    reason = _tar_problem(path)
    if not (errors or reason):
        if key is not None:
            yield key, members, where
        return
    reason = reason or "tar_corrupt"
    log.warning("gallery shard %s: %s (%s); the sample at the break is dropped and reading stops",
                path, reason, errors[0] if errors else "archive ends without its end-of-archive block")
    if key is not None and announced and tar_key(announced[0])[0] != key:
        yield key, members, where  # a later sample's member had begun: the one assembled is complete
    counts.add(reason)


def tar_key(fname: str) -> tuple[str, str]:
    """(key, lower-case suffix) as webdataset splits names; a name without extension has suffix ''."""
    prefix, suffix = base_plus_ext(fname)
    if prefix is None:
        return fname, ""
    return prefix, suffix.lower()
