"""Exact top-k lists and their one total order: higher inner product first, then smaller global id.

    select_topk(scores, ids, k)   the k best of every row, ties at the k-th score broken by smaller id
    sort_topk(scores, ids)        rows ordered; empty slots become (-inf, -1)
    merge_topk(results, k)        the exact top-k of the union of exact per-part lists
    check_queries(queries, k)     a finite, non-empty [Q, dim] float32 matrix and a positive k
    same_lists(a, b, tol)         two paths' lists agree: scores within tol, ids equal outside ties

Every search path (`index.search`'s exact, sharded and grouped searches, `index.torch_search` on the
GPU) returns its lists through these, so they agree entry for entry.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Internal id of an empty slot: larger than any real id, so it loses every tie; reported as -1.
EMPTY_ID = np.iinfo(np.int64).max


def select_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best entries of every row by (higher score, smaller id), unordered, as [Q, k] arrays.

    Exact, ties included: among entries tied at the k-th best score, the smallest ids are kept.
    Rows shorter than k are padded with (-inf, EMPTY_ID).
    """
    q, n = scores.shape
    if n <= k:
        pad = k - n
        return (np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf),
                np.pad(ids, ((0, 0), (0, pad)), constant_values=EMPTY_ID))
    kth = n - k
    v = np.partition(scores, kth, axis=1)[:, kth:kth + 1]   # the k-th best score of each row
    keep = scores >= v
    extra = keep.sum(axis=1) - k                            # entries tied at v beyond the k slots
    for r in np.flatnonzero(extra):
        tied = np.flatnonzero(scores[r] == v[r, 0])
        drop = tied[np.argsort(ids[r, tied], kind="stable")[len(tied) - extra[r]:]]
        keep[r, drop] = False
    return scores[keep].reshape(q, k), ids[keep].reshape(q, k)


def sort_topk(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by (higher score, smaller id); empty slots become id -1, score -inf."""
    order = np.lexsort((ids, -scores), axis=1)
    s = np.take_along_axis(scores, order, axis=1).astype(np.float32, copy=False)
    i = np.take_along_axis(ids, order, axis=1)
    empty = i == EMPTY_ID
    s[empty] = -np.inf
    i[empty] = -1
    return np.ascontiguousarray(s), np.ascontiguousarray(i)


def merge_topk(results: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge several (scores [Q, k_j], ids [Q, k_j]) results into one sorted top-k.

    Entries with id < 0 (faiss's and our padding) are empty. The merge of exact per-part top-k
    lists is the exact top-k of the union.
    """
    if not results:
        raise ValueError("merge_topk needs at least one result")
    s = np.concatenate([np.asarray(r[0], dtype=np.float32) for r in results], axis=1)
    i = np.concatenate([np.asarray(r[1], dtype=np.int64) for r in results], axis=1)
    empty = i < 0
    s = np.where(empty, -np.inf, s).astype(np.float32)
    i = np.where(empty, EMPTY_ID, i)
    return sort_topk(*select_topk(s, i, k))


def check_queries(queries: np.ndarray, k: int) -> np.ndarray:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    queries = np.asarray(queries)
    if queries.ndim != 2 or queries.shape[0] == 0:
        raise ValueError(f"queries must be a non-empty [Q, dim] matrix; got shape {queries.shape}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not np.isfinite(queries).all():
        raise ValueError("queries contain NaN or inf")
    return queries


def same_lists(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], tol: float) -> bool:
    """Whether two (scores, ids) top-k lists of the same queries agree as far as floats allow: every
    score within `tol` of the other's, and the ids equal as sets within each run of scores that lie
    within `tol` of their neighbours (a tie on one CPU may be a strict order on another). The run
    that ends the list may continue past k, so only its length is compared there. Two BLAS paths
    (or two CPUs) can differ in the last bit; compare their lists with this, not bit for bit."""
    (sa, ia), (sb, ib) = (np.asarray(x) for x in a), (np.asarray(x) for x in b)
    if sa.shape != sb.shape or ia.shape != ib.shape:
        return False
    for scores_a, ids_a, scores_b, ids_b in zip(sa, ia, sb, ib):
        finite = np.isfinite(scores_a)
        if not np.array_equal(finite, np.isfinite(scores_b)) \
                or np.abs(scores_a[finite] - scores_b[finite]).max(initial=0) > tol:
            return False
        cuts = np.flatnonzero(np.abs(np.diff(np.maximum(scores_a, scores_b))) > tol) + 1  # run boundaries
        for run in np.split(np.arange(len(scores_a)), cuts)[:-1]:
            if set(ids_a[run].tolist()) != set(ids_b[run].tolist()):
                return False
    return True
