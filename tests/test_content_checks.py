"""Inputs checked by content and decoded as users have them: the hostile gallery (every bad entry kind,
counted by reason, the build completes), high bit depths scaled, gzip and truncated tars read, and a
same-size image swapped into the middle of a shard noticed by the rerun."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from index import store
from index.build import build_gallery_index
from index.config import IndexConfig
from index.content import image_hash
from index.core import contract
from index.core.atomic import FingerprintMismatch
from index.crops import CropConfig
from index.core.images import decode_image, to_rgb
from index.gallery import iter_images, list_shards, read_images, shard_digest
from index.skips import SKIP_REASONS, SkipCounts

from fixtures_gallery import class_member, pattern, write_tar
from fixtures_hostile import build_hostile, gradient16, png16, replace_member, stored_png

REPO = Path(__file__).resolve().parents[1]
CROPS = CropConfig(crops_per_image=1, size=32, keep_full_image=True, randaugment=False)


def _gradient_row(im: Image.Image) -> np.ndarray:
    return np.asarray(im)[0, :, 0].astype(int)


def _assert_gradient(im: Image.Image, w: int = 256) -> None:
    row = _gradient_row(im)
    assert im.mode == "RGB" and len(row) == w
    assert row[0] == 0 and row[-1] == 255, row
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 200   # a gradient, not clipped at 255
    assert abs(row[w // 2] - 128) <= 1


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_pngs_are_scaled_to_8_bits(channels: int):
    g, alpha = gradient16(), np.full_like(gradient16(), 65535)
    arr = {1: g, 2: np.stack([g, alpha], -1), 3: np.stack([g, g, g], -1), 4: np.stack([g, g, g, alpha], -1)}[channels]
    image, reason = decode_image(png16(arr))
    assert reason is None
    _assert_gradient(image)


@pytest.mark.parametrize("mode,values", [
    ("I;16B", gradient16()),
    ("I", gradient16().astype(np.int32)),                        # 16-bit values in a 32-bit image
    ("F", gradient16().astype(np.float32) / 65535),              # floats in [0, 1]
    ("F", gradient16().astype(np.float32) / 65535 * 1000 - 500),  # any other range: stretched
])
def test_wide_modes_are_scaled_not_clipped(mode: str, values: np.ndarray):
    if mode == "I;16B":
        im = Image.frombytes(mode, values.shape[::-1], values.astype(">u2").tobytes())
    else:
        im = Image.fromarray(values, mode)
    assert im.mode == mode
    _assert_gradient(to_rgb(im))


def test_8_bit_images_decode_as_before():
    im = pattern(5)
    assert np.array_equal(np.asarray(to_rgb(im)), np.asarray(im.convert("RGB")))
    grey = im.convert("L")
    assert np.array_equal(np.asarray(to_rgb(grey)), np.asarray(grey.convert("RGB")))


# ---------------------------------------------------------------- tars


def _samples(n: int, seed: int = 40) -> list[tuple[str, str, bytes]]:
    return [(f"s{i}", "png", stored_png(pattern(seed + i, 32))) for i in range(n)]


def test_gzip_tar_named_tar_is_read_whole(tmp_path: Path):
    plain = write_tar(tmp_path / "plain.tar", _samples(3))
    import gzip
    gz = tmp_path / "g" / "00000.tar"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    shard = list_shards(str(gz))[0]
    counts = SkipCounts()
    got = list(iter_images(shard, counts))
    assert [g.key for g in got] == ["s0", "s1", "s2"] and counts.total == 0   # the last sample too
    assert all(g.loc is None for g in got)   # offsets in a compressed stream are not file offsets
    ref = {g.key: np.asarray(g.image) for g in iter_images(list_shards(str(plain))[0])}
    assert all(np.array_equal(np.asarray(g.image), ref[g.key]) for g in got)
    # read back by scanning (no locations): every image
    assert sorted(read_images(shard, {"s0", "s2"})) == ["s0", "s2"]
    # a gzip tar cut short is truncated, and what came before the cut is kept
    cut = tmp_path / "c" / "00001.tar"
    cut.parent.mkdir()
    cut.write_bytes(gz.read_bytes()[: gz.stat().st_size * 2 // 3])
    counts = SkipCounts()
    assert len(list(iter_images(list_shards(str(cut))[0], counts))) < 3 and counts.to_dict() == {"tar_truncated": 1}


def test_images_indexed_from_a_truncated_tar_stay_readable(tmp_path: Path):
    path = write_tar(tmp_path / "00000.tar", _samples(4))
    with tarfile.open(path) as tf:
        cut = tf.getmember("s3.png").offset_data + 50
    with open(path, "r+b") as f:
        f.truncate(cut)
    shard = list_shards(str(path))[0]
    counts = SkipCounts()
    indexed = [g.key for g in iter_images(shard, counts)]
    assert indexed == ["s0", "s1", "s2"] and counts.to_dict() == {"tar_truncated": 1}
    for key in indexed:   # each one alone, as a scan for a few wanted keys reads it
        counts = SkipCounts()
        assert list(read_images(shard, {key}, counts)) == [key], counts
        assert counts.to_dict() == {"tar_truncated": 1}
    assert sorted(read_images(shard, set(indexed))) == indexed


def test_random_bytes_and_empty_files_named_tar(tmp_path: Path):
    (tmp_path / "a.tar").write_bytes(np.random.default_rng(5).bytes(4096))   # block-aligned random bytes
    (tmp_path / "b.tar").write_bytes(b"")
    counts = SkipCounts()
    for shard in list_shards(str(tmp_path)):
        assert list(iter_images(shard, counts)) == []
    assert counts.to_dict() == {"not_a_tar": 1, "empty_tar": 1}


def test_every_skip_reason_is_described():
    for reason in ("not_a_tar", "empty_tar", "dangling_symlink", "not_regular_file", "changed", "unreadable_file"):
        assert reason in SKIP_REASONS


# ---------------------------------------------------------------- the hostile gallery, end to end


def _limits() -> None:   # the child may not read /dev/zero into memory without bound
    resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))


def test_hostile_gallery_builds_with_every_entry_counted(tmp_path: Path):
    galleries, num_images, expected = build_hostile(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"gallery": galleries, "encoders": ["test-tiny-timm"], "batch_size": 16,
                                   "crops": dataclasses.asdict(CROPS), "faiss": {"factory": "Flat"}}))
    out = tmp_path / "idx"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "curation" / "build_index.py"), "--config", str(cfg), "--out", str(out)]
    # a FIFO that is opened hangs the build, /dev/zero read grows without bound: both end in a failure here
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, preexec_fn=_limits)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / contract.MANIFEST_FILE).read_text())
    assert manifest["skipped"] == expected
    assert manifest["num_images"] == num_images
    by_shard = {s["name"]: s for s in manifest["shards"]}
    assert by_shard["b"]["num_images"] == 3 and by_shard["b"]["skipped"] == {}   # the gzip tar, whole
    assert by_shard["d"]["skipped"] == {"tar_truncated": 1}
    assert by_shard["p"]["skipped"] == {"corrupt": 1, "truncated": 1, "empty": 1, "not_image": 2,
                                        "bad_meta": 1, "dangling_symlink": 1, "not_regular_file": 2}
    summary = proc.stdout.strip().splitlines()[-1]
    assert f"skipped {sum(expected.values())} (" in summary and "not_regular_file 2" in summary
    # the 16-bit images are indexed as the gradients they are (first crop = the full image)
    rows = store.load_rows(out, "p")
    assert sorted({r.id for r in rows}) == ["p/hi16", "p/ok"]
    assert all(r.hash and len(r.hash) == 32 for r in rows)
    # a rerun reads the shards once more to check their bytes, and reuses every one
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, preexec_fn=_limits)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / contract.MANIFEST_FILE).read_text())["skipped"] == expected


def test_folder_reads_never_open_non_regular_files(tmp_path: Path, monkeypatch):
    galleries, _, _ = build_hostile(tmp_path)
    shard = next(s for s in list_shards(galleries) if s.name == "p")
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    counts = SkipCounts()
    digests: list[str] = []
    got = sorted(g.key for g in iter_images(shard, counts, on_digest=digests.append))
    assert got == ["hi16", "ok"]
    assert not [p for p in opened if Path(p).name in ("dangling.jpg", "fifo.jpg", "zero.jpg")]
    assert counts["dangling_symlink"] == 1 and counts["not_regular_file"] == 2
    assert digests == [shard_digest(shard)]   # hashed while read = hashed afterwards


# ---------------------------------------------------------------- a same-size image swapped in the middle


def _big_member_gallery(root: Path) -> Path:
    """One shard over 2 MiB: a large caption in the first and in the last sample, small images between."""
    root.mkdir(parents=True)
    path = root / "00000.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(5):
            members = [(f"k{i}.png", stored_png(class_member(i % 3, 700 + i).resize((32, 32))))]
            if i in (0, 4):
                members.append((f"k{i}.txt", b"x" * (1200 << 10)))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 0
                tf.addfile(info, io.BytesIO(data))
    assert path.stat().st_size > (2 << 20) + (300 << 10)
    return root


def test_same_size_image_swapped_mid_shard_is_noticed(tmp_path: Path):
    gallery = _big_member_gallery(tmp_path / "gallery")
    cfg = IndexConfig(gallery=str(gallery / "*.tar"), encoders=("test-tiny-timm",), crops=CROPS, batch_size=8,
                      faiss={"factory": "Flat"})
    out = tmp_path / "idx"
    build_gallery_index(cfg, out)
    rows = {r.id: r for r in store.load_rows(out, "00000")}
    old = store.load_features(out, "00000", "test-tiny-timm", mmap=False)
    new_png = stored_png(pattern(999, 32))
    with tarfile.open(gallery / "00000.tar") as tf:
        member = tf.getmember("k2.png")
        old_png = tf.extractfile(member).read()
    assert len(new_png) == len(old_png) and new_png != old_png
    assert rows["00000/k2"].hash == image_hash(old_png)
    replace_member(gallery / "00000.tar", "k2.png", new_png)

    with pytest.raises(FingerprintMismatch, match="00000"):   # not reused
        build_gallery_index(cfg, out)
    fresh = build_gallery_index(cfg, tmp_path / "idx2")   # and re-embedded where asked
    again = {r.id: r for r in store.load_rows(tmp_path / "idx2", "00000")}
    assert again["00000/k2"].hash == image_hash(new_png)
    feats = store.load_features(tmp_path / "idx2", "00000", "test-tiny-timm", mmap=False)
    order = [r.id for r in store.load_rows(out, "00000")]
    k2 = order.index("00000/k2")
    assert not np.allclose(feats[k2], old[k2])
    assert np.allclose(np.delete(feats, k2, 0), np.delete(old, k2, 0), atol=1e-3)
    assert fresh["num_images"] == 5
