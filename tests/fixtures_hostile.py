"""Gallery entries a user really has that go wrong: every kind of bad entry, in tars and in a folder.

`build_hostile(root)` writes ``root/tars/`` (one tar of bad samples, a gzip tar named ``.tar``, random
bytes named ``.tar``, a truncated tar, an empty ``.tar``) and ``root/photos/p/`` (a folder shard with a
dangling symlink, a FIFO, a symlink to /dev/zero and bad files), and returns the image count and the
skip counts by reason that reading them must give. Also: PNG writers for 16-bit images (PIL cannot
write 16-bit RGB) and uncompressed PNGs (same size for the same dimensions), and an in-place member
replacement for tars.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from fixtures_gallery import jpeg_bytes, pattern, png_bytes, write_tar


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG of a uint16 array [h, w] (grey) or [h, w, c] (c = 2 grey+alpha, 3 RGB, 4 RGBA)."""
    arr = np.asarray(arr, dtype=np.uint16)
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def gradient16(w: int = 256, h: int = 48) -> np.ndarray:
    """A full-range horizontal 16-bit gradient: 0 at the left edge, 65535 at the right."""
    return np.repeat(np.linspace(0, 65535, w).round().astype(np.uint16)[None], h, 0)


def stored_png(im: Image.Image) -> bytes:
    """An uncompressed PNG: its size depends on the dimensions only, so images can be swapped in place."""
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=0)
    return buf.getvalue()


def replace_member(tar_path: Path, name: str, data: bytes) -> None:
    """Overwrite a member's bytes in place with others of the same length (the tar stays valid)."""
    with tarfile.open(tar_path) as tf:
        info = tf.getmember(name)
    if info.size != len(data):
        raise ValueError(f"{name}: {len(data)} bytes to replace {info.size}")
    with open(tar_path, "r+b") as f:
        f.seek(info.offset_data)
        f.write(data)


def nested_json(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


def _truncated_png() -> bytes:
    data = png_bytes(pattern(7))
    return data[: len(data) // 2]


def _corrupt_png() -> bytes:
    data = bytearray(png_bytes(pattern(8)))
    i = data.find(b"IDAT")
    for k in range(i + 20, i + 60):
        data[k] ^= 0xFF
    return bytes(data)


def build_hostile(root: Path) -> tuple[list[str], int, dict[str, int]]:
    """(gallery paths, images readable, expected skip counts by reason)."""
    tars, photos = root / "tars", root / "photos" / "p"
    tars.mkdir(parents=True)
    photos.mkdir(parents=True)
    hi16 = png16(gradient16())
    bad = [("ok_jpg", "jpg", jpeg_bytes(pattern(1))), ("ok_png", "png", png_bytes(pattern(2))),
           ("hi16", "png", hi16), ("corrupt", "png", _corrupt_png()), ("trunc", "png", _truncated_png()),
           ("empty", "jpg", b""), ("noise", "jpg", np.random.default_rng(0).bytes(900))]
    write_tar(tars / "a.tar", bad)
    with tarfile.open(tars / "a.tar", "a") as tf:   # a json-only sample and one of nested brackets
        for name, payload in (("meta_only.json", b"{}"), ("deep.png", png_bytes(pattern(3))),
                              ("deep.json", nested_json())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    write_tar(tars / "plain.tar", [(f"g{i}", "png", png_bytes(pattern(10 + i))) for i in range(3)])
    (tars / "b.tar").write_bytes(gzip.compress((tars / "plain.tar").read_bytes(), mtime=0))
    (tars / "plain.tar").unlink()
    (tars / "c.tar").write_bytes(np.random.default_rng(1).bytes(5000))
    write_tar(tars / "d.tar", [(f"t{i}", "png", png_bytes(pattern(20 + i))) for i in range(3)])
    with tarfile.open(tars / "d.tar") as tf:
        cut = tf.getmember("t1.png").offset_data + 100
    with open(tars / "d.tar", "r+b") as f:
        f.truncate(cut)
    (tars / "e.tar").write_bytes(b"")

    (photos / "ok.jpg").write_bytes(jpeg_bytes(pattern(30)))
    (photos / "hi16.png").write_bytes(hi16)
    (photos / "corrupt.png").write_bytes(_corrupt_png())
    (photos / "trunc.png").write_bytes(_truncated_png())
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "noise.jpg").write_bytes(np.random.default_rng(2).bytes(900))
    (photos / "deep.png").write_bytes(png_bytes(pattern(31)))
    (photos / "deep.json").write_bytes(nested_json())
    (photos / "meta_only.json").write_text(json.dumps({"a": 1}))
    os.symlink(photos / "missing.jpg", photos / "dangling.jpg")
    os.mkfifo(photos / "fifo.jpg")
    os.symlink("/dev/zero", photos / "zero.jpg")
    expected = {"corrupt": 2, "truncated": 2, "empty": 2, "not_image": 4, "bad_meta": 2,
                "not_a_tar": 1, "tar_truncated": 1, "empty_tar": 1,
                "dangling_symlink": 1, "not_regular_file": 2}
    # a: ok_jpg ok_png hi16; b (gzip): 3; d: t0; p: ok hi16
    return [str(tars), str(root / "photos")], 3 + 3 + 1 + 2, expected
