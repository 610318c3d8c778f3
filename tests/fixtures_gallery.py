"""A tiny deterministic gallery + class-per-folder task for end-to-end curation tests.

Images are smooth colour patterns (a few plane waves per channel). A task class is a base pattern;
its members are the base blended with another pattern (`CLASS_BLEND`), so members of a class look
alike while classes and distractors stay apart. The gallery (WebDataset tars, ``key.png|jpg`` +
``key.json``) holds:

    00000.tar  related pool: `POOL_PER_CLASS` new members of every task class
    00001.tar  planted items: a pool image, its re-encoded JPEG copy and a resized copy (duplicates);
               copies of task images (the test image of one class unchanged, a non-query train
               image as a JPEG, a query image resized) that decontamination must remove; a
               look-alike of a task image (blended with another pattern) that it must keep
    00002.tar  unrelated distractors

`build_fixture(root)` writes everything and returns a `Fixture` naming the planted ids.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

CLASSES = ("cls_a", "cls_b", "cls_c")
TASK_PER_CLASS = 6        # 1 held-out test image per class, 3 queries, 2 other train images
POOL_PER_CLASS = 6
DISTRACTORS = 24
CLASS_BLEND = 0.4         # weight of the per-image pattern in a class member
LOOK_ALIKE_BLEND = 0.3    # weight of the foreign pattern in the look-alike
SIZE = 96
SHOTS = 3


def pattern(seed: int, size: int = SIZE) -> Image.Image:
    """A smooth colour image: a few random plane waves per channel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    for c in range(3):
        for _ in range(4):
            fx, fy = rng.uniform(0.5, 6, 2)
            img[..., c] += np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 6.28)) * rng.uniform(.3, 1)
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return Image.fromarray(img.astype(np.uint8))


def class_member(label: int, seed: int) -> Image.Image:
    return Image.blend(pattern(100 + label), pattern(seed), CLASS_BLEND)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def resized(im: Image.Image) -> Image.Image:
    return im.resize((61, 61), Image.BILINEAR)


def write_tar(path: Path, samples: list[tuple[str, str, bytes]]) -> Path:
    """samples: (key, ext, image bytes); each gets a ``key.json`` too, as img2dataset writes."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, ext, data in samples:
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(payload), 0
                tf.addfile(info, io.BytesIO(payload))
    return path


@dataclass
class Fixture:
    task: Path                              # class-per-folder task dir (every image is a reference)
    gallery: Path                           # folder of tars
    query_set: str                          # folder:<task>:<k>shot
    duplicates: list[str]                   # gallery ids of one duplicate cluster (original first)
    leaks: dict[str, str]                   # gallery id -> query-set id of the task image it copies
    look_alike: tuple[str, str]             # (gallery id, query-set id of the task image it resembles)
    distractors: list[str] = field(default_factory=list)
    num_images: int = 0


def build_task(root: Path) -> Path:
    task = root / "task"
    for label, cls in enumerate(CLASSES):
        (task / cls).mkdir(parents=True, exist_ok=True)
        for i in range(TASK_PER_CLASS):
            class_member(label, 1000 + 100 * label + i).save(task / cls / f"img_{i}.png")
    return task


def build_fixture(root: str | Path, seed: int = 0) -> Fixture:
    """Task folder + gallery tars under `root`; planted copies use the query draw of `seed`."""
    from curation.querysets import get_query_set

    root = Path(root)
    task = build_task(root)
    name = f"folder:{task}:{SHOTS}shot"
    qs = get_query_set(name, seed=seed)
    queries = {q.id for q in qs.queries}
    test = {t.id for t in qs.test}
    by_class: dict[int, list] = {}
    for r in qs.references:
        by_class.setdefault(r.label, []).append(r)
    test_b = next(r for r in by_class[1] if r.id in test)
    train_a = next(r for r in by_class[0] if r.id not in test and r.id not in queries)
    query_c = next(r for r in by_class[2] if r.id in queries)
    alike_src = next(r for r in by_class[1] if r.id not in test and r.id not in queries)

    gallery = root / "gallery"
    gallery.mkdir(parents=True, exist_ok=True)
    pool = [(f"pool_{CLASSES[c]}_{i}", "png", png_bytes(class_member(c, 5000 + 100 * c + i)))
            for c in range(len(CLASSES)) for i in range(POOL_PER_CLASS)]
    write_tar(gallery / "00000.tar", pool)

    dup = class_member(0, 7777)
    planted = [
        ("dup", "png", png_bytes(dup)),
        ("dup_jpg", "jpg", jpeg_bytes(dup, 90)),
        ("dup_res", "png", png_bytes(resized(dup))),
        ("leak_test", "png", png_bytes(test_b.load())),
        ("leak_train", "jpg", jpeg_bytes(train_a.load(), 90)),
        ("leak_query", "png", png_bytes(resized(query_c.load()))),
        ("alike", "png", png_bytes(Image.blend(alike_src.load(), pattern(31337), LOOK_ALIKE_BLEND))),
    ]
    write_tar(gallery / "00001.tar", planted)
    distractors = [(f"dist_{i:02d}", "png", png_bytes(pattern(9000 + i))) for i in range(DISTRACTORS)]
    write_tar(gallery / "00002.tar", distractors)
    return Fixture(
        task=task, gallery=gallery, query_set=name,
        duplicates=["00001/dup", "00001/dup_jpg", "00001/dup_res"],
        leaks={"00001/leak_test": test_b.id, "00001/leak_train": train_a.id, "00001/leak_query": query_c.id},
        look_alike=("00001/alike", alike_src.id),
        distractors=[f"00002/{k}" for k, _, _ in distractors],
        num_images=len(pool) + len(planted) + len(distractors))


def write_index_config(path: Path, gallery: str, encoders: list[str], crop_size: int = 64,
                       crops_per_image: int = 2, image_size: int | None = None) -> Path:
    cfg = {"gallery": gallery, "encoders": encoders,
           "crops": {"crops_per_image": crops_per_image, "size": crop_size, "keep_full_image": True,
                     "randaugment": True, "num_ops": 2, "magnitude": 9},
           "seed": 0, "batch_size": 64, "executor": "local", "faiss": {"factory": "auto"}}
    if image_size is not None:
        cfg["image_size"] = image_size
    path.write_text(yaml.safe_dump(cfg))
    return path


# The indexed world test_curate and test_ecosystem_readers curate from (conftest.gallery_world): the fixture
# indexed with the random-init tiny encoder, small crops; and the curated set in small shards both read
# (conftest.curated_in_small_shards)
WORLD_ENCODER = "test-tiny-timm"
WORLD_CROP = 64
WORLD_CROPS_PER_IMAGE = 2
SMALL_SHARDS_SIZE = 30      # items curated
SMALL_SHARD_SIZE = 7        # samples per transfer tar: several tars


@dataclass
class IndexedWorld:
    root: Path                              # where the fixture, the index and the runs' outputs live
    fx: Fixture
    index: Path
    cache: Path                             # curate's --cache-dir (calibrations)


def build_index(root: Path, gallery: Path, encoders: list[str], name: str, crop_size: int = WORLD_CROP,
                crops_per_image: int = WORLD_CROPS_PER_IMAGE) -> Path:
    """`build-index` (in-process) of `gallery` into ``root/name``, its config in ``root/name.yaml``."""
    from curation.build_index import main as build_index_main

    cfg = write_index_config(root / f"{name}.yaml", str(gallery / "*.tar"), encoders, crop_size=crop_size,
                             crops_per_image=crops_per_image)
    assert build_index_main(["--config", str(cfg), "--out", str(root / name)]) == 0
    return root / name


def build_indexed_world(root: str | Path) -> IndexedWorld:
    root = Path(root)
    fx = build_fixture(root)
    return IndexedWorld(root=root, fx=fx, index=build_index(root, fx.gallery, [WORLD_ENCODER], "idx"),
                        cache=root / "cache")


def curate_argv(w: IndexedWorld, out: Path, size: int, *extra: str, seed: int = 0, index: Path | None = None) -> list[str]:
    return ["--queries", w.fx.query_set, "--index", str(index or w.index), "--size", str(size),
            "--out", str(out), "--cache-dir", str(w.cache), "--seed", str(seed), *extra]


def build_many_shards(root: str | Path, shards: int = 12, per_shard: int = 5, size: int = SIZE) -> Path:
    """A gallery of many small tar shards (``00000.tar`` ...): every image a distinct pattern, stored as
    PNG, JPEG or WebP in turn, each with its ``key.json``. For tests that count the bytes read."""
    gallery = Path(root)
    gallery.mkdir(parents=True, exist_ok=True)
    encoders = {"png": png_bytes, "jpg": jpeg_bytes, "webp": webp_bytes}
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            ext = ("png", "jpg", "webp")[(s + i) % 3]
            samples.append((f"img_{s:03d}_{i:02d}", ext, encoders[ext](pattern(20000 + s * 100 + i, size))))
        write_tar(gallery / f"{s:05d}.tar", samples)
    return gallery


def webp_bytes(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "WEBP", quality=quality)
    return buf.getvalue()


def curated_outputs(out: Path) -> dict[str, bytes]:
    """Every output of a curated directory a rerun must reproduce, byte for byte: its files (not the
    run's bookkeeping: owner marker and lock), the write stage's report thumbnails, and the manifest
    without timings or config.out."""
    from index.core import contract
    from index.core.outdir import LOCK, MARKER

    files = {p.name: p.read_bytes() for p in sorted(out.iterdir())
             if p.is_file() and p.name not in (contract.MANIFEST_FILE, MARKER, LOCK)}
    # the report's timings section, like the manifest's timings, says how this run spent its time
    files[contract.REPORT_FILE] = re.sub(rb'<section id="timings">.*?</section>', b"",
                                         files[contract.REPORT_FILE], flags=re.S)
    files[contract.REPORT_THUMBS_FILE] = (out / contract.REPORT_THUMBS_FILE).read_bytes()
    m = json.loads((out / contract.MANIFEST_FILE).read_text())
    m.pop("timings")
    m["config"].pop("out")
    files[contract.MANIFEST_FILE] = json.dumps(m, sort_keys=True).encode()
    return files
