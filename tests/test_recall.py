"""Recall of approximate search: the estimator against exact search, the operating points an IVF build
records, the point a target chooses, exact re-ranking from the stored vectors, and curate's estimate."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from search_groups import ENCODER, mixture, write_embeddings  # noqa: E402

from index import recall, store  # noqa: E402
from index.build import index_embeddings  # noqa: E402
from index.config import FaissConfig  # noqa: E402
from index.core import contract  # noqa: E402
from index.core.errors import ConfigError  # noqa: E402
from index.core.executor import LocalExecutor  # noqa: E402
from index.gallery_index import GalleryIndex  # noqa: E402
from index.search import exact_search, rerank  # noqa: E402

DIM = 16
SPEC = {"name": ENCODER, "family": "test", "arch": "none", "embed_dim": DIM, "image_size": 0,
        "mean": [0.0] * 3, "std": [1.0] * 3}


def _true_recall(got: np.ndarray, want: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(got, want)]))


@pytest.fixture(scope="module")
def ivf(tmp_path_factory):
    """An IVF-PQ index of 24,000 unit vectors in 12 shards, 6 groups, its operating points measured
    against exact search over 2 of its groups."""
    root = tmp_path_factory.mktemp("ivf")
    x = mixture(24_000, DIM, seed=1)
    entries = write_embeddings(root, x, 12)
    cfg = FaissConfig(factory="IVF64,PQ4", shards_per_group=2, recall_sample_vectors=8_000, recall_queries=60)
    manifest = index_embeddings(root, entries, [SPEC], cfg, 0, LocalExecutor())
    stored = np.concatenate([store.load_features(root, e["name"], ENCODER) for e in entries]).astype(np.float32)
    return root, manifest, stored, cfg, entries


def test_with_every_group_sampled_the_estimate_is_recall_exactly():
    rng = np.random.default_rng(0)
    exact_ids = np.stack([rng.permutation(1000)[:50] for _ in range(8)])
    exact_scores = -np.sort(-rng.random((8, 50)), axis=1).astype(np.float32)
    got_ids = exact_ids.copy()
    got_scores = exact_scores.copy()
    for q in range(8):   # query q misses q of its 20 best: replaced by worse items
        miss = rng.choice(20, size=q, replace=False)
        got_ids[q, miss] = 5000 + np.arange(q)
        got_scores[q, miss] = -1.0
    order = np.argsort(-got_scores, axis=1, kind="stable")
    got = (np.take_along_axis(got_scores, order, 1), np.take_along_axis(got_ids, order, 1))
    est = recall.estimate_recall(got, (exact_scores, exact_ids), 1.0, 20)
    np.testing.assert_allclose(est, [(20 - q) / 20 for q in range(8)])
    # a query's own row is left out of both lists
    own = exact_ids[:, 0]
    est = recall.estimate_recall(got, (exact_scores, exact_ids), 1.0, 19, exclude=own)
    assert est[0] == 1.0


def test_bad_fraction_is_refused():
    with pytest.raises(ValueError, match="fraction"):
        recall.estimate_recall((np.zeros((1, 2)), np.zeros((1, 2), np.int64)),
                               (np.zeros((1, 2)), np.zeros((1, 2), np.int64)), 0.0, 2)


def test_sample_groups_takes_whole_groups_within_the_budget():
    sizes = [100] * 10
    picked = recall.sample_groups(sizes, 350, seed=3)
    assert len(picked) == 3 and picked == sorted(set(picked))
    assert recall.sample_groups(sizes, 10**9) == list(range(10))
    assert len(recall.sample_groups([500, 500], 10)) == 1   # at least one group


def test_choose_point_takes_the_fastest_meeting_the_target_else_the_best():
    pts = [{"nprobe": p, "rerank": r, "recall": {"10": rc, "100": rc - 0.05},
            "seconds_per_query": {"10": p * (1 + r) * 1e-4, "100": p * (1 + r) * 2e-4}}
           for p, r, rc in [(8, 0, 0.80), (16, 0, 0.90), (32, 0, 0.97), (16, 2, 0.99), (64, 0, 0.999)]]
    best = recall.choose_point(pts, 0.95, 10)
    assert (best["nprobe"], best["rerank"]) == (32, 0) and "fastest" in best["why"]
    deep = recall.choose_point(pts, 0.95, 100)       # recall@100 is 0.05 lower: (16, 2) is 0.94
    assert (deep["nprobe"], deep["rerank"]) == (64, 0)
    assert recall.choose_point(pts, 0.95, 50)["k"] == 50   # depth 50 reads the points at 100
    none = recall.choose_point(pts, 0.9999, 10)
    assert none["nprobe"] == 64 and "no measured point" in none["why"]


def test_rerank_gives_the_exact_top_k_of_the_candidates():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((500, 8)).astype(np.float32)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    cand = np.stack([rng.choice(500, 60, replace=False) for _ in range(4)])
    cand[0, -5:] = -1   # padding
    s, i = rerank(q, cand, lambda ids: base[ids], 10)
    for r in range(4):
        c = cand[r][cand[r] >= 0]
        want = c[np.argsort(-(base[c] @ q[r]), kind="stable")[:10]]
        np.testing.assert_array_equal(np.sort(i[r]), np.sort(want))
        np.testing.assert_allclose(s[r], base[i[r]] @ q[r], rtol=1e-5)


def test_vectors_at_reads_the_stored_rows(ivf):
    root, manifest, stored, _, entries = ivf
    ids = np.array([23_999, 0, 5, 5, 12_000, 1_999, 2_000])
    np.testing.assert_array_equal(store.vectors_at(root, entries, [ENCODER], ids), stored[ids])
    with pytest.raises(IndexError):
        store.vectors_at(root, entries, [ENCODER], np.array([24_000]))


def test_an_ivf_build_records_operating_points_and_runs_at_the_chosen_one(ivf):
    root, manifest, stored, cfg, _ = ivf
    points = manifest["recall"]["points"]
    sample = manifest["recall"]["sample"]
    assert sample["groups"] == 2 and sample["of_groups"] == 6 and sample["queries"] == 60
    assert {p["rerank"] for p in points} == set(recall.RERANKS)      # PQ codes: re-ranking is measured
    assert all(set(p["recall"]) == {"10", "100", "1000"} for p in points)
    point = manifest["operating_point"]
    assert (manifest["nprobe"], manifest["rerank"]) == (point["nprobe"], point["rerank"])
    assert point["k"] == cfg.recall_k and point["target"] == 0.95
    if point["recall"] >= 0.95:
        assert "fastest" in point["why"]
    # recall rises with nprobe (each rerank sweep), within the noise of 60 queries
    for rr in recall.RERANKS:
        sweep = [p["recall"]["100"] for p in points if p["rerank"] == rr]
        assert sweep[-1] >= sweep[0]
    # the recorded recall at the point in force is what exact search says, within 0.05
    gi = GalleryIndex(root)
    q = mixture(100, DIM, seed=9)
    s, i = gi.search(q, 100)
    _, want = exact_search(q, [(0, stored)], 100)
    assert abs(_true_recall(i, want, 100) - point["recall"]) <= 0.05
    # re-ranked scores are exact
    if manifest["rerank"]:
        np.testing.assert_allclose(s[:, :5], np.einsum("qkd,qd->qk", stored[i[:, :5]], q), rtol=1e-4, atol=1e-5)


def test_a_rerun_reads_the_measured_points_back(ivf):
    root, manifest, _, cfg, entries = ivf
    path = root / contract.OPERATING_POINTS_FILE
    before = path.stat().st_mtime_ns
    again = index_embeddings(root, entries, [SPEC], cfg, 0, LocalExecutor())
    assert path.stat().st_mtime_ns == before
    assert again["operating_point"] == manifest["operating_point"]


def test_a_fixed_nprobe_is_kept_and_said_to_be_the_users(ivf):
    root, manifest, _, cfg, entries = ivf
    point = recall.point_for(manifest, 100, nprobe=2, rerank=0)
    assert point["nprobe"] == 2 and point["why"].startswith("set by the user")
    measured = [p for p in manifest["recall"]["points"] if p["nprobe"] == 2 and p["rerank"] == 0][0]
    assert point["recall"] == measured["recall"]["100"]
    # a lower target at curate's depth picks a cheaper point than the build's
    cheap = recall.point_for(manifest, 10, target=0.5)
    assert cheap["seconds_per_query"] <= recall.point_for(manifest, 10, target=0.99)["seconds_per_query"]


def test_curate_estimate_is_within_005_of_the_true_recall(ivf):
    """estimate_run over 2 of 6 groups against the recall exact search over everything gives."""
    root, _, stored, _, _ = ivf
    gi = GalleryIndex(root)
    q = mixture(80, DIM, seed=11)
    for nprobe, rr, k in [(2, 0, 50), (4, 2, 200), (8, 0, 200)]:
        s, i = gi.search(q, k, nprobe=nprobe, rerank=rr)
        _, want = exact_search(q, [(0, stored)], k)
        est = recall.estimate_run(gi, q, s, i, k, budget=8_000, seed=5, rerank=rr, target=0.95)
        assert est["sample"]["groups"] == 2 and est["sample"]["fraction"] < 0.5
        assert abs(est["recall"] - _true_recall(i, want, k)) <= 0.05, (nprobe, rr, k, est)
        full = recall.estimate_run(gi, q, s, i, k, budget=10**9, seed=5, rerank=rr)
        assert full["recall"] == pytest.approx(_true_recall(i, want, k), abs=1e-3)


def test_auto_under_a_small_budget_builds_fast_scan_codes_that_reranking_makes_exact(tmp_path):
    """`factory: auto` where IVF-Flat does not fit: 4-bit fast-scan PQ, its candidates re-ranked from the
    stored vectors; the point the build chooses meets the target on fresh queries against exact search,
    and without re-ranking the same nprobe falls short of it."""
    dim = 64
    x = mixture(24_000, dim, seed=3)
    entries = write_embeddings(tmp_path, x, 12)
    cfg = FaissConfig(factory="auto", memory_budget_gb=600_000 / 2**30, flat_threshold=0, shards_per_group=2,
                      recall_sample_vectors=8_000, recall_queries=60)
    manifest = index_embeddings(tmp_path, entries, [{**SPEC, "embed_dim": dim}], cfg, 0, LocalExecutor())
    assert manifest["index_factory"] == "IVF512,PQ32x4fs"     # IVF-Flat needs 4000 * 264 bytes a group
    point = manifest["operating_point"]
    assert point["recall"] >= 0.95 and point["rerank"] > 0, point
    gi = GalleryIndex(tmp_path)
    q = mixture(100, dim, seed=9)
    _, want = exact_search(q, [(0, x)], 100)
    _, got = gi.search(q, 100)
    assert _true_recall(got, want, 100) >= 0.9
    _, raw = gi.search(q, 100, rerank=0)
    assert _true_recall(raw, want, 100) < _true_recall(got, want, 100)


def test_flat_indexes_are_exact_without_a_sample(tmp_path):
    x = mixture(2_000, DIM, seed=2)
    entries = write_embeddings(tmp_path, x, 2)
    manifest = index_embeddings(tmp_path, entries, [SPEC], FaissConfig(factory="Flat"), 0, LocalExecutor())
    assert manifest["operating_point"]["recall"] == 1.0 and manifest["recall"] is None
    gi = GalleryIndex(tmp_path)
    s, i = gi.search(x[:3], 5)
    est = recall.estimate_run(gi, x[:3], s, i, 5, budget=10)
    assert est["recall"] == 1.0 and est["sample"] is None


@pytest.mark.parametrize("field,value", [("recall_target", 1.5), ("recall_target", 0), ("rerank", -1),
                                          ("recall_k", 0), ("nprobe", 0)])
def test_bad_recall_settings_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        FaissConfig(**{field: value})
