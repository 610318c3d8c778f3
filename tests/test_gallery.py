"""Gallery readers: shard listing, decoding, and an exact count for every kind of broken entry."""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from index.core.images import decode_image
from index.gallery import ShardRef, iter_images, list_shards, read_images
from index.skips import SkipCounts


def _encode(fmt: str, w: int = 24, h: int = 16, seed: int = 0, mode: str = "RGB") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR declares w x h: enough for PIL to read the size, nothing to decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _sample(key: str, ext: str = "jpg", data: bytes | None = None, meta: dict | None = None,
            caption: str | None = None) -> list[tuple[str, bytes]]:
    out = [(f"{key}.{ext}", _encode("JPEG" if ext == "jpg" else ext.upper()) if data is None else data)]
    out.append((f"{key}.json", json.dumps(meta if meta is not None else {"key": key}).encode()))
    if caption is not None:
        out.append((f"{key}.txt", caption.encode()))
    return out


JPG = _encode("JPEG", 40, 30)
PNG = _encode("PNG", 40, 30, seed=1)


def _corrupt_png() -> bytes:
    data = bytearray(PNG)
    i = data.find(b"IDAT")
    for k in range(i + 20, i + 60):
        data[k] ^= 0xFF
    return bytes(data)


@pytest.fixture()
def messy_tar(tmp_path: Path) -> Path:
    members = (
        _sample("000", data=JPG, caption="a red fox")
        + _sample("001", ext="png", data=PNG)
        + _sample("002", data=b"")                       # empty
        + _sample("003", data=JPG[: len(JPG) // 2])      # truncated
        + _sample("004", data=np.random.default_rng(3).bytes(700))  # not_image: random bytes named .jpg
        + [("005.json", b'{"only": "meta"}')]            # not_image: no image member
        + _sample("006", ext="png", data=_corrupt_png())  # corrupt: PNG with a broken IDAT
        + _sample("007", ext="png", data=_png_header_only(20000, 20000))  # too_large: PIL refuses at open
        + _sample("008", ext="png", data=_png_header_only(10000, 10000))  # too_large: above max_pixels
        + [("009.jpg", JPG), ("009.json", b"[1, 2")]     # bad_meta
        + [("010.jpg", _encode("JPEG", 8, 8, mode="L")), ("010.txt", "café".encode())]  # gray, no json
        + _sample("000", caption="again")                # duplicate_key
        + [("011.webp", _encode("WEBP", 12, 10)), ("011.png", PNG)]  # two images: the jpg/jpeg/png/webp order wins
    )
    return _write_tar(tmp_path / "00007.tar", members)


def test_messy_tar_counts_every_skip(messy_tar: Path):
    shard = list_shards(str(messy_tar))[0]
    assert shard == ShardRef("00007", str(messy_tar), "tar")
    counts = SkipCounts()
    images = list(iter_images(shard, counts))
    assert [g.key for g in images] == ["000", "001", "010", "011"]
    assert counts.to_dict() == {"bad_meta": 1, "corrupt": 1, "duplicate_key": 1, "empty": 1,
                                "not_image": 2, "too_large": 2, "truncated": 1}
    assert counts.total == 9
    first = images[0]
    assert first.id == "00007/000" and first.caption == "a red fox" and first.meta == {"key": "000"}
    assert first.image.mode == "RGB" and first.image.size == (40, 30)
    assert np.array_equal(np.asarray(images[1].image), np.asarray(Image.open(io.BytesIO(PNG)).convert("RGB")))
    assert images[2].caption == "café" and images[2].meta == {} and images[2].image.mode == "RGB"
    assert images[3].image.size == (40, 30)  # 011.png preferred over 011.webp


def test_limits_are_options(messy_tar: Path):
    shard = list_shards(str(messy_tar))[0]
    counts = SkipCounts()
    keys = [g.key for g in iter_images(shard, counts, max_pixels=40 * 30, min_side=10)]
    assert keys == ["000", "001", "011"]  # 40x30 is exactly at the limit: kept
    assert counts["too_large"] == 2 and counts["too_small"] == 1  # the 8x8 gray image
    counts = SkipCounts()
    assert [g.key for g in iter_images(shard, counts, max_pixels=40 * 30 - 1)] == ["010"]
    assert counts["too_large"] == 7  # size is checked before decoding: the truncated and corrupt 40x30 too


def _three_sample_tar(tmp_path: Path) -> tuple[Path, dict[str, tuple[int, int]]]:
    """k0..k2 (jpg + json each) written by webdataset's TarWriter; returns member (offset, data offset)."""
    path = tmp_path / "good.tar"
    with wds.TarWriter(str(path)) as w:
        for k in range(3):
            w.write({"__key__": f"k{k}", "jpg": _encode("JPEG", 32, 32, seed=k), "json": {"k": k}})
    with tarfile.open(path) as tf:
        offsets = {m.name: (m.offset, m.offset_data) for m in tf.getmembers()}
    return path, offsets


@pytest.mark.parametrize("where,keys,reason", [
    ("k1.jpg data", ["k0"], "tar_truncated"),        # cut mid-member
    ("k2.json header", ["k0", "k1"], "tar_truncated"),  # cut mid-header: the k2 in progress is lost
    ("k2.jpg boundary", ["k0"], "tar_truncated"),    # cut exactly between members: k1 cannot be known complete
    ("end marker", ["k0", "k1"], "tar_truncated"),   # all members there but no end-of-archive block
    ("k1.json header garbage", ["k0"], "tar_corrupt"),  # a header overwritten in place
])
def test_broken_tar_is_counted_and_stops_cleanly(tmp_path: Path, where: str, keys: list[str], reason: str):
    path, off = _three_sample_tar(tmp_path)
    data = path.read_bytes()
    if where == "k1.jpg data":
        data = data[: off["k1.jpg"][1] + 100]
    elif where == "k2.json header":
        data = data[: off["k2.json"][0] + 200]
    elif where == "k2.jpg boundary":
        data = data[: off["k2.jpg"][0]]
    elif where == "end marker":
        json_end = off["k2.json"][1] + 512  # json payload < 512 bytes, padded to one block
        data = data[:json_end]
    else:
        start = off["k1.json"][0]
        data = data[:start] + np.random.default_rng(0).bytes(512) + data[start + 512:]
    broken = tmp_path / "broken" / "00001.tar"
    broken.parent.mkdir()
    broken.write_bytes(data)
    counts = SkipCounts()
    got = [g.key for g in iter_images(list_shards(str(broken))[0], counts)]
    assert got == keys
    assert counts.to_dict() == {reason: 1}


def test_intact_tar_from_webdataset_writer(tmp_path: Path):
    path, _ = _three_sample_tar(tmp_path)
    counts = SkipCounts()
    images = list(iter_images(list_shards(str(path))[0], counts))
    assert [(g.id, g.meta) for g in images] == [(f"good/k{k}", {"k": k}) for k in range(3)]
    assert counts.total == 0


def test_unreadable_tar_files(tmp_path: Path):
    (tmp_path / "a.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "b.tar").write_bytes(b"")
    counts = SkipCounts()
    for shard in list_shards(str(tmp_path)):
        assert list(iter_images(shard, counts)) == []
    assert counts.to_dict() == {"not_a_tar": 1, "empty_tar": 1}  # random bytes, zero bytes: said as such


def test_read_images_reads_only_wanted_keys(messy_tar: Path):
    shard = list_shards(str(messy_tar))[0]
    full = {g.key: g.image for g in iter_images(shard)}
    counts = SkipCounts()
    got = read_images(shard, {"001", "011", "003", "nope"}, counts)
    assert sorted(got) == ["001", "011"]
    for k in got:
        assert np.array_equal(np.asarray(got[k]), np.asarray(full[k]))
    assert counts.to_dict() == {"missing": 1, "truncated": 1}  # unwanted broken entries are not read
    # the first occurrence of a duplicated key is returned, as iter_images does
    dup = read_images(shard, {"000"})
    assert np.array_equal(np.asarray(dup["000"]), np.asarray(full["000"]))


@pytest.fixture()
def folder_gallery(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "cats" / "sub").mkdir(parents=True)
    (root / "dogs").mkdir()
    (root / "empty" / "deeper").mkdir(parents=True)
    (root / ".cache").mkdir()
    (root / "top.png").write_bytes(PNG)
    (root / "README.md").write_text("not a gallery file")
    (root / "cats" / "a.jpg").write_bytes(JPG)
    (root / "cats" / "a.txt").write_text("cat a")
    (root / "cats" / "a.json").write_text('{"src": "x"}')
    (root / "cats" / "sub" / "b.c.jpg").write_bytes(JPG)
    (root / "cats" / "sub_b_c.png").write_bytes(PNG)  # same key as sub/b.c.jpg -> duplicate
    (root / "cats" / "zero.jpg").write_bytes(b"")
    (root / "cats" / "orphan.json").write_text("{}")
    (root / "dogs" / "d.webp").write_bytes(_encode("WEBP", 10, 12))
    (root / "empty" / "deeper" / "notes.txt").write_text("no images here")
    (root / ".cache" / "hidden.jpg").write_bytes(JPG)
    return root


def test_folder_gallery(folder_gallery: Path):
    shards = list_shards(str(folder_gallery))
    assert [(s.name, s.kind, s.recursive) for s in shards] == [
        ("cats", "folder", True), ("dogs", "folder", True), ("photos", "folder", False)]
    counts = SkipCounts()
    by_shard = {s.name: list(iter_images(s, counts)) for s in shards}
    assert [g.id for g in by_shard["cats"]] == ["cats/a", "cats/sub_b_c"]
    assert [g.id for g in by_shard["dogs"]] == ["dogs/d"]
    assert [g.id for g in by_shard["photos"]] == ["photos/top"]  # root shard is not recursive
    a = by_shard["cats"][0]
    assert a.caption == "cat a" and a.meta == {"src": "x"}
    assert by_shard["cats"][1].image.size == (40, 30)  # sub/b.c.jpg sorts before sub_b_c.png
    assert counts.to_dict() == {"duplicate_key": 1, "empty": 1, "not_image": 1}
    got = read_images(shards[0], {"sub_b_c", "zero"})
    assert list(got) == ["sub_b_c"]


def test_list_shards_patterns_and_errors(tmp_path: Path, folder_gallery: Path):
    out = tmp_path / "dl"
    out.mkdir()
    for i in (2, 0, 1):
        _write_tar(out / f"{i:05d}.tar", _sample("x"))
    (out / "00000_stats.json").write_text("{}")
    (out / "00000.parquet").write_bytes(b"")
    names = lambda arg: [s.name for s in list_shards(arg)]  # noqa: E731
    assert names(str(out)) == ["00000", "00001", "00002"]
    assert names(str(out / "*.tar")) == ["00000", "00001", "00002"]
    assert names(str(out / "{00000..00001}.tar")) == ["00000", "00001"]
    assert names([str(out / "00002.tar"), str(out / "00000.tar"), str(out / "00002.tar")]) == ["00000", "00002"]
    # each matched folder is a gallery root: cats/ gives its own images and its subfolder sub/
    assert names(str(folder_gallery / "*")) == ["cats", "dogs", "sub"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_shards(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"looked for \*\.tar files, or image files \(\.jpg"):
        list_shards(str(out / "*.tgz"))
    with pytest.raises(FileNotFoundError, match="no gallery shards found"):
        list_shards(str(folder_gallery / "empty"))
    other = tmp_path / "other"
    other.mkdir()
    _write_tar(other / "00001.tar", _sample("y"))
    with pytest.raises(ValueError, match="two gallery shards are named '00001'"):
        list_shards([str(out), str(other)])
    with pytest.raises(ValueError, match="no gallery path"):
        list_shards([])


def test_decode_image_reasons():
    assert decode_image(b"")[1] == "empty"
    assert decode_image(b"<html>not found</html>")[1] == "not_image"
    assert decode_image(JPG[:50])[1] == "truncated"
    assert decode_image(PNG[:30])[1] == "corrupt"  # a PNG signature with an unreadable header
    img, reason = decode_image(_encode("PNG", 5, 5, mode="RGBA"))
    assert reason is None and img.mode == "RGB" and img.size == (5, 5)


def test_skip_counts():
    a = SkipCounts({"empty": 2})
    a.add("corrupt")
    a.add("corrupt", 0)
    b = SkipCounts().merge(a).merge({"empty": 1})
    assert b.to_dict() == {"corrupt": 1, "empty": 3} and b.total == 4 and b["missing"] == 0
    assert a == {"corrupt": 1, "empty": 2}
    with pytest.raises(ValueError):
        a.add("corrupt", -1)
