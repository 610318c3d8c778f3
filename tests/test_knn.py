"""FAISS build, files and search (index.knn, index.faiss_io, index.search) against numpy brute force.

Tied scores are made on purpose: small-integer vectors give exact float32 inner products whatever
the summation order, so "equal" means bit-equal and the (higher score, smaller id) tie-break is
checked for real.
"""
from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np
import pytest

from index import faiss_io, knn
from index.search import RunningTopK, ShardedIndex, exact_search
from index.topk import EMPTY_ID, merge_topk, select_topk


def brute_force(queries: np.ndarray, vectors: np.ndarray, k: int, ids: np.ndarray | None = None):
    """Full matmul + stable lexsort by (-score, id); padded with (-inf, -1)."""
    ids = np.arange(len(vectors), dtype=np.int64) if ids is None else ids
    scores = queries.astype(np.float32) @ vectors.astype(np.float32).T
    out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(queries), k), -1, dtype=np.int64)
    for r in range(len(queries)):
        order = np.lexsort((ids, -scores[r]))[:k]
        out_s[r, :len(order)] = scores[r, order]
        out_i[r, :len(order)] = ids[order]
    return out_s, out_i


def tied_data(n: int, dim: int, nq: int, seed: int):
    """Small-integer vectors: many exact ties, exact float32 (and float16) arithmetic."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    q = rng.integers(-2, 3, size=(nq, dim)).astype(np.float32)
    return x, q


def split_blocks(x: np.ndarray, cuts: list[int], dtype=np.float16):
    edges = [0, *cuts, len(x)]
    return [(a, x[a:b].astype(dtype)) for a, b in zip(edges[:-1], edges[1:])]


def clustered(n: int, dim: int, clusters: int, seed: int, noise: float = 0.3):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def flat_index(x: np.ndarray, ids: np.ndarray):
    return knn.build_index([(ids, x)], "Flat", x.shape[1], None)


# ---------------------------------------------------------------- exact search

@pytest.mark.parametrize("seed", range(6))
def test_exact_search_equals_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n, dim, nq = int(rng.integers(50, 3000)), 8, int(rng.integers(1, 12))
    x, q = tied_data(n, dim, nq, seed)
    cuts = sorted(int(c) for c in rng.integers(0, n, 3))
    want_s, want_i = brute_force(q, x, k := int(rng.integers(1, 120)))
    for block_rows in (7, 100, 4096):
        s, i = exact_search(q, split_blocks(x, cuts), k, block_rows=block_rows)
        np.testing.assert_array_equal(i, want_i)
        np.testing.assert_array_equal(s, want_s)
    assert (np.diff(want_s, axis=1) <= 0).all()
    # the data really has ties at the cut: otherwise the test would not test the tie-break
    assert any(len(np.unique(row)) < len(row) for row in want_s)


def test_exact_search_float32_blocks_out_of_order_offsets():
    x, q = tied_data(500, 6, 4, seed=11)
    blocks = [(300, x[300:]), (0, x[:120]), (120, x[120:300])]
    want = brute_force(q, x, 25)
    got = exact_search(q, blocks, 25, block_rows=50)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_exact_search_all_equal_scores_keeps_smallest_ids():
    x = np.ones((300, 4), dtype=np.float16)
    q = np.ones((3, 4), dtype=np.float32)
    s, i = exact_search(q, [(1000, x[:100]), (1100, x[100:])], 10, block_rows=32)
    assert (s == 4).all()
    np.testing.assert_array_equal(i, np.tile(np.arange(1000, 1010), (3, 1)))


def test_exact_search_pads_when_k_exceeds_vectors():
    x, q = tied_data(13, 5, 3, seed=2)
    s, i = exact_search(q, split_blocks(x, [5]), 20)
    want_s, want_i = brute_force(q, x, 20)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_array_equal(s, want_s)
    assert (i[:, 13:] == -1).all() and np.isneginf(s[:, 13:]).all()
    empty = exact_search(q, [], 4)
    assert (empty[1] == -1).all() and np.isneginf(empty[0]).all()


def test_exact_search_float_data_matches_brute_force_ids():
    x = clustered(5000, 32, 20, seed=3)
    q = x[::500] + 0.01
    want_s, want_i = brute_force(q, x, 64)
    s, i = exact_search(q, [(0, x[:2500]), (2500, x[2500:])], 64, block_rows=1024)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-6)


def test_exact_search_rejects_bad_input():
    x, q = tied_data(10, 4, 2, seed=0)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        exact_search(q, [(0, x)], 0)
    with pytest.raises(ValueError, match=r"expected \[n, 4\]"):
        exact_search(q, [(0, x[:, :3])], 3)
    with pytest.raises(ValueError, match="NaN"):
        exact_search(q * np.nan, [(0, x)], 3)
    bad = x.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        exact_search(q, [(0, bad)], 3)
    with pytest.raises(ValueError, match="offsets"):
        exact_search(q, [(-1, x)], 3)


def test_select_topk_exact_on_ties_property():
    rng = np.random.default_rng(5)
    for _ in range(50):
        q, n, k = int(rng.integers(1, 6)), int(rng.integers(1, 40)), int(rng.integers(1, 45))
        scores = rng.integers(0, 4, size=(q, n)).astype(np.float32)
        ids = np.stack([rng.permutation(1000)[:n] for _ in range(q)]).astype(np.int64)
        s, i = select_topk(scores, ids, k)
        for r in range(q):
            order = np.lexsort((ids[r], -scores[r]))[:k]
            assert sorted(i[r][i[r] != EMPTY_ID].tolist()) == sorted(ids[r, order].tolist())


def test_running_topk_rejects_wrong_width():
    with pytest.raises(ValueError, match="expected 3 queries"):
        RunningTopK(3, 2).add(np.zeros((4, 2), dtype=np.float32), 0)


# ---------------------------------------------------------------- flat index and the group merge

def test_flat_index_equals_brute_force_with_ties():
    x, q = tied_data(2000, 8, 30, seed=7)
    index = flat_index(x, np.arange(len(x), dtype=np.int64))
    s, i = ShardedIndex([index]).search(q, 40)
    want_s, want_i = brute_force(q, x, 40)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_array_equal(s, want_s)


def test_merge_across_groups_equals_single_index():
    x, q = tied_data(3000, 8, 25, seed=8)
    ids = np.arange(len(x), dtype=np.int64)
    single = ShardedIndex([flat_index(x, ids)]).search(q, 50)
    cuts = [0, 700, 1900, 3000]
    groups = [flat_index(x[a:b], ids[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    sharded = ShardedIndex(groups)
    assert sharded.ntotal == len(x)
    merged = sharded.search(q, 50)
    np.testing.assert_array_equal(merged[1], single[1])
    np.testing.assert_array_equal(merged[0], single[0])
    exact = exact_search(q, split_blocks(x, cuts[1:-1], np.float32), 50)
    np.testing.assert_array_equal(merged[1], exact[1])


def test_sharded_index_pads_when_k_exceeds_vectors():
    x, q = tied_data(30, 4, 2, seed=9)
    ids = np.arange(30, dtype=np.int64)
    sharded = ShardedIndex([flat_index(x[:10], ids[:10]), flat_index(x[10:], ids[10:])])
    s, i = sharded.search(q, 3000)   # above faiss's GPU cap of 2048 too
    assert s.shape == (2, 3000) and i.dtype == np.int64
    want_s, want_i = brute_force(q, x, 3000)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_array_equal(s, want_s)


def test_merge_topk_treats_negative_ids_as_empty():
    a = (np.array([[3.0, 1.0, -3e38]], np.float32), np.array([[5, 7, -1]]))
    b = (np.array([[3.0, 2.0]], np.float32), np.array([[2, 9]]))
    s, i = merge_topk([a, b], 6)
    np.testing.assert_array_equal(i, [[2, 5, 9, 7, -1, -1]])
    np.testing.assert_array_equal(s, np.array([[3, 3, 2, 1, -np.inf, -np.inf]], np.float32))


def test_sharded_index_rejects_mismatches():
    with pytest.raises(ValueError, match="inner-product"):
        ShardedIndex([faiss.IndexFlatL2(4)])
    with pytest.raises(ValueError, match="one dimension"):
        ShardedIndex([faiss.IndexFlatIP(4), faiss.IndexFlatIP(5)])
    with pytest.raises(ValueError, match="dim 3"):
        ShardedIndex([faiss.IndexFlatIP(4)]).search(np.ones((1, 3), np.float32), 1)


# ---------------------------------------------------------------- IVF build

def test_ivf_recall_at_10_on_clustered_data():
    x = clustered(20_000, 64, 200, seed=1)
    ids = np.arange(len(x), dtype=np.int64) + 5_000   # global ids with a shard offset
    factory = f"IVF{knn.ivf_nlist(len(x))},Flat"
    train = knn.training_sample([(0, x)], len(x), knn.training_size(factory), seed=0)
    blocks = [(ids[a:a + 4096], x[a:a + 4096]) for a in range(0, len(x), 4096)]
    index = knn.build_index(blocks, factory, 64, train)
    assert index.ntotal == len(x) and faiss.extract_index_ivf(index).nprobe == knn.DEFAULT_NPROBE
    q = clustered(200, 64, 200, seed=2)
    _, got = ShardedIndex([index]).search(q, 10)
    _, want = brute_force(q, x, 10, ids=ids)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
    assert recall >= 0.9, recall
    _, got1 = ShardedIndex([index]).search(q, 10, nprobe=1)
    assert np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got1, want)]) < recall   # nprobe is used


@pytest.mark.slow
def test_two_builds_are_identical():
    x = clustered(12_000, 16, 50, seed=4)
    ids = np.arange(len(x), dtype=np.int64)
    for factory in ("IVF64,Flat", "IVF16,PQ4x4"):
        train = knn.training_sample([(0, x[:6000]), (6000, x[6000:])], len(x), 10_000, seed=3)
        a, b = (knn.build_index([(ids[:5000], x[:5000]), (ids[5000:], x[5000:])], factory, 16, train,
                                seed=3) for _ in range(2))
        assert faiss.serialize_index(a).tobytes() == faiss.serialize_index(b).tobytes(), factory
        q = x[:20]
        ra, rb = ShardedIndex([a]).search(q, 15), ShardedIndex([b]).search(q, 15)
        np.testing.assert_array_equal(ra[1], rb[1])


def test_build_needs_training_sample_and_checks_blocks():
    x = clustered(1000, 16, 5, seed=0)
    ids = np.arange(1000, dtype=np.int64)
    with pytest.raises(ValueError, match="needs training"):
        knn.build_index([(ids, x)], "IVF8,Flat", 16, None)
    with pytest.raises(ValueError, match=r"vectors \[n, 16\]"):
        knn.build_index([(ids, x[:, :8])], "Flat", 16, None)
    with pytest.raises(ValueError, match="invalid faiss factory"):
        knn.build_index([(ids, x)], "NotAnIndex", 16, None)


# ---------------------------------------------------------------- factory rule

GiB = 2**30


@pytest.mark.parametrize("n, dim, budget, want", [
    (1_000, 512, GiB, "Flat"),
    (199_999, 512, GiB, "Flat"),
    (200_000, 512, GiB, "IVF2048,Flat"),               # 4*sqrt(2e5)=1789 -> 2048
    (1_000_000, 512, 8 * GiB, "IVF4096,Flat"),         # 4000 -> 4096
    (1_000_000, 512, 1 * GiB, "IVF4096,PQ256x4fs"),    # 2 GB flat does not fit; 4-bit codes, m <= dim/2
    (1_000_000, 512, 60 * 2**20, "IVF4096,PQ64x4fs"),  # 1e6*(32+8) + centroids + padding < 60 MiB
    (100_000_000, 768, 16 * GiB, "IVF32768,PQ256x4fs"),
    (50_000, 512, 10 * 2**20, "IVF1024,PQ128x4fs"),    # small n but flat over budget: PQ
    (10**9, 768, 64 * GiB, "IVF131072_HNSW32,PQ96x4fs"),   # very many lists: an HNSW coarse quantizer
    (1_000_000, 75, 100 * 2**20, "IVF4096,PQ25"),      # no even divisor of an odd dim: 8-bit codes
])
def test_choose_factory_rule(n, dim, budget, want):
    assert knn.choose_factory(n, dim, budget) == want


def test_choose_factory_properties_and_override():
    for n in (1, 10, 100, 1000, 39 * 64, 10**5, 10**7):
        nlist = knn.ivf_nlist(n)
        assert nlist >= 1 and nlist & (nlist - 1) == 0
        assert nlist == 1 or n / nlist >= knn.MIN_POINTS_PER_LIST
        assert nlist <= 2 ** round(math.log2(4 * math.sqrt(n)))
    assert knn.choose_factory(150_000, 64, GiB, flat_threshold=100_000).startswith("IVF")
    assert knn.choose_factory(10**9, 64, 1, factory="IVF256,PQ16") == "IVF256,PQ16"
    assert knn.choose_factory(10, 64, GiB, factory="auto") == "Flat"
    with pytest.raises(ValueError, match="too small"):
        knn.choose_factory(10**6, 512, 2**20)
    with pytest.raises(ValueError, match="invalid faiss factory"):
        knn.choose_factory(10, 64, GiB, factory="IVF,Nope")
    m = int(knn.choose_factory(10**6, 96, 100 * 2**20).split("PQ")[1].removesuffix("x4fs"))
    assert 96 % m == 0 and m % 2 == 0 and m <= 96 // 2


def test_training_helpers():
    assert not knn.needs_training("Flat")
    assert knn.needs_training("IVF1024,Flat") and knn.needs_training("IVF256,PQ12")
    assert knn.training_size("Flat") == 0
    assert knn.training_size("IVF1024,Flat") == 50 * 1024
    assert knn.training_size("IVF16,PQ8") == knn.PQ_TRAIN
    x = np.arange(200 * 3, dtype=np.float32).reshape(200, 3)
    blocks = [(100, x[:70]), (170, x[70:])]
    a = knn.training_sample(blocks, 200, 50, seed=1)
    b = knn.training_sample(blocks, 200, 50, seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (50, 3) and len(np.unique(a[:, 0])) == 50
    assert set(a[:, 0].tolist()) <= set(x[:, 0].tolist())
    assert knn.training_sample(blocks, 200, 10**6).shape == (200, 3)
    with pytest.raises(ValueError, match="expected 300"):
        knn.training_sample(blocks, 300, 10)


# ---------------------------------------------------------------- combine, save, load

def test_combine_features_inner_product_is_mean_cosine():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 5)).astype(np.float32)
    b = rng.standard_normal((6, 3)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    c = knn.combine_features([a.astype(np.float16), b])
    assert c.dtype == np.float32 and c.shape == (6, 8)
    want = (a.astype(np.float16).astype(np.float32) @ a.astype(np.float16).astype(np.float32).T + b @ b.T) / 2
    np.testing.assert_allclose(c @ c.T, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(knn.combine_features([a]), a)
    with pytest.raises(ValueError, match="row counts"):
        knn.combine_features([a, b[:4]])
    with pytest.raises(ValueError, match="got none"):
        knn.combine_features([])


@pytest.mark.parametrize("factory", ["Flat", "IVF32,Flat"])
def test_save_load_round_trip(tmp_path: Path, factory):
    x = clustered(3000, 16, 10, seed=6)
    ids = np.arange(3000, dtype=np.int64) * 3
    train = x if knn.needs_training(factory) else None
    index = knn.build_index([(ids, x)], factory, 16, train, nprobe=4)
    path = tmp_path / "faiss" / "group-000.index"
    faiss_io.save_index(index, path)
    assert [p.name for p in path.parent.iterdir()] == ["group-000.index"]   # no temp file left
    q = x[:7]
    want = ShardedIndex([index]).search(q, 12)
    for mmap in (False, True):
        loaded = faiss_io.load_index(path, mmap=mmap)
        assert loaded.ntotal == 3000
        got = ShardedIndex([loaded]).search(q, 12)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    if factory != "Flat":
        assert faiss.extract_index_ivf(faiss_io.load_index(path)).nprobe == 4
    with pytest.raises(FileNotFoundError):
        faiss_io.load_index(tmp_path / "missing.index")


def test_sharded_index_from_dir(tmp_path: Path):
    x, q = tied_data(400, 6, 5, seed=12)
    ids = np.arange(400, dtype=np.int64)
    groups = []
    for g, (a, b) in enumerate([(0, 150), (150, 400)]):
        faiss_io.save_index(flat_index(x[a:b], ids[a:b]), tmp_path / f"faiss/group-{g:03d}.index")
        groups.append({"file": f"faiss/group-{g:03d}.index"})
    (tmp_path / "manifest.json").write_text(__import__("json").dumps({"groups": groups, "nprobe": 8}))
    sharded = ShardedIndex.from_dir(tmp_path)
    assert sharded.nprobe == 8 and sharded.ntotal == 400
    np.testing.assert_array_equal(sharded.search(q, 30)[1], brute_force(q, x, 30)[1])
