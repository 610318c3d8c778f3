"""What a gallery file holds: content hashes, taken while the bytes are read, and regular-file checks.

    image_hash(data)        blake2b-128 hex of an image's stored bytes (the row contract's "hash")
    HashingReader(f)        a read-only file wrapper that hashes every byte read through it; `hexdigest`
                            reads the rest of the file first, so the digest always covers the whole file
    TreeHasher()            digest of a folder shard: (relative path, content hash) of every gallery file,
                            and (relative path, skip reason) of every entry that is not a regular file
    file_kind(path)         None for a regular file (symlinks followed), else the skip reason
    open_regular(path)      open for reading only if it is a regular file, without ever blocking on a FIFO

A shard's input digest is a pure function of its bytes, so the indexing stage can hash a shard while
it reads it for embedding (no extra pass) and a rerun computes the same digest by reading it once.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import BinaryIO

HASH_BYTES = 16   # blake2b digest size of image hashes and shard digests (128 bits)

# the skip reasons of entries that are never opened (index.skips.SKIP_REASONS)
DANGLING_SYMLINK = "dangling_symlink"
NOT_REGULAR = "not_regular_file"


def _new():
    return hashlib.blake2b(digest_size=HASH_BYTES)


def image_hash(data: bytes) -> str:
    h = _new()
    h.update(data)
    return h.hexdigest()


class HashingReader:
    """Wraps a binary file opened at offset 0; `read` hashes what it returns. Sequential reads only
    (tarfile's stream mode reads that way); `seek` is refused so a digest never skips bytes."""

    def __init__(self, f: BinaryIO, chunk: int = 1 << 20):
        self._f, self._h, self._chunk = f, _new(), chunk

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._h.update(data)
        return data

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        """The digest of the whole file: what was read plus the rest, read now."""
        while block := self._f.read(self._chunk):
            self._h.update(block)
        return self._h.hexdigest()


def file_hash(f: BinaryIO) -> str:
    """The digest of a file object from its current position to its end (as HashingReader gives)."""
    return HashingReader(f).hexdigest()


class TreeHasher:
    """Digest of a folder shard's gallery files. Files are added as they are read (`add`); entries
    that are skipped unopened are added with their reason (`skip`), so one appearing or going changes
    the digest too."""

    def __init__(self):
        self._parts: dict[str, str] = {}

    def add(self, rel: str, data: bytes) -> None:
        self._parts[rel] = image_hash(data)

    def skip(self, rel: str, reason: str) -> None:
        self._parts[rel] = "skip:" + reason

    def __contains__(self, rel: str) -> bool:
        return rel in self._parts

    def hexdigest(self) -> str:
        h = _new()
        for rel in sorted(self._parts):
            h.update(f"{rel}\0{self._parts[rel]}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


def file_kind(path: str) -> str | None:
    """None if `path` is a regular file (after symlinks), else why it is skipped: a symlink whose
    target is missing, or a FIFO, device, socket or directory (directly or through a symlink)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return DANGLING_SYMLINK if os.path.islink(path) else NOT_REGULAR
    except OSError as e:   # a symlink loop, a permission error on the way: unreadable, not a crash
        return DANGLING_SYMLINK if e.errno == errno.ELOOP else NOT_REGULAR
    return None if stat.S_ISREG(st.st_mode) else NOT_REGULAR


def open_regular(path: str) -> BinaryIO:
    """Open `path` for reading; OSError unless it is a regular file. O_NONBLOCK makes opening a FIFO
    return at once (it is then refused by fstat), so a file swapped for a FIFO never hangs a read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"not a regular file: {path}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str) -> bytes:
    """The whole file; OSError unless it is a regular file that can be read."""
    with open_regular(path) as f:
        return f.read()
