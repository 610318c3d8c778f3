"""Exact search in torch (block GEMM + top-k) against index.search.exact_search: the same ids and
scores, ties and k beyond faiss GPU's 2,048 included. Runs on CPU; the CUDA case where CUDA is."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from index.search import GPU_MAX_K, exact_search
from index.topk import same_lists
from index.torch_search import select_topk, torch_exact_search


def _tied(n: int, dim: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Values on a 1/8 grid: every GEMM is exact in float32 whatever the summation order, and
    scores tie often (ties must break by the smaller id)."""
    rng = np.random.default_rng(seed)
    x = (rng.integers(-3, 4, (n, dim)) / 8).astype(np.float16)
    q = (rng.integers(-3, 4, (nq, dim)) / 4).astype(np.float32)
    return x, q


def _blocks(x: np.ndarray, sizes: list[int]):
    out, a = [], 0
    for s in sizes:
        out.append((a, x[a:a + s]))
        a += s
    return out


@pytest.mark.parametrize("k", [1, 7, 100, GPU_MAX_K + 1, 5000, 30000])
def test_identical_to_exact_search_with_ties(k):
    x, q = _tied(24000, 24, 9)
    ref = exact_search(q, _blocks(x, [10000, 14000]), k)
    got = torch_exact_search(q, _blocks(x, [10000, 14000]), k, device="cpu", block_rows=3072)
    assert np.array_equal(got[1], ref[1]) and np.array_equal(got[0], ref[0])
    assert k == 1 or (np.diff(ref[0], axis=1) == 0).any()  # the case has ties inside the lists


def test_id_arrays_and_padding():
    x, q = _tied(500, 16, 4, seed=1)
    ids = np.random.default_rng(2).permutation(10_000)[:500].astype(np.int64)
    ref = exact_search(q, _blocks(x, [500]), 50)  # reference ids are row numbers; map them
    got = torch_exact_search(q, [(ids, x)], 50, device="cpu")
    ref_by_id = exact_search(q, [(0, x)], 600)
    assert got[1].shape == (4, 50) and ref[1].shape == (4, 50)
    for r in range(4):  # same set of scores; ties broken by the mapped ids
        assert np.array_equal(np.sort(got[0][r]), np.sort(ref[0][r]))
    padded = torch_exact_search(q, [(ids, x)], 600, device="cpu")
    assert (padded[1][:, 500:] == -1).all() and np.isneginf(padded[0][:, 500:]).all()
    assert np.array_equal(np.sort(padded[1][:, :500], axis=1), np.tile(np.sort(ids), (4, 1)))
    assert np.array_equal(padded[0], ref_by_id[0])


def test_random_unit_vectors_agree():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((60000, 48)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(len(x), 20)] + 0.01 * rng.standard_normal((20, 48)).astype(np.float32)
    ref = exact_search(q, [(0, x.astype(np.float16))], 3000)
    got = torch_exact_search(q, [(0, x.astype(np.float16))], 3000, device="cpu")
    np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-5)
    assert (got[1] == ref[1]).mean() > 0.999


def test_select_topk_breaks_ties_by_id():
    s = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5]])
    ids = torch.tensor([[9, 8, 3, 5, 1]])
    vals, top = select_topk(s, ids, 2)
    assert sorted(top[0].tolist()) == [3, 5] and vals.tolist() == [[2.0, 2.0]]


def test_bad_input_is_refused():
    x, q = _tied(100, 8, 2)
    with pytest.raises(ValueError, match="k must be"):
        torch_exact_search(q, [(0, x)], 0, device="cpu")
    with pytest.raises(ValueError, match="vectors"):
        torch_exact_search(q, [(0, x[:, :4])], 3, device="cpu")
    bad = x.astype(np.float32)
    bad[5, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        torch_exact_search(q, [(0, bad)], 3, device="cpu")


def test_flat_groups_use_it_when_cuda_is_present(monkeypatch):
    """ShardedIndex's flat branch goes through torch_exact_search when CUDA is present."""
    faiss = pytest.importorskip("faiss")
    import index.search as search
    from index.search import ShardedIndex

    x, q = _tied(3000, 16, 5)
    flat = faiss.IndexIDMap(faiss.IndexFlatIP(16))
    flat.add_with_ids(x.astype(np.float32), np.arange(3000, dtype=np.int64))
    calls = []

    def on_cpu(queries, blocks, k, device="cuda", block_rows=None):
        calls.append(device)
        return torch_exact_search(queries, blocks, k, device="cpu", block_rows=block_rows)

    ref = ShardedIndex([flat]).search(q, 2500)
    monkeypatch.setattr(search, "cuda_available", lambda: True)
    monkeypatch.setattr(search, "torch_exact_search", on_cpu)
    got = ShardedIndex([flat]).search(q, 2500)
    assert calls == ["cuda"]
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


def test_ivf_stays_on_cpu_without_faiss_gpu():
    faiss = pytest.importorskip("faiss")
    from index.faiss_gpu import gpu_available, ivf_to_gpu

    flat = faiss.IndexFlatIP(8)
    assert ivf_to_gpu(flat) is flat  # never moved: flat groups are searched in torch
    if not gpu_available():
        ivf = faiss.index_factory(8, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
        assert ivf_to_gpu(ivf) is ivf


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k", [10, 5000])
def test_cuda_identical_to_exact_search_with_ties(k):
    x, q = _tied(50000, 32, 16)
    ref = exact_search(q, [(0, x)], k)
    got = torch_exact_search(q, [(0, x)], k, device="cuda", block_rows=8192)
    assert np.array_equal(got[1], ref[1]) and np.array_equal(got[0], ref[0])


def test_same_lists_tolerates_the_last_bits_and_reordered_ties():
    scores = np.array([[0.9, 0.8, 0.8, 0.8, 0.5, 0.4, 0.4]], np.float32)
    ids = np.array([[1, 2, 3, 4, 5, 6, 7]])
    nudged = scores + np.array([[1e-7, 0, -1e-7, 1e-7, 0, 0, 0]], np.float32)
    swapped = np.array([[1, 4, 2, 3, 5, 9, 6]])     # a tie reordered; the last run continues past k
    assert same_lists((scores, ids), (nudged, swapped), 1e-5)
    assert not same_lists((scores, ids), (nudged, swapped), 0.0)   # no tolerance: the nudges count
    assert not same_lists((scores, ids), (scores, np.array([[1, 2, 3, 5, 4, 6, 7]])), 1e-5)  # 4 and 5 differ
    assert not same_lists((scores, ids), (scores + 1e-3, ids), 1e-5)
