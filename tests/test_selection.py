"""Selection strategies: hand-computed cases and properties over random galleries."""
from __future__ import annotations

import numpy as np
import pytest

from curation.selection import (PROMPT_TEMPLATES, SELECTORS, SearchCache, Selection, SelectionInput, best_matches,
                                class_prompts, class_text_queries, exclude, query_balanced, random_select,
                                select_with_search)
from index.core.registry import UnknownNameError


def lists(rows: list[list[tuple[int, float]]], k: int | None = None):
    """[(id, score), ...] per query -> (scores, ids) padded with -1 to width k."""
    k = k or max(len(r) for r in rows)
    ids = np.full((len(rows), k), -1, np.int64)
    scores = np.full((len(rows), k), -np.inf, np.float32)
    for q, row in enumerate(rows):
        for r, (i, s) in enumerate(row):
            ids[q, r], scores[q, r] = i, s
    return scores, ids


def hits_of(sel: Selection) -> dict[int, list[tuple[int, int, float]]]:
    return {int(i): sel.hits(j) for j, i in enumerate(sel.ids)}


# ---------------------------------------------------------------- query_balanced, by hand


def test_exact_union_needs_no_drop():
    s, i = lists([[(1, .9), (2, .8), (3, .7)], [(2, .95), (4, .85), (5, .6)]])
    sel = query_balanced(SelectionInput(s, i), 3, seed=0)
    # U(1) = {1, 2}, U(2) = {1, 2, 4}: k' = 2 exactly, ordered by best score
    assert sel.k == 2 and sel.ids.tolist() == [2, 1, 4]
    assert not sel.needs_deeper and not sel.exhausted
    assert hits_of(sel) == {2: [(1, 0, pytest.approx(.95)), (0, 1, pytest.approx(.8))],
                            1: [(0, 0, pytest.approx(.9))], 4: [(1, 1, pytest.approx(.85))]}


def test_drop_removes_only_unheld_items():
    # column 1 holds 11 twice (q0, q1) and 14 once (q2); n = 4 needs one item gone
    s, i = lists([[(10, .9), (11, .8)], [(12, .9), (11, .7)], [(13, .9), (14, .6)]])
    outcomes = set()
    for seed in range(40):
        sel = query_balanced(SelectionInput(s, i), 4, seed)
        assert len(sel) == 4 and sel.k == 2
        got = frozenset(sel.ids.tolist())
        assert got in ({10, 11, 12, 13}, {10, 12, 13, 14})
        walk = np.random.default_rng(seed).permutation([0, 1, 2]).tolist()
        if got == {10, 12, 13, 14}:  # 11 goes only once both its holders are dropped
            assert walk.index(2) > max(walk.index(0), walk.index(1))
            assert hits_of(sel)[14] == [(2, 1, pytest.approx(.6))]
        else:                        # 14 dropped; 11 stays through whichever holder is kept
            assert walk.index(2) < max(walk.index(0), walk.index(1))
            kept_11 = [q for q, _, _ in hits_of(sel)[11]]
            assert kept_11 and all(walk.index(q) > walk.index(2) for q in kept_11)
        outcomes.add(got)
    assert len(outcomes) == 2, "different seeds must be able to drop different queries"


def test_item_seen_earlier_is_never_dropped():
    # 2 is q1's 2nd neighbour but q0's 1st: dropping q1's k'-th hit removes nothing
    s, i = lists([[(2, .9), (3, .8)], [(1, .95), (2, .7)]])
    for seed in range(10):
        sel = query_balanced(SelectionInput(s, i), 2, seed)
        assert sorted(sel.ids.tolist()) == [1, 2] and sel.k == 1


def test_ties_break_by_id():
    s, i = lists([[(7, .9), (3, .9), (1, .5)]])
    sel = query_balanced(SelectionInput(s, i), 1, seed=0)
    assert sel.ids.tolist() == [3]
    s2, i2 = lists([[(5, .9)], [(2, .9)]])
    assert best_matches(SelectionInput(s2, i2), 2, 0).ids.tolist() == [2, 5]


def test_gallery_exhausted_returns_all():
    s, i = lists([[(1, .9), (2, .8)], [(2, .7)]], k=3)
    sel = query_balanced(SelectionInput(s, i), 5, seed=0)
    assert sel.exhausted and not sel.needs_deeper
    assert sorted(sel.ids.tolist()) == [1, 2]
    assert "exhausted" in sel.message and "5" in sel.message
    # no padding, but every gallery item already seen
    s, i = lists([[(0, .9), (1, .8)], [(1, .9), (0, .1)]])
    sel = query_balanced(SelectionInput(s, i, num_gallery=2), 3, seed=0)
    assert sel.exhausted and len(sel) == 2


def test_empty_lists():
    none = SelectionInput(np.full((2, 3), -np.inf, np.float32), np.full((2, 3), -1))
    sel = query_balanced(none, 3, 0)
    assert sel.exhausted and len(sel) == 0 and sel.hit_offsets.tolist() == [0]
    zero_depth = SelectionInput(np.zeros((2, 0), np.float32), np.zeros((2, 0), np.int64))
    sel = query_balanced(zero_depth, 3, 0)
    assert sel.needs_deeper and sel.suggested_k == 2


def test_needs_deeper_when_depth_is_the_limit():
    s, i = lists([[(1, .9), (2, .8)], [(3, .9), (4, .8)]])
    sel = query_balanced(SelectionInput(s, i), 5, seed=0)
    assert sel.needs_deeper and not sel.exhausted and sel.suggested_k == 4
    # one row padded, the other cut: a deeper search can still help
    s, i = lists([[(1, .9)], [(3, .9), (4, .8)]], k=2)
    assert query_balanced(SelectionInput(s, i), 4, seed=0).needs_deeper


def test_invalid_lists_raise():
    s, i = lists([[(1, .5), (2, .9)]])
    with pytest.raises(ValueError, match="sorted"):
        SelectionInput(s, i)
    with pytest.raises(ValueError, match="twice"):
        SelectionInput(*lists([[(1, .9), (1, .5)]]))
    with pytest.raises(ValueError, match="padding"):
        SelectionInput(np.array([[.9, .5]], np.float32), np.array([[-1, 3]]))
    with pytest.raises(ValueError, match="positive"):
        query_balanced(SelectionInput(*lists([[(1, .9)]])), 0, 0)


# ---------------------------------------------------------------- exclude / backfill


def test_exclude_shifts_and_keeps_padding_meaning():
    s, i = lists([[(1, .9), (2, .8), (3, .7)], [(4, .9), (5, .8), (6, .7)], [(2, .5)]], k=3)
    s2, i2 = exclude(s, i, [2, 5])
    # cut rows keep 2 each -> width 2; the exhausted row keeps its padding
    assert i2.tolist() == [[1, 3], [4, 6], [-1, -1]]
    assert s2[0].tolist() == pytest.approx([.9, .7])
    inp = SelectionInput(s, i, removed=[2, 5])
    assert inp.ids.tolist() == i2.tolist()
    assert inp.complete_rows.tolist() == [False, False, True]


class Gallery:
    """A random gallery with exact brute-force search; scores rounded to force ties."""

    def __init__(self, rng: np.random.Generator, num_queries: int, size: int):
        self.size = size
        self.sim = np.round(rng.uniform(-1, 1, (num_queries, size)), 1).astype(np.float32)
        order = np.lexsort((np.broadcast_to(np.arange(size), self.sim.shape), -self.sim), axis=1)
        self.full_ids = order.astype(np.int64)
        self.full_scores = np.take_along_axis(self.sim, order, axis=1)
        self.calls: list[int] = []
        self.shuffle = np.random.default_rng(99)

    def search(self, k: int):
        self.calls.append(k)
        q = self.sim.shape[0]
        ids = np.full((q, k), -1, np.int64)
        scores = np.full((q, k), -np.inf, np.float32)
        w = min(k, self.size)
        # shuffle tied entries as an index might; SelectionInput must restore (score, id) order
        noise = self.shuffle.random((q, w))
        order = np.lexsort((noise, -self.full_scores[:, :w]), axis=1)
        ids[:, :w] = np.take_along_axis(self.full_ids[:, :w], order, axis=1)
        scores[:, :w] = np.take_along_axis(self.full_scores[:, :w], order, axis=1)
        return scores, ids


def union_size(ids: np.ndarray, k: int) -> int:
    part = ids[:, :k]
    return int(np.unique(part[part >= 0]).size)


def test_backfill_reaches_exactly_n_without_removed():
    g = Gallery(np.random.default_rng(3), 6, 200)
    first = select_with_search(g.search, 40, seed=1, k0=2)
    removed = first.ids[::3]
    again = select_with_search(g.search, 40, seed=1, k0=2, removed=removed, num_gallery=200)
    assert len(again) == 40 and not np.isin(again.ids, removed).any()
    # same as query-balanced selection on the gallery without the removed items, searched fully
    keep = np.flatnonzero(~np.isin(np.arange(200), removed))
    sim = g.sim[:, keep]
    order = np.lexsort((np.broadcast_to(keep, sim.shape), -sim), axis=1)
    ref = query_balanced(SelectionInput(np.take_along_axis(sim, order, axis=1), keep[order]), 40, 1)
    assert sorted(ref.ids.tolist()) == sorted(again.ids.tolist())


# ---------------------------------------------------------------- properties


def literal_query_balanced(ids: np.ndarray, n: int, seed: int) -> tuple[int, set[int]]:
    """The rule as written, step by step (slow reference)."""
    k = ids.shape[1]
    kp = next(k_ for k_ in range(1, k + 1) if union_size(ids, k_) >= n)
    c = kp - 1
    hits = {(q, r) for q in range(ids.shape[0]) for r in range(kp) if ids[q, r] >= 0}
    items = lambda: {int(ids[q, r]) for q, r in hits}  # noqa: E731
    walk = np.random.default_rng(seed).permutation(np.flatnonzero(ids[:, c] >= 0))
    for q in walk:
        if len(items()) == n:
            break
        hits.discard((int(q), c))
    assert len(items()) == n
    return kp, items()


@pytest.mark.parametrize("case", range(200))
def test_query_balanced_properties(case: int):
    rng = np.random.default_rng(1000 + case)
    nq, size = int(rng.integers(1, 9)), int(rng.integers(1, 60))
    n = int(rng.integers(1, size + 5))
    g = Gallery(rng, nq, size)
    seed = int(rng.integers(0, 1 << 30))
    sel = select_with_search(g.search, n, seed, k0=int(rng.integers(1, 8)))
    assert len(np.unique(sel.ids)) == len(sel)
    if n > size:
        assert sel.exhausted and len(sel) == size and not sel.needs_deeper
        return
    assert len(sel) == n and not sel.exhausted and not sel.needs_deeper
    ids = g.full_ids  # canonical (score desc, id asc) lists at full depth
    kp, expected = literal_query_balanced(ids, n, seed)
    assert sel.k == kp and union_size(ids, kp - 1) < n <= union_size(ids, kp)
    assert set(sel.ids.tolist()) == expected
    assert set(ids[:, :kp - 1].ravel().tolist()) <= expected  # first k'-1 neighbours kept
    # hits point into the lists, and a query keeps all its hits up to k'-1
    for j, item in enumerate(sel.ids):
        for q, r, s in sel.hits(j):
            assert ids[q, r] == item and r < kp and s == pytest.approx(g.full_scores[q, r])
    assert sel.hit_query.size >= nq * (kp - 1)
    # order: best score desc, then id asc
    key = list(zip(-sel.scores, sel.ids))
    assert key == sorted(key)
    # deterministic for a seed, independent of the start depth
    again = select_with_search(g.search, n, seed, k0=size + 3)
    assert again.ids.tolist() == sel.ids.tolist()
    assert again.hit_query.tolist() == sel.hit_query.tolist()


def test_different_seeds_can_differ():
    g = Gallery(np.random.default_rng(7), 8, 300)
    results = {tuple(select_with_search(g.search, 50, seed, k0=4).ids.tolist()) for seed in range(8)}
    assert len(results) > 1


@pytest.mark.parametrize("case", range(50))
def test_best_matches_is_top_n_by_max_similarity(case: int):
    rng = np.random.default_rng(5000 + case)
    nq, size = int(rng.integers(1, 6)), int(rng.integers(2, 80))
    n = int(rng.integers(1, size + 1))
    g = Gallery(rng, nq, size)
    sel = select_with_search(g.search, n, 0, strategy="best_matches", k0=1, num_gallery=size)
    best = g.sim.max(axis=0)
    expected = np.lexsort((np.arange(size), -best))[:n]
    assert sel.ids.tolist() == expected.tolist()
    assert sel.scores.tolist() == pytest.approx(best[expected].tolist())


def test_best_matches_asks_for_depth_when_unsure():
    s, i = lists([[(1, .9), (2, .8)], [(3, .5), (4, .4)]])
    sel = best_matches(SelectionInput(s, i), 3, 0)
    # third best is 0.5, but q0's unseen 3rd neighbour may score up to 0.8
    assert sel.needs_deeper and sel.suggested_k == 4


# ---------------------------------------------------------------- random, registry, prompts


def test_random_select():
    a = random_select(10_000_000, 1000, seed=4)
    assert a.size == 1000 and np.unique(a).size == 1000 and a.min() >= 0 and a.max() < 10_000_000
    assert a.tolist() == random_select(10_000_000, 1000, seed=4).tolist()
    assert a.tolist() != random_select(10_000_000, 1000, seed=5).tolist()
    removed = a[::2]
    b = random_select(10_000_000, 1000, seed=4, removed=removed)
    assert not np.isin(b, removed).any() and b.size == 1000
    assert b[:500].tolist() == a[1::2].tolist()  # kept picks stay, in order; backfill appends
    small = random_select(10, 20, seed=0, removed=[3])
    assert sorted(small.tolist()) == [0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_random_strategy_via_registry():
    sel = select_with_search(lambda k: pytest.fail("random must not search"), 5, 0,
                             strategy="random", num_gallery=100, removed=[1, 2])
    assert len(sel) == 5 and sel.ids.tolist() == sorted(sel.ids.tolist())
    assert not np.isin(sel.ids, [1, 2]).any()
    short = SELECTORS.get("random")(SelectionInput.empty(3), 5, 0)
    assert short.exhausted and len(short) == 3
    with pytest.raises(ValueError, match="num_gallery"):
        SELECTORS.get("random")(SelectionInput.empty(None), 5, 0)


def test_registry_names_and_query_kinds():
    assert SELECTORS.names() == ["best_matches", "query_balanced", "random", "text"]
    assert SELECTORS.get("text").queries == "text"
    assert SELECTORS.get("query_balanced").queries == "image"
    assert not SELECTORS.get("random").needs_search
    with pytest.raises(UnknownNameError, match="query_balanced"):
        SELECTORS.get("query_balance")
    g = Gallery(np.random.default_rng(0), 3, 50)
    a = select_with_search(g.search, 20, 3, strategy="text")
    b = select_with_search(g.search, 20, 3, strategy="query_balanced")
    assert a.ids.tolist() == b.ids.tolist() and a.strategy == "text"


def test_class_prompts():
    p = class_prompts(["forest", "river"])
    assert len(p) == 2 and len(p[0]) == len(PROMPT_TEMPLATES) >= 8
    assert "a photo of a forest." in p[0] and all("river" in t for t in p[1])
    with pytest.raises(ValueError):
        class_prompts(["ok", ""])
    with pytest.raises(ValueError, match="exactly one"):
        class_prompts(["x"], ["no slot"])
    f = np.random.default_rng(0).normal(size=(2, 3, 4))
    q = class_text_queries(f)
    assert q.shape == (2, 4) and np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-6)


def test_search_cache_serves_shallower_requests_by_slicing():
    g = Gallery(np.random.default_rng(2), 4, 100)
    cache = SearchCache(g.search)
    first = select_with_search(cache, 30, seed=0, k0=40)
    again = select_with_search(cache, 30, seed=0, k0=40, removed=first.ids[:5])
    assert cache.searches == 1 and g.calls == [40] and len(again) == 30
    s, i = cache(10)
    assert i.shape == (4, 10) and cache.searches == 1
    cache(80)
    assert cache.searches == 2 and cache.depth == 80
