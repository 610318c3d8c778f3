"""Gallery readers: img2dataset WebDataset tars and plain image folders, with every skip counted.

A gallery is a list of shards (``list_shards``); a shard yields ``GalleryImage``s (``iter_images``)
whose id is ``contract.image_id(shard.name, key)``. Tar members are read in tarfile's stream mode
exactly as webdataset's ``tar_file_iterator`` reads them (same member filter, same grouping), but with
each member's data offset kept, so every image carries its location (``GalleryImage.loc``, the format
is ``contract.ROW_LOC_FIELDS``) and is later read back by byte range (``index.ranged``). Images are
decoded here with PIL and no error is swallowed: every entry that does not become an image is counted
in a ``SkipCounts`` under one of ``SKIP_REASONS``.

Shards
    ``x.tar``                a tar shard named ``x`` (the file stem, as the contract says).
    a folder holding tars    each ``*.tar`` directly inside it (img2dataset's output folder).
    any other folder         an image folder: each immediate subfolder that holds images (at any
                             depth) is a shard named after the subfolder; images directly in the
                             folder form a shard named after the folder itself. Entries whose name
                             starts with '.' are ignored. Key = path relative to the shard folder,
                             extension dropped, '/' and '.' replaced by '_'. A sibling ``stem.txt``
                             / ``stem.json`` is the caption / metadata, as in a tar.
Patterns may use ``*``/``**`` globs and ``{a,b}``/``{00000..00009}`` braces.

Samples and skip reasons
    A sample is a key's group of members (tar) or files (folder). Its image is the first of
    ``contract.IMAGE_EXTS`` it has (``jpg``, ``jpeg``, ``png``, ``webp``). Pixels are as stored:
    EXIF orientation is not applied, alpha is dropped by ``convert("RGB")``.

Why one module: both shard kinds feed one sample -> image path (`_samples`, `_to_image`,
`decode_image`) and one skip vocabulary (`SKIP_REASONS`, `SkipCounts`) that the other readers
(`index.ranged`, `index.device_decode`) reuse. Its largest part, the tar reader with its integrity
checks (truncated, corrupt, compressed, not a tar; about 150 lines), could be a module of its own.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import lzma
import os
import re
import tarfile
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import braceexpand
from PIL import Image, UnidentifiedImageError
from webdataset.tariterators import base_plus_ext

from index import content
from index.bitdepth import to_rgb8
from index.core.contract import IMAGE_EXTS, image_id
from index.core.errors import ConfigError, InputError, MissingInputError

log = logging.getLogger(__name__)

SKIP_REASONS: dict[str, str] = {
    "empty": "the image member/file has zero bytes",
    "truncated": "the image data ends early (PIL: 'image file is truncated', EOF)",
    "corrupt": "an image format was recognised but the data cannot be decoded "
               "(broken stream, bad CRC, unreadable header after a valid signature)",
    "not_image": "the sample has no jpg/jpeg/png/webp member, or its image bytes are not an image",
    "too_large": "width*height exceeds max_pixels (decompression-bomb guard; checked before decoding)",
    "too_small": "the shorter side is below min_side",
    "bad_meta": "the .json member is not a JSON object (bad JSON, another type, or nested too deeply to parse)",
    "duplicate_key": "a key already seen in this shard (the first occurrence is kept)",
    "missing": "read_images: a requested key is not in the shard",
    "tar_truncated": "the tar (or its gzip/bz2/xz stream) ends before its end-of-archive block (cut mid-file); "
                     "the sample being assembled at the cut is dropped and counted once; samples after the cut "
                     "are unknowable",
    "tar_corrupt": "the tar has an invalid header after valid members, or its compressed stream is damaged; "
                   "counted once per break, as above",
    "not_a_tar": "a file named .tar whose first block is neither a tar header nor a gzip/bz2/xz stream; "
                 "counted once, nothing in it is read",
    "empty_tar": "a file named .tar with zero bytes; counted once",
    "dangling_symlink": "folder gallery: a symlink whose target does not exist (never opened)",
    "not_regular_file": "folder gallery: a FIFO, device, socket or other non-regular file, directly or through "
                        "a symlink (e.g. to /dev/zero); never opened, so never read or waited on",
    "unreadable_file": "folder gallery: a regular file that cannot be opened or read (permissions, I/O error)",
    "stale_location": "a read by recorded location found the gallery changed since indexing: the file is gone "
                      "or shorter than offset+size, or the tar header before the bytes is not the member's",
    "changed": "a read by recorded location found bytes whose content hash differs from the one indexed "
               "(the image was replaced, even by one of the same size)",
}

# PIL's own decompression-bomb threshold (about 89.5 Mpx). PIL refuses images above twice this at
# open time whatever max_pixels says; those are counted as too_large too.
DEFAULT_MAX_PIXELS: int = int(Image.MAX_IMAGE_PIXELS or 89_478_485)

_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
_SIDE_EXTS = ("json", "txt")


# ---------------------------------------------------------------- counts


class SkipCounts:
    """reason -> number of skipped gallery entries. Reasons are free strings (see SKIP_REASONS)."""

    def __init__(self, counts: dict[str, int] | None = None):
        self._c: Counter[str] = Counter()
        for reason, n in (counts or {}).items():
            self.add(reason, n)

    def add(self, reason: str, n: int = 1) -> None:
        if not reason:
            raise ValueError("skip reason must be a non-empty string")
        if n < 0:
            raise ValueError(f"skip count must be >= 0, got {n} for {reason!r}")
        if n:
            self._c[reason] += n

    def merge(self, other: "SkipCounts | dict[str, int]") -> "SkipCounts":
        items = other.to_dict() if isinstance(other, SkipCounts) else other
        for reason, n in items.items():
            self.add(reason, n)
        return self

    @property
    def total(self) -> int:
        return sum(self._c.values())

    def __getitem__(self, reason: str) -> int:
        return self._c.get(reason, 0)

    def to_dict(self) -> dict[str, int]:
        return {k: self._c[k] for k in sorted(self._c)}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SkipCounts):
            return self.to_dict() == other.to_dict()
        if isinstance(other, dict):
            return self.to_dict() == {k: v for k, v in other.items() if v}
        return NotImplemented

    def __repr__(self) -> str:
        return f"SkipCounts({self.to_dict()})"


# ---------------------------------------------------------------- shards and images


@dataclass(frozen=True)
class ShardRef:
    name: str
    path: str
    kind: Literal["tar", "folder"]
    recursive: bool = True  # folder shards only: False for the images directly in a gallery root

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "kind": self.kind, "recursive": self.recursive}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardRef":
        return cls(name=d["name"], path=d["path"], kind=d["kind"], recursive=d.get("recursive", True))


@dataclass
class GalleryImage:
    id: str
    key: str
    image: Image.Image  # RGB, fully loaded (or what iter_images' `decode` returned)
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    loc: dict[str, Any] | None = None  # where its bytes live (contract.ROW_LOC_FIELDS); None: not seekable
    hash: str | None = None  # content.image_hash of the image member's stored bytes


def _is_pattern(s: str) -> bool:
    return any(c in s for c in "*?[{")


def _visible(entry: os.DirEntry) -> bool:
    return not entry.name.startswith(".")


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _has_images(folder: str, recursive: bool) -> bool:
    """True as soon as one image file is found (stops early on large trees)."""
    with os.scandir(folder) as it:
        subdirs = []
        for e in it:
            if not _visible(e):
                continue
            if e.is_file() and _ext(e.name) in IMAGE_EXTS:
                return True
            if recursive and e.is_dir():
                subdirs.append(e.path)
    return any(_has_images(d, True) for d in subdirs)


def _shards_of_dir(path: str) -> list[ShardRef]:
    with os.scandir(path) as it:
        entries = sorted((e for e in it if _visible(e)), key=lambda e: e.name)
    tars = [e for e in entries if e.is_file() and e.name.endswith(".tar")]
    if tars:
        return [ShardRef(Path(e.name).stem, os.path.abspath(e.path), "tar") for e in tars]
    shards = []
    if _has_images(path, recursive=False):
        shards.append(ShardRef(Path(os.path.abspath(path)).name, os.path.abspath(path), "folder", False))
    for e in entries:
        if e.is_dir() and _has_images(e.path, recursive=True):
            shards.append(ShardRef(e.name, os.path.abspath(e.path), "folder", True))
    return shards


def list_shards(path_or_glob: str | list[str]) -> list[ShardRef]:
    """Resolve paths/globs to gallery shards, sorted by name. Raises if a pattern yields no shard
    or two shards share a name (image ids would collide)."""
    patterns = [path_or_glob] if isinstance(path_or_glob, (str, os.PathLike)) else list(path_or_glob)
    if not patterns:
        raise ConfigError("list_shards: no gallery path given")
    looked_for = "*.tar files, or image files (" + ", ".join("." + e for e in IMAGE_EXTS) + ") in a folder"
    found: dict[str, ShardRef] = {}
    for pattern in map(str, patterns):
        paths: list[str] = []
        for p in braceexpand.braceexpand(pattern):
            p = os.path.expanduser(p)
            if _is_pattern(p) and not os.path.exists(p):  # an existing name with '[' is a path
                paths.extend(sorted(glob.glob(p, recursive=True)))
            else:
                paths.append(p)
        shards: list[ShardRef] = []
        for p in paths:
            if os.path.isdir(p):
                shards.extend(_shards_of_dir(p))
            elif os.path.isfile(p) and p.endswith(".tar"):
                shards.append(ShardRef(Path(p).stem, os.path.abspath(p), "tar"))
            elif not os.path.exists(p):
                raise MissingInputError(f"gallery path {p!r} does not exist")
        if not shards:
            if _is_pattern(pattern):
                what = f"it matched {len(paths)} path(s)"
            else:
                what = "a folder without .tar files or images" if os.path.isdir(pattern) else "not a .tar file"
            raise MissingInputError(f"no gallery shards found for {pattern!r} ({what}); looked for {looked_for}")
        for s in shards:
            other = found.get(s.name)
            if other is not None and other.path != s.path:
                raise InputError(f"two gallery shards are named {s.name!r} ({other.path} and {s.path}); "
                                 "image ids '<shard>/<key>' would collide: rename one or index them separately")
            found[s.name] = s
    return [found[n] for n in sorted(found)]


# ---------------------------------------------------------------- decoding


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int = 0) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None) or (None, skip reason). Never raises for bad bytes. High bit depths are
    scaled to 8 bits (index.bitdepth), not clipped."""
    if not data:
        return None, "empty"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # palette-transparency notes from convert()
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            return None, "too_large"
        except UnidentifiedImageError:
            return None, "corrupt" if data.startswith(_IMAGE_MAGIC) or data[8:12] == b"WEBP" else "not_image"
        except Exception as e:  # noqa: BLE001 - any decoder error is a counted skip
            return None, _decode_error_reason(e)
        w, h = im.size
        if w * h > max_pixels:
            return None, "too_large"
        if min(w, h) < min_side:
            return None, "too_small"
        try:
            im.load()
            return to_rgb8(im), None
        except Image.DecompressionBombError:
            return None, "too_large"
        except Exception as e:  # noqa: BLE001
            return None, _decode_error_reason(e)


# (bytes, max_pixels=, min_side=) -> (image, None) | (None, skip reason)
Decoder = Callable[..., "tuple[Any, str | None]"]


def _decode_error_reason(e: Exception) -> str:
    if isinstance(e, EOFError) or "truncated" in str(e).lower():
        return "truncated"
    return "corrupt"


# ---------------------------------------------------------------- raw samples

# A raw sample: key, members suffix -> bytes (tar) or file path (folder, read on demand), and where
# each member lives: suffix -> (data offset, size) in a plain tar, suffix -> path relative to the shard
# folder; empty where members cannot be sought (a compressed tar stream).
_Members = dict[str, "bytes | str"]
_Where = dict[str, "tuple[int, int] | str"]

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


def _tar_samples(shard: ShardRef, counts: SkipCounts, select: Callable[[str], bool] | None,
                 on_digest: Callable[[str], None] | None = None) -> Iterator[tuple[str, _Members, _Where]]:
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
        return select is None or select(_tar_key(fname)[0])

    key: str | None = None
    members: _Members = {}
    where: _Where = {}
    not_tar = _first_block_problem(shard.path)
    if not_tar:
        log.warning("gallery shard %s: %s; nothing in it is read", shard.path, not_tar)
        counts.add(not_tar)
        if on_digest is not None:
            on_digest(shard_digest(shard))
        return
    with open(shard.path, "rb") as raw:
        f = raw if on_digest is None else content.HashingReader(raw)
        try:
            for fname, data, offset in _tar_members(f, handler=stop, select_files=select_files):
                prefix, suffix = _tar_key(fname)
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
    reason = _tar_problem(shard.path)
    if not (errors or reason):
        if key is not None:
            yield key, members, where
        return
    reason = reason or "tar_corrupt"
    log.warning("gallery shard %s: %s (%s); the sample at the break is dropped and reading stops",
                shard.path, reason, errors[0] if errors else "archive ends without its end-of-archive block")
    if key is not None and announced and _tar_key(announced[0])[0] != key:
        yield key, members, where  # a later sample's member had begun: the one assembled is complete
    counts.add(reason)


def _tar_key(fname: str) -> tuple[str, str]:
    """(key, lower-case suffix) as webdataset splits names; a name without extension has suffix ''."""
    prefix, suffix = base_plus_ext(fname)
    if prefix is None:
        return fname, ""
    return prefix, suffix.lower()


def _folder_key(rel_stem: str) -> str:
    return rel_stem.replace(os.sep, "_").replace("/", "_").replace(".", "_")


def _folder_entries(shard: ShardRef) -> list[tuple[str, str | None]]:
    """(path relative to the shard folder, '/'-separated; None or the skip reason) of every gallery
    file of a folder shard, sorted. Non-regular entries (dangling symlinks, FIFOs, devices, symlinks
    to them) are classified by stat alone: never opened."""
    root = shard.path
    names: list[str] = []
    if shard.recursive:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            names.extend(os.path.relpath(os.path.join(dirpath, n), root) for n in filenames if not n.startswith("."))
    else:
        with os.scandir(root) as it:
            names = [e.name for e in it if _visible(e) and not e.is_dir()]
    rels = sorted(n.replace(os.sep, "/") for n in names if _ext(n) in IMAGE_EXTS or _ext(n) in _SIDE_EXTS)
    return [(rel, content.file_kind(os.path.join(root, rel))) for rel in rels]


def _fill_tree(root: str, entries: list[tuple[str, str | None]], tree: content.TreeHasher) -> None:
    """Add every entry not yet in `tree` (read now if regular) so it covers the whole shard."""
    for rel, reason in entries:
        if rel in tree:
            continue
        if reason:
            tree.skip(rel, reason)
            continue
        try:
            tree.add(rel, content.read_regular(os.path.join(root, rel)))
        except OSError:
            tree.skip(rel, "unreadable_file")


def _folder_samples(shard: ShardRef, counts: SkipCounts, select: Callable[[str], bool] | None,
                    on_digest: Callable[[str], None] | None = None, tree: content.TreeHasher | None = None
                    ) -> Iterator[tuple[str, _Members, _Where]]:
    """Samples of a folder shard. A sample with a non-regular file is counted once under that file's
    reason and not yielded. With `on_digest`, the files read through `_read(..., tree)` are hashed as
    they are read, and the rest once every sample is done, into the shard's digest."""
    root = shard.path
    entries = _folder_entries(shard)
    bad = {rel: reason for rel, reason in entries if reason}
    groups: dict[str, _Where] = {}
    for rel, _ in entries:
        ext = _ext(rel)
        groups.setdefault(rel[: -len(ext) - 1], {})[ext] = rel
    # Files sharing a stem (a.jpg + a.png) are one sample, its image the first in IMAGE_EXTS order;
    # different stems mapping to one key (a.b.jpg, a_b.jpg) are duplicate keys.
    for stem in sorted(groups):
        key = _folder_key(stem)
        if select is not None and not select(key):
            continue
        where = groups[stem]
        problems = [bad[where[e]] for e in (*IMAGE_EXTS, *_SIDE_EXTS) if e in where and where[e] in bad]
        if problems:
            counts.add(problems[0])
            continue
        yield key, {ext: os.path.join(root, rel) for ext, rel in where.items()}, where
    if on_digest is not None and tree is not None:
        _fill_tree(root, entries, tree)
        on_digest(tree.hexdigest())


def shard_digest(shard: ShardRef) -> str:
    """The digest iter_images(..., on_digest=...) reports for this shard, computed by reading its
    bytes only (no decoding): a tar's whole file, a folder's gallery files (content.TreeHasher)."""
    if shard.kind == "tar":
        with open(shard.path, "rb") as f:
            return content.file_hash(f)
    tree = content.TreeHasher()
    _fill_tree(shard.path, _folder_entries(shard), tree)
    return tree.hexdigest()


def _read(member: bytes | str, rel: Any = None, tree: content.TreeHasher | None = None) -> bytes:
    """A member's bytes: in memory (tar) or a folder file, opened only if regular (OSError if not),
    and added to `tree` under its relative path `rel`."""
    if isinstance(member, bytes):
        return member
    data = content.read_regular(member)
    if tree is not None and isinstance(rel, str):
        tree.add(rel, data)
    return data


def _samples(shard: ShardRef, counts: SkipCounts, select: Callable[[str], bool] | None,
             on_digest: Callable[[str], None] | None = None, tree: content.TreeHasher | None = None):
    if shard.kind == "tar":
        return _tar_samples(shard, counts, select, on_digest)
    if shard.kind == "folder":
        return _folder_samples(shard, counts, select, on_digest, tree)
    raise ValueError(f"unknown shard kind {shard.kind!r}; valid choices: tar, folder")


def image_ext(suffixes: Any) -> str | None:
    """The sample's image member: the first of IMAGE_EXTS among its suffixes."""
    return next((e for e in IMAGE_EXTS if e in suffixes), None)


def meta_of(raw: bytes) -> dict[str, Any] | None:
    """The parsed ``.json`` member, or None if it is not a JSON object (skip reason 'bad_meta')."""
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):   # RecursionError: [[[[...]]]] nested deeply
        return None
    return meta if isinstance(meta, dict) else None


def _location(where: _Where, ext: str, size: int) -> dict[str, Any] | None:
    """The sample's location record (contract.ROW_LOC_FIELDS), or None where it cannot be sought."""
    img = where.get(ext)
    if img is None:
        return None
    if isinstance(img, tuple):
        loc: dict[str, Any] = {"offset": img[0], "size": img[1], "ext": ext}
        if "json" in where:
            loc["json"] = list(where["json"])
        return loc
    loc = {"file": img, "size": size, "ext": ext}
    if "json" in where:
        loc["json"] = where["json"]
    return loc


def _to_image(shard: ShardRef, key: str, members: _Members, where: _Where, counts: SkipCounts,
              max_pixels: int, min_side: int, decode: Decoder = decode_image,
              tree: content.TreeHasher | None = None) -> GalleryImage | None:
    ext = image_ext(members)
    if ext is None:
        counts.add("not_image")
        return None
    try:
        meta: dict[str, Any] | None = {}
        if "json" in members:
            meta = meta_of(_read(members["json"], where.get("json"), tree))
            if meta is None:
                counts.add("bad_meta")
                return None
        data = _read(members[ext], where.get(ext), tree)
        caption = _read(members["txt"], where.get("txt"), tree) if "txt" in members else None
    except OSError:   # a folder file that cannot be read, or no longer a regular file
        counts.add("unreadable_file")
        return None
    image, reason = decode(data, max_pixels=max_pixels, min_side=min_side)
    if image is None:
        counts.add(reason or "corrupt")
        return None
    return GalleryImage(id=image_id(shard.name, key), key=key, image=image,
                        caption=None if caption is None else caption.decode("utf-8", errors="replace"),
                        meta=meta, loc=_location(where, ext, len(data)), hash=content.image_hash(data))


def iter_images(shard: ShardRef, counts: SkipCounts | None = None, *,
                max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 0,
                decode: Decoder = decode_image,
                on_digest: Callable[[str], None] | None = None) -> Iterator[GalleryImage]:
    """Decoded images of one shard, in shard order. Skipped entries are added to `counts`.

    `decode` turns an image member's bytes into (image, None) or (None, skip reason); a decoder may
    defer the pixels (index.device_decode keeps JPEG bytes for a batched decode on the device).
    `on_digest`, when given, is called once the shard is read to its end with the digest of all its
    bytes (`shard_digest`), hashed while they were read for decoding."""
    counts = SkipCounts() if counts is None else counts
    tree = content.TreeHasher() if on_digest is not None and shard.kind == "folder" else None
    seen: set[str] = set()
    for key, members, where in _samples(shard, counts, None, on_digest, tree):
        if key in seen:
            counts.add("duplicate_key")
            continue
        seen.add(key)
        item = _to_image(shard, key, members, where, counts, max_pixels, min_side, decode, tree)
        if item is not None:
            yield item


def read_images(shard: ShardRef, keys: set[str], counts: SkipCounts | None = None, *,
                max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 0) -> dict[str, Image.Image]:
    """Read one shard once and return only the images of `keys` (the same images iter_images gives).

    This scans the shard; curate reads by recorded location instead (index.ranged) and comes here only
    for an index built before locations were recorded, or a compressed tar.

    Only wanted members are read from a tar. Wanted keys that cannot be decoded are counted under
    their reason, wanted keys absent from the shard under 'missing'.
    """
    got = read_gallery_images(shard, keys, counts, max_pixels=max_pixels, min_side=min_side)
    return {k: g.image for k, g in got.items()}


def read_gallery_images(shard: ShardRef, keys: set[str], counts: SkipCounts | None = None, *,
                        max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 0) -> dict[str, GalleryImage]:
    """`read_images` with the whole `GalleryImage` of each key (its content hash included)."""
    counts = SkipCounts() if counts is None else counts
    wanted = set(keys)
    out: dict[str, GalleryImage] = {}
    seen: set[str] = set()
    for key, members, where in _samples(shard, counts, wanted.__contains__):
        if key in seen:
            continue  # a later duplicate of a key: iter_images keeps the first occurrence too
        seen.add(key)
        item = _to_image(shard, key, members, where, counts, max_pixels, min_side)
        if item is not None:
            out[key] = item
    counts.add("missing", len(wanted - seen))
    return out
