"""Gallery readers: img2dataset WebDataset tars and plain image folders, with every skip counted.

A gallery is a list of shards (``list_shards``); a shard yields ``GalleryImage``s (``iter_images``)
whose id is ``contract.image_id(shard.name, key)``. Tar members are read as webdataset reads them, with
each member's data offset kept (``index.tar_reader``), so every image carries its location
(``GalleryImage.loc``, the format is ``contract.ROW_LOC_FIELDS``) and is later read back by byte range
(``index.ranged``). Images are decoded here with PIL and no error is swallowed: every entry that does
not become an image is counted in a ``SkipCounts`` under one of ``SKIP_REASONS`` (``index.skips``).

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
    ``contract.IMAGE_EXTS`` it has (``jpg``, ``jpeg``, ``png``, ``webp``), decoded by the one image
    loader (``index.core.images``): EXIF orientation applied, transparency composited onto white.

Why one module of about 400 lines: it is the one path from a gallery path to decoded images, shard
listing, folder samples and the sample -> image step (`_samples`, `_to_image`) that both shard kinds
and the range reader (`index.ranged`) share.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import braceexpand
from PIL import Image

from index import content
from index.core.contract import IMAGE_EXTS, image_id
from index.core.images import DEFAULT_MAX_PIXELS, Decoder, decode_image
from index.core.errors import ConfigError, InputError, MissingInputError
from index.skips import SkipCounts
from index.tar_reader import Members, Where, tar_samples


_SIDE_EXTS = ("json", "txt")


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
                    ) -> Iterator[tuple[str, Members, Where]]:
    """Samples of a folder shard. A sample with a non-regular file is counted once under that file's
    reason and not yielded. With `on_digest`, the files read through `_read(..., tree)` are hashed as
    they are read, and the rest once every sample is done, into the shard's digest."""
    root = shard.path
    entries = _folder_entries(shard)
    bad = {rel: reason for rel, reason in entries if reason}
    groups: dict[str, Where] = {}
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
        return tar_samples(shard.path, counts, select, on_digest)
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


def _location(where: Where, ext: str, size: int) -> dict[str, Any] | None:
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


def _to_image(shard: ShardRef, key: str, members: Members, where: Where, counts: SkipCounts,
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
