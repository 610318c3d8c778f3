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
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import braceexpand
from PIL import Image, UnidentifiedImageError
from webdataset.tariterators import base_plus_ext

from index.contract import IMAGE_EXTS, image_id
from index.errors import ConfigError, InputError, MissingInputError

log = logging.getLogger(__name__)

SKIP_REASONS: dict[str, str] = {
    "empty": "the image member/file has zero bytes",
    "truncated": "the image data ends early (PIL: 'image file is truncated', EOF)",
    "corrupt": "an image format was recognised but the data cannot be decoded "
               "(broken stream, bad CRC, unreadable header after a valid signature)",
    "not_image": "the sample has no jpg/jpeg/png/webp member, or its image bytes are not an image",
    "too_large": "width*height exceeds max_pixels (decompression-bomb guard; checked before decoding)",
    "too_small": "the shorter side is below min_side",
    "bad_meta": "the .json member is not a JSON object",
    "duplicate_key": "a key already seen in this shard (the first occurrence is kept)",
    "missing": "read_images: a requested key is not in the shard",
    "tar_truncated": "the tar ends before its end-of-archive block (cut mid-file); the sample being "
                     "assembled at the cut is dropped and counted once; samples after the cut are unknowable",
    "tar_corrupt": "the tar cannot be opened or has an invalid header; counted once per break, as above",
    "stale_location": "a read by recorded location found the gallery changed since indexing: the file is gone "
                      "or shorter than offset+size, or the tar header before the bytes is not the member's",
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
    image: Image.Image  # RGB, fully loaded
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    loc: dict[str, Any] | None = None  # where its bytes live (contract.ROW_LOC_FIELDS); None: not seekable


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
    """(RGB image, None) or (None, skip reason). Never raises for bad bytes."""
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
            return im.convert("RGB"), None
        except Image.DecompressionBombError:
            return None, "too_large"
        except Exception as e:  # noqa: BLE001
            return None, _decode_error_reason(e)


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


def _zero_tail(f: Any, offset: int) -> bool:
    f.seek(offset)
    while block := f.read(1 << 20):
        if block.count(0) != len(block):
            return False
    return True


def _tar_problem(path: str) -> str | None:
    """None if the archive is intact: every header valid and only zero blocks after the last member."""
    size = os.path.getsize(path)
    if size % tarfile.BLOCKSIZE:
        return "tar_truncated"
    try:
        with tarfile.open(path, "r:") as tf:
            while tf.next() is not None:
                tf.members = []
            end = tf.offset
    except tarfile.ReadError as e:
        return "tar_truncated" if "unexpected end" in str(e) else "tar_corrupt"
    except (EOFError, OSError):
        return "tar_truncated"
    if end + tarfile.BLOCKSIZE > size:
        return "tar_truncated"  # no end-of-archive block: cut on a member boundary
    with open(path, "rb") as f:
        return None if _zero_tail(f, end) else "tar_corrupt"


def _tar_samples(shard: ShardRef, counts: SkipCounts,
                 select: Callable[[str], bool] | None) -> Iterator[tuple[str, _Members, _Where]]:
    """Members grouped by key, as webdataset groups them. At a break in the archive the sample being
    assembled is yielded only if the break is known to lie in a later sample's member."""
    member_errors: list[Exception] = []
    header_errors: list[Exception] = []
    announced: list[str] = []  # name of the member _tar_members is about to read

    def stop(exn: Exception) -> bool:
        member_errors.append(exn)
        return False  # stop this archive; the break is counted below

    def select_files(fname: str) -> bool:
        announced[:] = [fname]
        return select is None or select(_tar_key(fname)[0])

    key: str | None = None
    members: _Members = {}
    where: _Where = {}
    with open(shard.path, "rb") as f:
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
        except (tarfile.TarError, EOFError, OSError) as exn:  # raised while reading a header
            header_errors.append(exn)
    reason = _tar_problem(shard.path)
    if not (member_errors or header_errors or reason):
        if key is not None:
            yield key, members, where
        return
    errors = member_errors + header_errors
    reason = reason or "tar_corrupt"
    log.warning("gallery shard %s: %s (%s); the sample at the break is dropped and reading stops",
                shard.path, reason, errors[0] if errors else "archive ends without its end-of-archive block")
    if key is not None and member_errors and not header_errors and announced and _tar_key(announced[0])[0] != key:
        yield key, members, where  # the broken member starts a new sample: the one assembled is complete
    counts.add(reason)


def _tar_key(fname: str) -> tuple[str, str]:
    """(key, lower-case suffix) as webdataset splits names; a name without extension has suffix ''."""
    prefix, suffix = base_plus_ext(fname)
    if prefix is None:
        return fname, ""
    return prefix, suffix.lower()


def _folder_key(rel_stem: str) -> str:
    return rel_stem.replace(os.sep, "_").replace("/", "_").replace(".", "_")


def _folder_samples(shard: ShardRef, select: Callable[[str], bool] | None
                    ) -> Iterator[tuple[str, _Members, _Where]]:
    files: list[str] = []
    root = shard.path
    if shard.recursive:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files.extend(os.path.relpath(os.path.join(dirpath, n), root) for n in filenames if not n.startswith("."))
    else:
        with os.scandir(root) as it:
            files = [e.name for e in it if e.is_file() and _visible(e)]
    groups: dict[str, _Where] = {}
    for rel in sorted(files):
        ext = _ext(rel)
        if ext not in IMAGE_EXTS and ext not in _SIDE_EXTS:
            continue  # not a gallery file (e.g. README.md)
        stem = rel[: -len(ext) - 1]
        groups.setdefault(stem, {})[ext] = rel.replace(os.sep, "/")
    # Files sharing a stem (a.jpg + a.png) are one sample, its image the first in IMAGE_EXTS order;
    # different stems mapping to one key (a.b.jpg, a_b.jpg) are duplicate keys.
    for stem in sorted(groups):
        key = _folder_key(stem)
        if select is None or select(key):
            where = groups[stem]
            yield key, {ext: os.path.join(root, rel) for ext, rel in where.items()}, where


def _read(member: bytes | str) -> bytes:
    if isinstance(member, bytes):
        return member
    with open(member, "rb") as f:
        return f.read()


def _samples(shard: ShardRef, counts: SkipCounts, select: Callable[[str], bool] | None):
    if shard.kind == "tar":
        return _tar_samples(shard, counts, select)
    if shard.kind == "folder":
        return _folder_samples(shard, select)
    raise ValueError(f"unknown shard kind {shard.kind!r}; valid choices: tar, folder")


def image_ext(suffixes: Any) -> str | None:
    """The sample's image member: the first of IMAGE_EXTS among its suffixes."""
    return next((e for e in IMAGE_EXTS if e in suffixes), None)


def meta_of(raw: bytes) -> dict[str, Any] | None:
    """The parsed ``.json`` member, or None if it is not a JSON object (skip reason 'bad_meta')."""
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
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
              max_pixels: int, min_side: int) -> GalleryImage | None:
    ext = image_ext(members)
    if ext is None:
        counts.add("not_image")
        return None
    meta: dict[str, Any] | None = {}
    if "json" in members:
        meta = meta_of(_read(members["json"]))
        if meta is None:
            counts.add("bad_meta")
            return None
    data = _read(members[ext])
    image, reason = decode_image(data, max_pixels=max_pixels, min_side=min_side)
    if image is None:
        counts.add(reason or "corrupt")
        return None
    caption = _read(members["txt"]).decode("utf-8", errors="replace") if "txt" in members else None
    return GalleryImage(id=image_id(shard.name, key), key=key, image=image, caption=caption, meta=meta,
                        loc=_location(where, ext, len(data)))


def iter_images(shard: ShardRef, counts: SkipCounts | None = None, *,
                max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 0) -> Iterator[GalleryImage]:
    """Decoded images of one shard, in shard order. Skipped entries are added to `counts`."""
    counts = SkipCounts() if counts is None else counts
    seen: set[str] = set()
    for key, members, where in _samples(shard, counts, None):
        if key in seen:
            counts.add("duplicate_key")
            continue
        seen.add(key)
        item = _to_image(shard, key, members, where, counts, max_pixels, min_side)
        if item is not None:
            yield item


def read_images(shard: ShardRef, keys: set[str], counts: SkipCounts | None = None, *,
                max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 0) -> dict[str, Image.Image]:
    """Read one shard once and return only the images of `keys` (the same images iter_images gives).

    This scans the shard; curate reads by recorded location instead (index.ranged) and comes here only
    for an index built before locations were recorded.

    Only wanted members are read from a tar. Wanted keys that cannot be decoded are counted under
    their reason, wanted keys absent from the shard under 'missing'.
    """
    counts = SkipCounts() if counts is None else counts
    wanted = set(keys)
    out: dict[str, Image.Image] = {}
    seen: set[str] = set()
    for key, members, where in _samples(shard, counts, wanted.__contains__):
        if key in seen:
            continue  # a later duplicate of a key: iter_images keeps the first occurrence too
        seen.add(key)
        item = _to_image(shard, key, members, where, counts, max_pixels, min_side)
        if item is not None:
            out[key] = item.image
    counts.add("missing", len(wanted - seen))
    return out
