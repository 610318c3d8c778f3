"""Selection strategies: which gallery items form the transfer set, given kNN lists of the queries.

Every strategy is a pure function ``fn(inp: SelectionInput, n: int, seed: int) -> Selection`` over
the neighbour lists of the queries (``scores`` [Q, k] float32, each row sorted by similarity,
descending; ``ids`` [Q, k] int64 gallery item ids, -1 = padding). They are registered in
``SELECTORS``:

- ``query_balanced`` (Vemulapalli et al. 2024, sec. 3.4 / B.5): the smallest k' for which the union
  of every query's top-k' holds at least n unique items; if it holds more, the k'-th neighbours of
  randomly chosen queries are dropped until it holds exactly n.
- ``text``: the same rule over text queries (class-name prompts through the CLIP text tower, see
  ``PROMPT_TEMPLATES`` / ``class_prompts``). The caller embeds the prompts; here it is
  ``query_balanced`` with ``Selector.queries == "text"``.
- ``best_matches``: items ranked by their best similarity to any query (= min distance for
  normalised features).
- ``random``: n items drawn uniformly from the gallery; needs no search.

Conventions
    Ties break by (similarity desc, id asc): ``SelectionInput`` reorders tied entries of a row by
    id, so a FAISS tie order never changes a result.
    Padding (-1) only at the end of a row, and it means "the index has no more neighbours for
    this query": the gallery is exhausted for it. A row without padding was cut by the search
    depth k; a deeper search could give more.

Search depth and backfill
    A strategy that cannot decide with the given depth returns ``needs_deeper=True`` and a
    ``suggested_k``; ``select_with_search`` re-searches with a larger k until the strategy is
    satisfied or the gallery is exhausted. Items removed later (duplicates, leaks) are passed as
    ``removed``: they are masked out of the neighbour lists (``exclude``) and the same strategy is
    run again for the same n, so the final set still holds exactly n items (the strategy is applied
    to the gallery without the removed items). Ranks in a result are ranks in the masked lists.

Why one module: every strategy reads the same neighbour lists under the same conventions
(`SelectionInput`: tie order, padding means exhausted, `needs_deeper`), and `select_with_search` /
`SearchCache` are the loop that answers `needs_deeper` for all of them; the text prompts
(`class_prompts`, `class_text_queries`) are the text strategy's query side, a small part.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from index.core.registry import Registry

# ---------------------------------------------------------------- neighbour lists


def _validate_lists(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    ids = np.asarray(ids)
    if scores.ndim != 2 or ids.ndim != 2 or scores.shape != ids.shape:
        raise ValueError(f"scores and ids must be 2-D arrays of one shape [Q, k]; got "
                         f"{scores.shape} and {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers (gallery item ids, -1 = padding); got {ids.dtype}")
    scores = scores.astype(np.float32, copy=False)
    ids = ids.astype(np.int64, copy=False)
    if ids.size == 0:
        return scores, ids
    if (ids < -1).any():
        raise ValueError("ids must be >= 0, or -1 for padding")
    valid = ids >= 0
    if (valid[:, 1:] & ~valid[:, :-1]).any():
        raise ValueError("padding (-1) must come after all real neighbours of a row")
    if np.isnan(scores[valid]).any():
        raise ValueError("scores of real neighbours must not be NaN")
    both = valid[:, 1:] & valid[:, :-1]
    if (both & (scores[:, 1:] > scores[:, :-1])).any():
        raise ValueError("each row of scores must be sorted by similarity, descending")
    srt = np.sort(np.where(valid, ids, -1 - np.arange(ids.shape[1])[None, :]), axis=1)
    if (srt[:, 1:] == srt[:, :-1]).any():
        raise ValueError("an item id occurs twice in one query's neighbour list")
    return scores, ids


def _canonical_ties(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder equal-score entries of each row by id ascending (padding stays last)."""
    if ids.size == 0:
        return scores, ids
    valid = ids >= 0
    primary = np.where(valid, -scores.astype(np.float64), np.inf)
    secondary = np.where(valid, ids, np.iinfo(np.int64).max)
    order = np.lexsort((secondary, primary), axis=1)
    return (np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1))


def exclude(scores: np.ndarray, ids: np.ndarray,
            removed_ids: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mask removed items out of the neighbour lists, shifting later neighbours up.

    The result is again a valid set of kNN lists, now of the gallery without the removed items.
    To keep the meaning of padding (= gallery exhausted for that query), rows that were cut by
    the search depth are truncated to a common width: the fewest neighbours any such row keeps.
    Rows that were already exhausted keep their padding. So ``exclude`` then running a strategy
    is exactly that strategy on the gallery minus ``removed_ids``; this is how backfill works.
    """
    scores, ids = _canonical_ties(*_validate_lists(scores, ids))  # before any truncation
    removed = np.unique(np.asarray(removed_ids, dtype=np.int64))
    if ids.size == 0 or removed.size == 0:
        return scores.copy(), ids.copy()
    q, k = ids.shape
    keep = (ids >= 0) & ~np.isin(ids, removed)
    truncated_row = ids[:, -1] >= 0
    kept_count = keep.sum(axis=1)
    width = int(kept_count[truncated_row].min()) if truncated_row.any() else k
    dest = np.cumsum(keep, axis=1) - 1
    out_ids = np.full((q, k), -1, dtype=np.int64)
    out_scores = np.full((q, k), -np.inf, dtype=np.float32)
    rows, cols = np.nonzero(keep)
    out_ids[rows, dest[rows, cols]] = ids[rows, cols]
    out_scores[rows, dest[rows, cols]] = scores[rows, cols]
    return out_scores[:, :width], out_ids[:, :width]


@dataclass(frozen=True)
class SelectionInput:
    """What every strategy sees. ``removed`` items are masked out of the lists on construction.

    ``num_gallery`` is the gallery size before removal (global item ids are ``0..num_gallery-1``);
    it is required by ``random`` and lets the others detect that every item has been seen.
    """
    scores: np.ndarray
    ids: np.ndarray
    num_gallery: int | None = None
    removed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        scores, ids = _validate_lists(self.scores, self.ids)
        removed = np.unique(np.asarray(self.removed, dtype=np.int64))
        if self.num_gallery is not None:
            if self.num_gallery < 0:
                raise ValueError(f"num_gallery must be >= 0; got {self.num_gallery}")
            if ids.size and ids.max() >= self.num_gallery:
                raise ValueError(f"item id {int(ids.max())} is outside the gallery "
                                 f"(num_gallery={self.num_gallery})")
        scores, ids = _canonical_ties(scores, ids)
        if removed.size:
            scores, ids = exclude(scores, ids, removed)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "removed", removed)

    @classmethod
    def empty(cls, num_gallery: int | None, removed: np.ndarray | Sequence[int] = ()) -> "SelectionInput":
        """Input for strategies that need no search (``random``)."""
        return cls(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64), num_gallery,
                   np.asarray(removed, dtype=np.int64))

    @property
    def available(self) -> int | None:
        """Gallery items left after removal, if the gallery size is known."""
        if self.num_gallery is None:
            return None
        inside = self.removed[(self.removed >= 0) & (self.removed < self.num_gallery)]
        return self.num_gallery - int(inside.size)

    @property
    def complete_rows(self) -> np.ndarray:
        """[Q] bool: the row holds every neighbour the index has (padding present)."""
        if self.ids.shape[1] == 0:
            return np.full(self.ids.shape[0], self.available == 0)
        return self.ids[:, -1] < 0


# ---------------------------------------------------------------- result


@dataclass(frozen=True)
class Selection:
    """The selected items and, for each, the kept hits that retrieved it (CSR layout).

    ``ids`` is ordered by best similarity desc, then id asc (``random``: id asc). The hits of item
    ``i`` are rows ``hit_offsets[i]:hit_offsets[i+1]`` of ``hit_query``/``hit_rank``/``hit_score``,
    ordered by score desc, query asc.
    """
    ids: np.ndarray            # int64 [m]
    scores: np.ndarray         # float32 [m], best similarity over the item's kept hits (NaN: none)
    hit_offsets: np.ndarray    # int64 [m + 1]
    hit_query: np.ndarray      # int64 [h] query index
    hit_rank: np.ndarray       # int64 [h] 0-based rank in that query's list
    hit_score: np.ndarray      # float32 [h]
    k: int                     # the depth used (query_balanced: k')
    strategy: str
    needs_deeper: bool = False
    suggested_k: int | None = None
    exhausted: bool = False
    message: str = ""

    def __len__(self) -> int:
        return int(self.ids.size)

    def hits(self, i: int) -> list[tuple[int, int, float]]:
        """(query index, rank, score) of every kept hit of the i-th selected item."""
        a, b = int(self.hit_offsets[i]), int(self.hit_offsets[i + 1])
        return [(int(q), int(r), float(s))
                for q, r, s in zip(self.hit_query[a:b], self.hit_rank[a:b], self.hit_score[a:b])]


def _from_hits(q: np.ndarray, r: np.ndarray, items: np.ndarray, s: np.ndarray, k: int,
               strategy: str, keep_items: np.ndarray | None = None, **flags) -> Selection:
    """Group hits by item; order items by (best score desc, id asc). ``keep_items``: restrict."""
    if keep_items is not None:
        mask = np.isin(items, keep_items)
        q, r, items, s = q[mask], r[mask], items[mask], s[mask]
    order = np.lexsort((q, -s.astype(np.float64), items))
    q, r, items, s = q[order], r[order], items[order], s[order]
    starts = np.flatnonzero(np.r_[True, items[1:] != items[:-1]]) if items.size else np.zeros(0, np.int64)
    uniq = items[starts]
    best = s[starts]
    item_order = np.lexsort((uniq, -best.astype(np.float64)))
    ends = np.r_[starts[1:], items.size].astype(np.int64)
    lengths = (ends - starts)[item_order]
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    # hit rows of the items in their new order: each item's run, shifted from its new offset
    gather = np.repeat(starts[item_order] - offsets[:-1], lengths) + np.arange(items.size)
    return Selection(
        ids=uniq[item_order].astype(np.int64), scores=best[item_order].astype(np.float32),
        hit_offsets=offsets,
        hit_query=q[gather].astype(np.int64), hit_rank=r[gather].astype(np.int64),
        hit_score=s[gather].astype(np.float32), k=int(k), strategy=strategy, **flags)


def _all_hits(inp: SelectionInput) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    q, r = np.nonzero(inp.ids >= 0)
    return q, r, inp.ids[q, r], inp.scores[q, r]


def _shortfall(inp: SelectionInput, n: int, found: int, strategy: str,
               lower_bound_k: int) -> dict:
    """Flags for a result that holds fewer than n items at the full depth."""
    k = inp.ids.shape[1]
    avail = inp.available
    if inp.complete_rows.all() or (avail is not None and found >= avail):
        return dict(exhausted=True, message=(
            f"{strategy}: the gallery is exhausted: only {found} unique items can be retrieved "
            f"(requested {n}); returning all of them"))
    nxt = max(2 * k, lower_bound_k, 1)
    if avail is not None:
        nxt = min(nxt, avail)
    return dict(needs_deeper=True, suggested_k=int(nxt), message=(
        f"{strategy}: depth k={k} gives {found} unique items < {n}; search again with k={nxt}"))


def _check_n(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer; got {n!r}")


def _check_queries(inp: SelectionInput, strategy: str) -> None:
    if inp.ids.shape[0] == 0:
        raise ValueError(f"{strategy} needs at least one query's neighbour list; got none")


# ---------------------------------------------------------------- strategies


def query_balanced(inp: SelectionInput, n: int, seed: int) -> Selection:
    """Query-balanced retrieval (Vemulapalli et al. 2024, sec. 3.4), exactly n items.

    Let U(k) be the union of every query's top-k. k' is the smallest k with |U(k)| >= n. With
    excess = |U(k')| - n > 0, queries that have a k'-th neighbour are visited in a seeded random
    order and each visited query's k'-th hit is dropped, until the union of the kept hits holds
    exactly n items. A dropped hit removes its item only if no kept hit holds it: not when the item
    is also some query's neighbour at rank < k', nor while a query not yet dropped still has it as
    its k'-th neighbour. Each drop removes at most one item and |U(k'-1)| < n, so exactly n is
    always reached. Every query keeps its first k'-1 neighbours.

    The drop order is ``np.random.default_rng(seed).permutation(P)`` with P the ascending indices
    of the queries that have a k'-th neighbour; it depends only on the lists up to depth k', so
    any search depth >= k' gives the same result.

    Implementation (vectorised): an item first seen at column k'-1 disappears at the step of the
    last of its holders in the drop order; the walk stops at the excess-th such step.
    """
    _check_n(n)
    _check_queries(inp, "query_balanced")
    q, r, items, s = _all_hits(inp)
    nq, k = inp.ids.shape
    order = np.lexsort((r, items))
    items_sorted = items[order]
    first = np.r_[True, items_sorted[1:] != items_sorted[:-1]] if items.size else np.zeros(0, bool)
    uniq = items_sorted[first]
    min_rank = r[order][first]
    lower = math.ceil(n / nq)
    if uniq.size < n:
        return _from_hits(q, r, items, s, k, "query_balanced",
                          **_shortfall(inp, n, int(uniq.size), "query_balanced", lower))
    cum = np.cumsum(np.bincount(min_rank, minlength=k))
    kp = int(np.searchsorted(cum, n)) + 1  # smallest k' with |U(k')| >= n
    c = kp - 1
    excess = int(cum[c]) - n
    keep_hit = r < c
    col_valid = inp.ids[:, c] >= 0
    dropped = np.zeros(nq, dtype=bool)
    if excess > 0:
        candidates = np.flatnonzero(col_valid)
        walk = np.random.default_rng(seed).permutation(candidates)
        pos = np.full(nq, -1, dtype=np.int64)
        pos[walk] = np.arange(walk.size)
        new_items = uniq[min_rank == c]                      # sorted: uniq is sorted
        col_ids = inp.ids[candidates, c]
        j = np.searchsorted(new_items, col_ids)
        holds_new = (j < new_items.size) & (new_items[np.minimum(j, new_items.size - 1)] == col_ids)
        gone_at = np.full(new_items.size, -1, dtype=np.int64)
        np.maximum.at(gone_at, j[holds_new], pos[candidates[holds_new]])
        stop = np.sort(gone_at)[excess - 1]                  # distinct values: one hit per query
        dropped = (pos >= 0) & (pos <= stop)
    keep_hit |= (r == c) & ~dropped[q]
    sel = _from_hits(q[keep_hit], r[keep_hit], items[keep_hit], s[keep_hit], kp, "query_balanced")
    assert len(sel) == n, (len(sel), n)
    return sel


def best_matches(inp: SelectionInput, n: int, seed: int) -> Selection:
    """The n items with the highest similarity to any query (B.5 "best-matches"); ties by id.

    An item missing from every list scores at most the largest last-column score of the rows cut
    by the depth, so the top n are certain only when the n-th best score exceeds that bound;
    otherwise a deeper search is requested. ``seed`` is unused (deterministic strategy).
    """
    del seed
    _check_n(n)
    _check_queries(inp, "best_matches")
    q, r, items, s = _all_hits(inp)
    k = inp.ids.shape[1]
    full = _from_hits(q, r, items, s, k, "best_matches")
    cut_rows = ~inp.complete_rows
    bound = float(inp.scores[cut_rows, -1].max()) if cut_rows.any() and k > 0 else -np.inf
    avail = inp.available
    all_seen = avail is not None and len(full) >= avail
    if len(full) < n:
        flags = _shortfall(inp, n, len(full), "best_matches", math.ceil(n / inp.ids.shape[0]))
        return replace(full, **flags)
    if not all_seen and cut_rows.any() and not float(full.scores[n - 1]) > bound:
        nxt = max(2 * k, 1) if avail is None else min(max(2 * k, 1), avail)
        return replace(full, needs_deeper=True, suggested_k=int(nxt), message=(
            f"best_matches: at depth k={k} an unseen item may score {bound:.6f} >= the n-th best "
            f"{float(full.scores[n - 1]):.6f}; search again with k={nxt}"))
    return _from_hits(q, r, items, s, k, "best_matches", keep_items=full.ids[:n])


def random_select(num_items: int, n: int, seed: int,
                  removed: np.ndarray | Sequence[int] = ()) -> np.ndarray:
    """n distinct ids drawn uniformly from ``range(num_items)`` minus ``removed``, in draw order.

    The picks are a prefix of one seeded random order of the gallery (a permutation for small
    galleries; for large ones a stream of draws in fixed-size chunks, first occurrence kept), so
    removing items and drawing again keeps every earlier pick that was not removed (backfill
    appends), as long as the regime does not change (it switches only when fewer than 2n items
    remain).
    Returns fewer than n ids only when fewer are available.
    """
    _check_n(n)
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0; got {num_items}")
    removed = np.unique(np.asarray(removed, dtype=np.int64))
    removed = removed[(removed >= 0) & (removed < num_items)]
    available = num_items - removed.size
    rng = np.random.default_rng(seed)
    if num_items <= max(4 * n, 1 << 22) or available < 2 * n:
        # Small gallery: one permutation of all ids, removed ones skipped (no collision tail).
        order = rng.permutation(num_items).astype(np.int64)
        return order[~np.isin(order, removed)][:n]
    chunk = 1 << 16
    drawn = np.zeros(0, dtype=np.int64)
    while True:
        drawn = np.concatenate([drawn, rng.integers(0, num_items, size=chunk, dtype=np.int64)])
        _, first = np.unique(drawn, return_index=True)
        picks = drawn[np.sort(first)]
        picks = picks[~np.isin(picks, removed)]
        if picks.size >= n:
            return picks[:n]


def random_strategy(inp: SelectionInput, n: int, seed: int) -> Selection:
    """``random`` (B.5): uniform over the gallery minus removed items; ids ascending, no hits."""
    if inp.num_gallery is None:
        raise ValueError("random selection needs num_gallery (the gallery size)")
    ids = np.sort(random_select(inp.num_gallery, n, seed, inp.removed))
    flags: dict = {}
    if ids.size < n:
        flags = dict(exhausted=True, message=(
            f"random: the gallery is exhausted: only {ids.size} items available (requested {n}); "
            "returning all of them"))
    m = ids.size
    empty_i = np.zeros(0, np.int64)
    return Selection(ids=ids, scores=np.full(m, np.nan, np.float32),
                     hit_offsets=np.zeros(m + 1, np.int64), hit_query=empty_i, hit_rank=empty_i,
                     hit_score=np.zeros(0, np.float32), k=0, strategy="random", **flags)


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Selector:
    """A registered strategy: the function plus what kind of queries it searches with."""
    name: str
    fn: Callable[[SelectionInput, int, int], Selection]
    queries: str          # "image", "text" or "none" (needs no search)
    description: str

    @property
    def needs_search(self) -> bool:
        return self.queries != "none"

    def __call__(self, inp: SelectionInput, n: int, seed: int) -> Selection:
        sel = self.fn(inp, n, seed)
        return sel if sel.strategy == self.name else replace(sel, strategy=self.name)


SELECTORS: Registry[Selector] = Registry("selection strategy")
for _s in (
    Selector("query_balanced", query_balanced, "image",
             "smallest k whose union over image queries holds n items; random k-th drops to n"),
    Selector("text", query_balanced, "text",
             "query_balanced over text queries (class names through PROMPT_TEMPLATES)"),
    Selector("best_matches", best_matches, "image",
             "n items with the highest similarity to any image query"),
    Selector("random", random_strategy, "none", "n items uniformly at random from the gallery"),
):
    SELECTORS.register(_s.name, _s)


def select_with_search(search_fn: Callable[[int], tuple[np.ndarray, np.ndarray]], n: int,
                       seed: int, strategy: str | Selector = "query_balanced", k0: int = 64,
                       num_gallery: int | None = None,
                       removed: np.ndarray | Sequence[int] = (),
                       max_k: int | None = None) -> Selection:
    """Run a strategy, re-searching with a larger k until it is satisfied or the gallery runs out.

    ``search_fn(k)`` returns the (scores, ids) kNN lists of all queries at depth k. ``removed``:
    items to leave out (duplicates, leaks): backfill is calling this again with the grown removed
    set and the same n. ``max_k`` caps the depth; a result still short at the cap keeps
    ``needs_deeper=True`` and says so in its message.
    """
    sel = SELECTORS.get(strategy) if isinstance(strategy, str) else strategy
    removed = np.asarray(removed, dtype=np.int64)
    if not sel.needs_search:
        return sel(SelectionInput.empty(num_gallery, removed), n, seed)
    if k0 < 1:
        raise ValueError(f"k0 must be >= 1; got {k0}")
    k = k0 if num_gallery is None else max(1, min(k0, num_gallery))
    if max_k is not None:
        k = min(k, max_k)
    while True:
        scores, ids = search_fn(k)
        result = sel(SelectionInput(scores, ids, num_gallery, removed), n, seed)
        if not result.needs_deeper:
            return result
        nxt = max(2 * k, result.suggested_k or 0)
        if num_gallery is not None:
            nxt = min(nxt, num_gallery)
        if max_k is not None:
            nxt = min(nxt, max_k)
        if nxt <= k:
            return replace(result, message=result.message + f" (depth capped at k={k})")
        k = nxt


class SearchCache:
    """Wrap a ``search_fn(k)`` so that a request no deeper than the deepest one so far is served by
    slicing the cached lists (the top-k of a deeper search are its first k columns). Backfill
    re-runs the selection on the same queries; this avoids searching again."""

    def __init__(self, search_fn: Callable[[int], tuple[np.ndarray, np.ndarray]]):
        self.search_fn = search_fn
        self.scores: np.ndarray | None = None
        self.ids: np.ndarray | None = None
        self.searches = 0

    @property
    def depth(self) -> int:
        return 0 if self.ids is None else int(self.ids.shape[1])

    def __call__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.ids is None or k > self.depth:
            self.scores, self.ids = (np.asarray(a) for a in self.search_fn(k))
            self.searches += 1
        assert self.scores is not None and self.ids is not None
        return self.scores[:, :k], self.ids[:, :k]


# ---------------------------------------------------------------- text queries

# A subset of CLIP's ImageNet prompt templates (Radford et al. 2021), as used for text queries.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a low resolution photo of the {}.",
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a good photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "itap of a {}.",
    "art of the {}.",
    "a rendering of a {}.",
    "a {} in a video game.",
)


def class_prompts(classnames: Sequence[str],
                  templates: Sequence[str] = PROMPT_TEMPLATES) -> list[list[str]]:
    """One list of prompts per class: ``templates`` filled with the class name."""
    if not classnames:
        raise ValueError("class_prompts needs at least one class name")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"a prompt template must contain exactly one '{{}}'; got {t!r}")
    out = []
    for name in classnames:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class names must be non-empty strings; got {name!r}")
        out.append([t.format(name.strip()) for t in templates])
    return out


def class_text_queries(prompt_features: np.ndarray) -> np.ndarray:
    """[C, T, d] prompt embeddings -> [C, d] text queries: the normalised mean over templates.

    This is CLIP's zero-shot classifier construction; each class is then one text query.
    """
    f = np.asarray(prompt_features, dtype=np.float32)
    if f.ndim != 3:
        raise ValueError(f"prompt_features must be [classes, templates, dim]; got shape {f.shape}")
    f = f / np.linalg.norm(f, axis=-1, keepdims=True)
    m = f.mean(axis=1)
    return (m / np.linalg.norm(m, axis=-1, keepdims=True)).astype(np.float32)
