"""The indexing stage end to end on a tiny gallery: manifest, embedding shards, multi-encoder
similarity, Local vs Ray executors, kill-then-rerun, resume and refusal by fingerprint, search."""
from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from index import store
from index.build import build_gallery_index
from index.config import IndexConfig
from index.core import contract
from index.core.atomic import FingerprintMismatch
from index.core.outdir import LOCK
from index.crops import CropConfig, CropRecipe
from index.encoders import EncoderSpec, resolve_encoders
from index.gallery_index import GalleryIndex
from jobs.executors import LocalExecutor

# shard -> (number of samples, index of a corrupt sample or None)
SHARDS = {"00000": (4, None), "00001": (5, 2), "00002": (3, None)}
CROPS = CropConfig(crops_per_image=3, size=64, keep_full_image=True)
NUM_IMAGES = sum(n - (bad is not None) for n, bad in SHARDS.values())


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 4 + seed * 30, yy * 3 + seed * 17, (xx * yy) // 8 + seed], -1)
    arr = ((base + rng.integers(0, 60, (h, w, 3))) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_gallery(root: Path) -> Path:
    """img2dataset-style tars: key.jpg + key.json; one corrupt JPEG in shard 00001."""
    root.mkdir(parents=True, exist_ok=True)
    seed = 0
    for shard, (n, bad) in SHARDS.items():
        with tarfile.open(root / f"{shard}.tar", "w") as tf:
            for i in range(n):
                key = f"{shard}{i:04d}"
                data = _jpeg(seed)
                seed += 1
                if i == bad:
                    data = data[:4] + bytes(len(data) - 4)  # JPEG signature, then zeros
                for name, payload in [(f"{key}.jpg", data), (f"{key}.json", json.dumps({"key": key}).encode())]:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return root


def config(gallery: Path, encoders: tuple[str, ...] = ("test-tiny-timm",), **kw: Any) -> IndexConfig:
    return IndexConfig(gallery=str(gallery / "*.tar"), encoders=encoders, crops=kw.pop("crops", CROPS),
                       batch_size=4, faiss={"factory": "auto", "shards_per_group": 2}, **kw)


def _without_timings(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in ("seconds", "timings")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def snapshot(root: Path) -> dict[str, Any]:
    """Every output file: bytes, or JSON without its timing fields. Temp leftovers are not outputs."""
    out: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            rel = str(p.relative_to(root))
            out[rel] = _without_timings(json.loads(p.read_text())) if p.suffix == ".json" else p.read_bytes()
    return out


class RecordingExecutor(LocalExecutor):
    """LocalExecutor that keeps the results, and optionally dies before task `die_at` of the first map."""

    def __init__(self, die_at: int | None = None):
        self.die_at = die_at
        self.results: list[list[Any]] = []

    def map(self, make_worker, tasks, desc="", **progress):
        worker = make_worker()
        out = []
        for i, t in enumerate(tasks):
            if i == self.die_at and not self.results:
                raise KeyboardInterrupt(f"killed before task {i}")
            out.append(worker(t))
        self.results.append(out)
        return out


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    return make_gallery(tmp_path_factory.mktemp("gallery"))


@pytest.fixture(scope="module")
def built(gallery, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("index")
    return out, build_gallery_index(config(gallery), out)


@pytest.fixture(scope="module")
def built_multi(gallery, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("index-multi")
    return out, build_gallery_index(config(gallery, ("test-tiny-timm", "test-tiny-clip")), out)


# ---------------------------------------------------------------- outputs

def test_manifest_counts(built):
    out, manifest = built
    on_disk = json.loads((out / contract.MANIFEST_FILE).read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert set(contract.INDEX_MANIFEST_KEYS) <= set(on_disk)
    assert on_disk["num_images"] == NUM_IMAGES == 11
    assert on_disk["num_vectors"] == NUM_IMAGES * CROPS.crops_per_image
    assert on_disk["skipped"] == {"corrupt": 1}
    assert [s["name"] for s in on_disk["shards"]] == list(SHARDS)
    assert [s["skipped"] for s in on_disk["shards"]] == [{}, {"corrupt": 1}, {}]
    assert [s["offset"] for s in on_disk["shards"]] == [0, 12, 24]
    assert [e["name"] for e in on_disk["encoders"]] == ["test-tiny-timm"]
    assert [EncoderSpec.from_dict(d) for d in on_disk["encoders"]] == resolve_encoders(["test-tiny-timm"])
    assert on_disk["index_factory"] == "Flat"
    assert on_disk["dim"] == 256
    assert [g["shards"] for g in on_disk["groups"]] == [["00000", "00001"], ["00002"]]
    assert sum(g["num_vectors"] for g in on_disk["groups"]) == on_disk["num_vectors"]
    assert on_disk["config"]["crops"] == CROPS.to_dict()


def test_embedding_shards_are_float16_normalised_with_their_rows(built):
    out, manifest = built
    for entry in manifest["shards"]:
        feats = store.load_features(out, entry["name"], "test-tiny-timm", mmap=False)
        rows = store.load_rows(out, entry["name"])
        assert feats.dtype == np.float16
        assert feats.shape == (entry["num_vectors"], 256) == (len(rows), 256)
        np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1.0, atol=2e-3)
        assert len({f.tobytes() for f in feats}) == len(feats)  # every crop is a different vector
        ids = sorted({r.id for r in rows})
        assert len(ids) == entry["num_images"]
        assert all(i.startswith(entry["name"] + "/") for i in ids)
        assert [r.crop for r in rows] == list(range(CROPS.crops_per_image)) * len(ids)
        assert all(r.recipe["full"] == (r.crop == 0) for r in rows)
        record = store.read_record(out, entry["name"])
        assert record["fingerprint"] == entry["fingerprint"]
        assert record["result"]["num_vectors"] == len(rows)


def test_multi_encoder_inner_product_is_mean_cosine(built_multi):
    out, manifest = built_multi
    names = ["test-tiny-timm", "test-tiny-clip"]
    assert [e["name"] for e in manifest["encoders"]] == names
    assert manifest["dim"] == 256 + 32
    shard = manifest["shards"][1]["name"]
    a, b = (store.load_features(out, shard, n, mmap=False).astype(np.float64) for n in names)
    mean_cos = ((a @ a.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(a, axis=1))
                + (b @ b.T) / np.outer(np.linalg.norm(b, axis=1), np.linalg.norm(b, axis=1))) / 2
    comb = store.combined(out, shard, names)
    assert comb.shape == (len(a), 288) and comb.dtype == np.float32
    np.testing.assert_allclose(comb @ comb.T, mean_cos, atol=2e-3)
    # ... and the FAISS index answers with those same scores
    scores, ids = GalleryIndex(out).search(comb[:3], k=5)
    local = ids - manifest["shards"][1]["offset"]
    assert ((local >= 0) & (local < len(a))).sum() >= 3  # each query finds itself at least
    for q in range(3):
        assert ids[q, 0] == manifest["shards"][1]["offset"] + q
        for s, i in zip(scores[q], local[q]):
            if 0 <= i < len(a):
                assert s == pytest.approx(mean_cos[q, i], abs=2e-3)


def test_search_equals_brute_force(built):
    out, manifest = built
    idx = GalleryIndex(out)
    vectors = np.concatenate([store.combined(out, s["name"], ["test-tiny-timm"]) for s in manifest["shards"]])
    assert len(vectors) == idx.num_vectors
    rng = np.random.default_rng(0)
    queries = np.concatenate([vectors[[0, 13, 30]], rng.standard_normal((5, vectors.shape[1]))]).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    k = 7
    scores, ids = idx.search(queries, k)
    brute = queries @ vectors.T
    for q in range(len(queries)):
        order = np.lexsort((np.arange(len(vectors)), -brute[q]))[:k]
        np.testing.assert_allclose(scores[q], brute[q, order], atol=1e-5)
        # ids agree except where two scores are too close to order reliably in float32
        gaps = np.diff(brute[q, order])
        stable = np.ones(k, bool)
        stable[:-1] &= np.abs(gaps) > 1e-5
        stable[1:] &= np.abs(gaps) > 1e-5
        assert np.array_equal(ids[q][stable], order[stable])
    rows = idx.rows(ids[:3, 0])
    assert [(r.id, r.crop) for r in rows] == [(r.id, r.crop) for r in
                                              [store.load_rows(out, "00000")[0], store.load_rows(out, "00001")[1],
                                               store.load_rows(out, "00002")[6]]]


# ---------------------------------------------------------------- resume and refusal

def test_kill_then_rerun_equals_uninterrupted_run(gallery, built, tmp_path):
    ref_dir, _ = built
    out = tmp_path / "idx"
    with pytest.raises(KeyboardInterrupt):
        build_gallery_index(config(gallery), out, RecordingExecutor(die_at=1))
    assert (store.shard_dir(out, "00000") / contract.DONE_FILE).is_file()
    assert not (out / contract.MANIFEST_FILE).exists()
    # what a kill in the middle of shard 00001's write leaves: a matrix cut short, a temp file, no done record
    partial = store.shard_dir(out, "00001")
    partial.mkdir(parents=True)
    full = store.features_path(ref_dir, "00001", "test-tiny-timm").read_bytes()
    store.features_path(out, "00001", "test-tiny-timm").write_bytes(full[: len(full) // 2])
    (partial / ".rows.jsonl.x1y2.tmp").write_text('{"id": "00001/0000')
    done_before = (store.shard_dir(out, "00000") / contract.DONE_FILE).stat().st_mtime_ns

    rerun = RecordingExecutor()
    build_gallery_index(config(gallery), out, rerun)
    embed_results = rerun.results[0]
    assert [r.reused for r in embed_results] == [True, False, False]
    assert (store.shard_dir(out, "00000") / contract.DONE_FILE).stat().st_mtime_ns == done_before
    assert snapshot(out) == snapshot(ref_dir)


def test_rerun_skips_finished_work(gallery, built, tmp_path):
    out = tmp_path / "idx"
    shutil.copytree(built[0], out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")
              if p.is_file() and p.name not in (contract.MANIFEST_FILE, LOCK)}   # the lock names its holder
    ex = RecordingExecutor()
    manifest = build_gallery_index(config(gallery), out, ex)
    embed_results, group_records = ex.results
    assert [r.shard for r in embed_results] == list(SHARDS)
    assert all(r.reused for r in embed_results)
    assert [r.to_dict() for r in embed_results] == [
        {**store.read_record(out, s)["result"], "reused": True} for s in SHARDS]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten
    assert _without_timings(manifest) == _without_timings(built[1])


@pytest.mark.parametrize("change", ["crops", "seed", "encoder", "gallery"])
def test_rerun_with_other_inputs_is_refused(gallery, built, tmp_path, change):
    out = tmp_path / "idx"
    shutil.copytree(built[0], out)
    g = gallery
    kw: dict[str, Any] = {}
    if change == "crops":
        kw["crops"] = dataclasses.replace(CROPS, crops_per_image=2)
    elif change == "seed":
        kw["seed"] = 1
    elif change == "encoder":
        kw["image_size"] = 96
    else:
        g = tmp_path / "gallery"
        shutil.copytree(gallery, g)
        with tarfile.open(g / "00000.tar", "a") as tf:  # one more sample in the first shard
            info = tarfile.TarInfo("extra.jpg")
            data = _jpeg(99)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    before = snapshot(out)
    with pytest.raises(FingerprintMismatch) as e:
        build_gallery_index(config(g, **kw), out)
    msg = str(e.value)
    assert str(store.shard_dir(out, "00000") / contract.DONE_FILE) in msg
    assert "different configuration" in msg and "new output directory" in msg
    assert snapshot(out) == before  # nothing overwritten


def _as_store_format_3(index: Path) -> None:
    """Lay a built index out as STORE_FORMAT 3 wrote it: each matrix beside its shard's row table, recipe
    ops as [name, magnitude] pairs, the format under its old name in the done records, none in the manifest."""
    manifest = json.loads((index / contract.MANIFEST_FILE).read_text())
    for s in manifest["shards"]:
        for e in manifest["encoders"]:
            (index / contract.vectors_file(e["name"], s["name"])).rename(
                index / contract.legacy_vectors_file(e["name"], s["name"]))
        d = store.shard_dir(index, s["name"])
        lines = []
        for line in (d / contract.ROWS_FILE).read_text().splitlines():
            row = json.loads(line)
            ops = [] if row["recipe"]["full"] else [[o["op"], o["magnitude"]] for o in row["recipe"]["ops"]]
            lines.append(json.dumps({**row, "recipe": {**row["recipe"], "ops": ops}}, sort_keys=True) + "\n")
        (d / contract.ROWS_FILE).write_text("".join(lines))
        np.save(d / contract.ROWS_OFFSETS_FILE, np.r_[0, np.cumsum([len(x.encode()) for x in lines])].astype(np.int64))
        record = json.loads((d / contract.DONE_FILE).read_text())
        record["rows_format"] = 3
        del record["store_format"]
        (d / contract.DONE_FILE).write_text(json.dumps(record))
    shutil.rmtree(index / contract.VECTORS_DIR)
    del manifest["store_format"]
    (index / contract.MANIFEST_FILE).write_text(json.dumps(manifest))


def test_an_index_of_the_earlier_layout_is_read_and_a_rerun_names_its_format(gallery, built, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(built[0], old)
    _as_store_format_3(old)
    for s in SHARDS:   # matrices where format 3 kept them, row tables with the older recipe form
        assert np.array_equal(store.load_features(old, s, "test-tiny-timm"),
                              store.load_features(built[0], s, "test-tiny-timm"))
    new_gi, old_gi = GalleryIndex(built[0]), GalleryIndex(old)
    gids = np.arange(old_gi.num_vectors)
    assert [(r.id, r.crop, r.loc, r.hash) for r in old_gi.rows(gids)] == \
        [(r.id, r.crop, r.loc, r.hash) for r in new_gi.rows(gids)]
    assert [CropRecipe.from_dict(r.recipe) for r in old_gi.rows(gids)] == \
        [CropRecipe.from_dict(r.recipe) for r in new_gi.rows(gids)]
    records = [contract.TransferRecord(key=f"k{i}", source_id=r.id, crop=r.crop, recipe=r.recipe).to_dict()["recipe"]
               for i, r in enumerate(old_gi.rows(gids))]
    assert records == [r.recipe for r in new_gi.rows(gids)], "a curated set from an old index is written typed"
    before = snapshot(old)
    with pytest.raises(FingerprintMismatch, match="embedding-store format 3") as e:
        build_gallery_index(config(gallery), old)
    assert f"writes format {contract.STORE_FORMAT}" in str(e.value) and "new output directory" in str(e.value)
    assert snapshot(old) == before   # refused before anything is written


# ---------------------------------------------------------------- executors

@pytest.mark.slow
def test_local_and_ray_executors_write_identical_files(gallery, built, tmp_path, local_ray):
    from jobs.executors import RayExecutor

    out = tmp_path / "idx-ray"
    manifest = build_gallery_index(config(gallery), out, RayExecutor(num_workers=2))
    ref_dir, ref_manifest = built
    assert _without_timings(manifest) == _without_timings(ref_manifest)
    files = snapshot(out)
    ref = snapshot(ref_dir)
    assert sorted(files) == sorted(ref)
    for name in ref:
        if name.endswith((".npy", ".jsonl", ".index")):
            assert files[name] == ref[name], f"{name} differs between Local and Ray executors"
    assert files == ref


def test_prefetch_changes_timing_only(gallery, built, tmp_path):
    """Decode in a background thread or inline: the same files, the same skip counts."""
    from index.embed import EmbedTask, Embedder, embed_shard
    from index.gallery import list_shards

    specs = tuple(resolve_encoders(["test-tiny-timm"]))
    shard = next(s for s in list_shards(str(gallery / "*.tar")) if s.name == "00001")
    results = {}
    for prefetch in (True, False):
        out = tmp_path / f"prefetch-{prefetch}"
        task = EmbedTask(shard=shard, out_dir=str(out), encoders=specs, crops=CROPS, batch_size=4)
        results[prefetch] = embed_shard(task, Embedder(specs, "cpu", prefetch=prefetch))
        for path in (lambda d: store.features_path(d, "00001", "test-tiny-timm"),
                     lambda d: store.shard_dir(d, "00001") / contract.ROWS_FILE):
            assert path(out).read_bytes() == path(built[0]).read_bytes()
    assert results[True].skipped == results[False].skipped == {"corrupt": 1}
    assert results[True].num_vectors == results[False].num_vectors == 12


def test_decode_error_in_background_thread_reaches_the_caller(gallery, tmp_path, monkeypatch):
    import index.embed as embed
    from index.gallery import list_shards

    def broken(*a, **k):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(embed, "materialize", broken)
    specs = tuple(resolve_encoders(["test-tiny-timm"]))
    shard = list_shards(str(gallery / "*.tar"))[0]
    task = embed.EmbedTask(shard=shard, out_dir=str(tmp_path), encoders=specs, crops=CROPS, batch_size=4)
    with pytest.raises(RuntimeError, match="decoder exploded"):
        embed.embed_shard(task, embed.Embedder(specs, "cpu", prefetch=True))
    assert not (store.shard_dir(tmp_path, shard.name) / contract.DONE_FILE).exists()


# ---------------------------------------------------------------- one quantizer for all groups

def test_ivf_groups_share_one_trained_quantizer(gallery, tmp_path):
    import faiss

    from index import faiss_io
    from index.config import FaissConfig

    cfg = dataclasses.replace(config(gallery), faiss=FaissConfig(factory="IVF4,Flat", shards_per_group=2, nprobe=4))
    out = tmp_path / "ivf"
    manifest = build_gallery_index(cfg, out)
    assert manifest["shared_quantizer"] is True and manifest["index_factory"] == "IVF4,Flat"
    assert manifest["trained_index"]["num_train"] == manifest["num_vectors"]   # 50 * 4 > 33: all of them
    trained = faiss_io.load_index(out / contract.TRAINED_INDEX_FILE)
    groups = [faiss_io.load_index(out / g["file"]) for g in manifest["groups"]]   # kept alive: faiss views
    cents = [faiss.extract_index_ivf(g).quantizer.reconstruct_n(0, 4) for g in groups]
    assert len(cents) == 2
    for c in cents:
        np.testing.assert_array_equal(c, faiss.extract_index_ivf(trained).quantizer.reconstruct_n(0, 4))
    # nprobe = nlist: every list is scanned, so each vector finds itself first
    vectors = np.concatenate([store.combined(out, s["name"], ["test-tiny-timm"]) for s in manifest["shards"]])
    for gi in (GalleryIndex(out), GalleryIndex(out, executor=LocalExecutor(), search_task_bytes=1)):
        scores, ids = gi.search(vectors, 3, nprobe=4)
        np.testing.assert_array_equal(ids[:, 0], np.arange(len(vectors)))
    # a rerun reuses the trained index and every group
    before = {p: p.stat().st_mtime_ns for p in (out / contract.FAISS_DIR).iterdir()}
    again = build_gallery_index(cfg, out)
    assert _without_timings(again) == _without_timings(manifest)
    assert {p: p.stat().st_mtime_ns for p in before} == before
