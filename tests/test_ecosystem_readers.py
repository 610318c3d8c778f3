"""A curated set and an index read by the tools users have, not by this project's own readers.

Hugging Face `datasets` (its webdataset builder), `wids.ShardListDataset` and `webdataset` with a torch
DataLoader read the transfer and query shards; clip-retrieval's `embedding-reader` reads each encoder's
matrices and stock `faiss.read_index` every group file. Each must agree with the tars read byte for byte
(tarfile + PIL + json) and with what the manifests say. The code that reads is the README's ("Reading a
curated set and an index with other tools"). The index and the curated set are built once per session from
`fixtures_gallery` (conftest.gallery_world: build-index; conftest.curated_in_small_shards: curate with small
shards so there are several transfer tars), as test_curate checks them.
"""
from __future__ import annotations

import functools
import glob
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from index import store
from index.core import contract

from fixtures_gallery import SMALL_SHARD_SIZE, SMALL_SHARDS_SIZE, WORLD_CROP, WORLD_ENCODER

pytestmark = pytest.mark.slow

ENCODER = WORLD_ENCODER
CROP = WORLD_CROP
SIZE = SMALL_SHARDS_SIZE
SHARD_SIZE = SMALL_SHARD_SIZE     # several transfer tars, so each of two DataLoader workers reads some


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_per_module):
    """Tiny models gain nothing from intra-op threads (conftest.one_thread_per_module)."""


@pytest.fixture(scope="module")
def built(gallery_world, curated_in_small_shards) -> tuple[Path, Path]:
    """(index directory, curated directory)."""
    curated, manifest = curated_in_small_shards
    assert [e["name"] for e in _manifest(gallery_world.index)["encoders"]] == [ENCODER]
    assert manifest["config"]["index"] == str(gallery_world.index) and manifest["config"]["size"] == SIZE
    assert manifest["config"]["shard_size"] == SHARD_SIZE
    return gallery_world.index, curated


def _manifest(d: Path) -> dict[str, Any]:
    return json.loads((d / contract.MANIFEST_FILE).read_text())


def _tar_samples(path: Path) -> list[dict[str, bytes]]:
    """The samples of a WebDataset tar, in order, read with tarfile: {"__key__", member ext: bytes}."""
    samples: list[dict[str, Any]] = []
    with tarfile.open(path) as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = tf.extractfile(m).read()
    return samples


def _pixels(image: Image.Image | bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else image
    return np.asarray(im.convert("RGB"))


def _expected(curated: Path, kind: str) -> dict[str, dict[str, Any]]:
    """key -> {"json": dict, "image": pixels, "cls"?: int} of every sample of `kind` ("transfer" or
    "queries"), from the tars the manifest's shardlist names, after checking the list against them."""
    shardlist = _manifest(curated)["shardlist"][kind]
    out: dict[str, dict[str, Any]] = {}
    fields = contract.TRANSFER_SAMPLE_FIELDS if kind == "transfer" else contract.QUERY_SAMPLE_FIELDS
    for entry in shardlist:
        samples = _tar_samples(curated / entry["url"])
        assert len(samples) == entry["nsamples"], entry
        for s in samples:
            assert set(s) == {"__key__", *fields}, s["__key__"]
            image = s["jpg"] if kind == "transfer" else s["png"]
            out[s["__key__"]] = {"json": json.loads(s["json"]), "image": _pixels(image)}
            if kind == "queries":
                out[s["__key__"]]["cls"] = int(s["cls"])
    assert len(out) == sum(e["nsamples"] for e in shardlist)
    return out


def _urls(curated: Path, kind: str) -> list[str]:
    return [str(curated / e["url"]) for e in _manifest(curated)["shardlist"][kind]]


def _types(value: Any, path: str, into: dict[str, set[str]]) -> None:
    """The JSON type at every path of a value (list elements at ``path[]``)."""
    into.setdefault(path, set()).add(type(value).__name__)
    if isinstance(value, dict):
        for k, v in value.items():
            _types(v, f"{path}.{k}", into)
    elif isinstance(value, list):
        for v in value:
            _types(v, f"{path}[]", into)


# ---------------------------------------------------------------- what the shards hold


def test_every_sample_json_has_one_type_per_field(built):
    """What any Arrow reader needs: per kind, the same keys in every sample, every path of one JSON
    type (no null, no list mixing types), and no empty list (datasets types a list from its elements
    in the first five samples)."""
    index, curated = built
    manifest = _manifest(curated)
    assert manifest["format"] == contract.CURATED_FORMAT
    assert [e["url"] for e in manifest["shardlist"]["transfer"]] == manifest["shards"]
    assert len(manifest["shards"]) == -(-SIZE // SHARD_SIZE)
    transfer, queries = _expected(curated, "transfer"), _expected(curated, "queries")
    assert len(transfer) == manifest["counts"]["written"] == SIZE
    assert len(queries) == manifest["query_set"]["num_queries"]
    for kind, samples, fields in (("transfer", transfer, contract.TRANSFER_JSON_FIELDS),
                                  ("queries", queries, contract.QUERY_JSON_FIELDS)):
        types: dict[str, set[str]] = {}
        for key, s in samples.items():
            assert sorted(s["json"]) == sorted(fields), (kind, key)
            _types(s["json"], "", types)
        mixed = {p: t for p, t in types.items() if len(t) > 1 or "NoneType" in t}
        assert not mixed, (kind, mixed)
    ops = [s["json"]["recipe"]["ops"] for s in transfer.values()]
    assert all(ops) and all(sorted(op) == ["magnitude", "op"] for o in ops for op in o)
    assert {s["json"]["recipe"]["full"] for s in transfer.values()} == {True, False}, \
        "the set mixes full-image crops (no ops: NO_OP) and RandAugment crops"
    assert any(o == [contract.NO_OP] for o in ops) and any(o != [contract.NO_OP] for o in ops)
    assert all(sorted(s["json"]["recipe"]) == sorted(contract.RECIPE_FIELDS) for s in transfer.values())
    for key, s in transfer.items():
        assert s["json"]["key"] == key and s["image"].shape == (CROP, CROP, 3)
    classes = json.loads((curated / contract.QUERIES_DRAW_FILE).read_text())["classes"]
    for s in queries.values():
        assert s["cls"] == s["json"]["label"] and s["json"]["class_name"] == classes[s["cls"]]


# ---------------------------------------------------------------- Hugging Face datasets


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    """datasets with no hub access and its cache in tmp_path; returns the cache directory."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import datasets
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):   # read at import, which may have been earlier
        if hasattr(datasets.config, name):
            monkeypatch.setattr(datasets.config, name, True)
    return str(tmp_path / "hf-cache")


@pytest.mark.parametrize("kind", ["transfer", "queries"])
def test_hugging_face_datasets_loads_the_shards(built, hf_offline, kind):
    from datasets import load_dataset

    _, curated = built
    want = _expected(curated, kind)
    files = sorted(glob.glob(f"{curated}/{kind}-*.tar"))
    assert files == _urls(curated, kind)
    ds = load_dataset("webdataset", data_files=files, split="train", cache_dir=hf_offline)
    assert ds.num_rows == len(want)
    image = "jpg" if kind == "transfer" else "png"
    assert set(ds.column_names) == {image, "json", *(["cls"] if kind == "queries" else []), "__key__", "__url__"}
    for row in ds:
        w = want[row["__key__"]]
        assert row["json"] == w["json"]
        assert np.array_equal(_pixels(row[image]), w["image"])
        if kind == "queries":
            assert row["cls"] == w["cls"]
    assert sorted(ds["__key__"]) == sorted(want)


# ---------------------------------------------------------------- wids


@pytest.mark.parametrize("kind", ["transfer", "queries"])
def test_wids_reads_the_shards_by_the_manifest_shardlist(built, tmp_path, kind):
    import wids
    from wids.wids_decode import default_decoder

    _, curated = built
    want = _expected(curated, kind)
    shards = [{"url": str(curated / e["url"]), "nsamples": e["nsamples"]}
              for e in _manifest(curated)["shardlist"][kind]]
    ds = wids.ShardListDataset(shards, cache_dir=str(tmp_path / "wids"),
                               transformations=functools.partial(default_decoder, format="PIL"))
    assert len(ds) == len(want)
    image = ".jpg" if kind == "transfer" else ".png"
    keys = []
    for i in range(len(ds)):
        s = ds[i]
        w = want[s["__key__"]]
        keys.append(s["__key__"])
        assert s[".json"] == w["json"]
        assert np.array_equal(_pixels(s[image]), w["image"])
        if kind == "queries":
            assert int(s[".cls"]) == w["cls"]
    assert sorted(keys) == sorted(want)


# ---------------------------------------------------------------- webdataset + DataLoader


@pytest.mark.parametrize("kind", ["transfer", "queries"])
def test_webdataset_with_a_two_worker_dataloader(built, kind):
    _, curated = built
    want = _expected(curated, kind)
    image = "jpg" if kind == "transfer" else "png"
    # each worker reads its own shards (split_by_worker); the query set is one tar, so one worker reads none
    dataset = (wds.WebDataset(_urls(curated, kind), shardshuffle=False, empty_check=False)
               .decode("pil").to_tuple("__key__", image, "json"))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    got = {}
    for key, img, meta in loader:
        assert key not in got, f"{key} read twice"
        got[key] = (img, meta)
    assert sorted(got) == sorted(want)
    for key, (img, meta) in got.items():
        assert meta == want[key]["json"] and np.array_equal(_pixels(img), want[key]["image"])


# ---------------------------------------------------------------- the index


def test_embedding_reader_reads_each_encoders_matrices(built):
    from embedding_reader import EmbeddingReader

    index, _ = built
    manifest = _manifest(index)
    assert manifest["store_format"] == contract.STORE_FORMAT
    names = sorted(s["name"] for s in manifest["shards"] if s["num_vectors"])   # the reader skips empty files
    for spec in manifest["encoders"]:
        folder = index / contract.vectors_dir(spec["name"])
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s['name']}.npy" for s in manifest["shards"])
        reader = EmbeddingReader(str(folder), file_format="npy")
        assert reader.count == manifest["num_vectors"] and reader.dimension == spec["embed_dim"]
        parts = [emb for emb, _ in reader(batch_size=40, start=0, end=reader.count, show_progress=False)]
        got = np.concatenate(parts)
        # the reader orders files by name and hands back float32 of the stored float16: exact
        want = np.concatenate([store.load_features(index, n, spec["name"]) for n in names]).astype(np.float32)
        assert got.dtype == np.float32 and np.array_equal(got, want)


def test_stock_faiss_reads_every_group(built):
    index, _ = built
    manifest = _manifest(index)
    assert manifest["groups"] and manifest["index_factory"] == "Flat"
    offsets = {s["name"]: (s["offset"], s["num_vectors"]) for s in manifest["shards"]}
    encoders = [e["name"] for e in manifest["encoders"]]
    for group in manifest["groups"]:
        idx = faiss.read_index(str(index / group["file"]))
        assert idx.ntotal == group["num_vectors"] and idx.d == manifest["dim"]
        assert idx.metric_type == faiss.METRIC_INNER_PRODUCT
        # a Flat group is an IndexIDMap over the combined vectors, with the manifest's global ids
        ids = faiss.vector_to_array(faiss.downcast_index(idx).id_map)
        want_ids = np.concatenate([np.arange(o, o + n) for o, n in (offsets[s] for s in group["shards"])])
        assert np.array_equal(np.sort(ids), want_ids)
        vectors = faiss.downcast_index(faiss.downcast_index(idx).index).reconstruct_n(0, idx.ntotal)
        want = np.concatenate([store.combined(index, s, encoders) for s in group["shards"]])
        order = np.argsort(ids)
        np.testing.assert_allclose(vectors[order], want, rtol=0, atol=1e-6)
