"""De-duplication of retrieved items (Vemulapalli et al. 2024, B.3).

Two retrieved crops are duplicates when their *original images* have average similarity (mean
cosine over the encoders) > 0.99. Duplicate pairs are clustered (connected components, i.e.
union-find) and one item per cluster is kept. Because the comparison is between original images,
all crops of one original image fall in one cluster, so at most one crop per image survives.

The API works on unique original images: ``duplicate_clusters`` labels those images and
``keep_one_per_cluster`` keeps the best-ranked item of each cluster. The caller then backfills (``selection.select_with_search(..., removed=...)``).

Pairs come from ``similar_pairs``: exact FAISS range search (``IndexFlatIP``) in batches for small
inputs, an inverted-file join for large ones (``method="auto"``): FAISS k-means cells, and each
vector compared, by one matrix product per cell, with the vectors of its ``nprobe`` nearest cells.
That is approximate: a pair whose members fall in cells further apart is missed. At threshold
0.99 the two members are nearly the same vector (distance < 0.15), and a pair is found from
either side; the tests and ``bench/curate.py`` measure recall on planted duplicates. With
verification, pairs of images whose pixel keys (`curation.pixelkey`) are similar are candidates
too, so a copy the encoders scatter is still found.
"""
from __future__ import annotations

import math
from typing import Callable

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curation import pixelkey
from index.core.registry import choice

SEARCH_METHODS = ("auto", "flat", "ivf")
EXACT_MAX = 20_000  # auto: exact search up to this many indexed vectors


def check_normalised(x: np.ndarray, name: str, tol: float = 1e-2) -> np.ndarray:
    """float32 C-contiguous [n, d] with unit rows (float16 storage keeps norms within ~1e-3)."""
    x = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, d]; got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    if x.shape[0]:
        norms = np.linalg.norm(x, axis=1)
        bad = np.abs(norms - 1.0) > tol
        if bad.any():
            raise ValueError(f"{name} must be L2-normalised rows; {int(bad.sum())} rows are not "
                             f"(e.g. row {int(np.argmax(bad))} has norm {norms[bad][0]:.4f})")
    return x


def _choose_nlist(nq: int, nb: int, nprobe: int) -> int:
    """Cells balancing the coarse assignment ((nq + nb) * nlist) against the join (nq * nprobe *
    nb / nlist), with at least ~16 base vectors per cell."""
    best = math.sqrt(nprobe * nq * nb / max(1, nq + nb))
    return int(max(1, min(nb // 16, round(best))))


def _cells(xq: np.ndarray, xb: np.ndarray | None, nprobe: int, seed: int,
           batch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """k-means cells over the base; (home cell of each base row, nprobe cells of each query)."""
    base = xq if xb is None else xb
    nb, d = base.shape
    nlist = _choose_nlist(xq.shape[0], nb, nprobe)
    rng = np.random.default_rng(seed)
    sample = base[np.sort(rng.choice(nb, size=min(nb, 32 * nlist), replace=False))]
    km = faiss.Kmeans(d, nlist, niter=5, spherical=True, seed=seed, max_points_per_centroid=32)
    km.train(sample)
    p = min(nprobe, nlist)

    def assign(x: np.ndarray, k: int) -> np.ndarray:
        return np.concatenate([km.index.search(x[a:a + batch_size], k)[1]
                               for a in range(0, x.shape[0], batch_size)])

    probes = assign(xq, p)
    home = probes[:, 0] if xb is None else assign(xb, 1)[:, 0]
    return home.astype(np.int64), probes.astype(np.int64), nlist


def similar_pairs(xq: np.ndarray, xb: np.ndarray | None, threshold: float, method: str = "auto",
                  nprobe: int = 8, exact_max: int = EXACT_MAX, batch_size: int = 8192,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (query row, base row, inner product) with inner product > threshold.

    ``xb=None`` joins ``xq`` with itself (self matches included; callers drop them).
    ``flat``: exact, FAISS ``IndexFlatIP.range_search`` in query batches. ``ivf``: the base is cut
    into k-means cells (FAISS k-means); each query is compared, by one matrix product per cell,
    with the base rows of its ``nprobe`` nearest cells only. ``auto``: flat up to ``exact_max``
    base rows. Both return each found pair once, sorted by (query, base).

    A threshold of 1 or more is off: no pairs. Unit vectors never have an inner product above 1,
    but float rounding can put an exact copy's just above it on some CPUs, so "off" is decided here
    by definition, not by comparing scores with 1.
    """
    choice("search method", method, SEARCH_METHODS)
    if nprobe < 1:
        raise ValueError(f"nprobe must be >= 1; got {nprobe}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    base = xq if xb is None else xb
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if xq.shape[0] == 0 or base.shape[0] == 0 or threshold >= 1.0:
        return empty
    qs, bs, ss = [], [], []
    if method == "flat" or (method == "auto" and base.shape[0] <= exact_max):
        index = faiss.IndexFlatIP(base.shape[1])
        index.add(base)
        for a in range(0, xq.shape[0], batch_size):
            lims, sim, found = index.range_search(xq[a:a + batch_size], float(threshold))
            qs.append(np.repeat(np.arange(a, a + lims.size - 1, dtype=np.int64),
                                np.diff(lims).astype(np.int64)))
            bs.append(found.astype(np.int64))
            ss.append(sim)
    else:
        home, probes, nlist = _cells(xq, xb, nprobe, seed, batch_size)
        members = np.argsort(home, kind="stable")
        m_bounds = np.searchsorted(home[members], np.arange(nlist + 1))
        probe_cell = probes.ravel()
        probe_query = np.repeat(np.arange(xq.shape[0], dtype=np.int64), probes.shape[1])
        by_cell = np.argsort(probe_cell, kind="stable")
        q_bounds = np.searchsorted(probe_cell[by_cell], np.arange(nlist + 1))
        for c in range(nlist):
            mem = members[m_bounds[c]:m_bounds[c + 1]]
            qry = probe_query[by_cell[q_bounds[c]:q_bounds[c + 1]]]
            if mem.size == 0 or qry.size == 0:
                continue
            xm = base[mem]
            step = max(1, (1 << 24) // mem.size)  # bound the similarity block to ~64 MB
            for a in range(0, qry.size, step):
                rows = qry[a:a + step]
                sim = xq[rows] @ xm.T
                i, j = np.nonzero(sim > threshold)
                qs.append(rows[i])
                bs.append(mem[j])
                ss.append(sim[i, j])
    if not qs:
        return empty
    q, b, s = np.concatenate(qs), np.concatenate(bs), np.concatenate(ss).astype(np.float32)
    order = np.lexsort((b, q))
    return q[order], b[order], s[order]


def duplicate_pairs(features: np.ndarray, threshold: float = 0.99, method: str = "auto",
                    nprobe: int = 8, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) with inner product > threshold, as two int64 arrays sorted by (i, j)."""
    x = check_normalised(features, "features")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine similarity in [-1, 1]; got {threshold}")
    if x.shape[0] < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    q, b, _ = similar_pairs(x, None, threshold, method, nprobe, batch_size=batch_size)
    lo, hi = np.minimum(q, b), np.maximum(q, b)
    keep = lo != hi  # self matches; a pair found from both sides is merged below
    if not keep.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.stack([lo[keep], hi[keep]], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def pair_dots(x: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 32768) -> np.ndarray:
    """Inner product of rows i and j of x for each pair, in chunks: at a low threshold nearly every
    pair of a thousand images is a candidate, and gathering them all at once (pairs x dims) costs
    ten times the arithmetic in memory traffic. Each value is exactly ``(x[i] * x[j]).sum(1)``'s."""
    return np.concatenate([(x[i[a:a + chunk]] * x[j[a:a + chunk]]).sum(axis=1)
                           for a in range(0, i.size, chunk)]) if i.size else np.zeros(0, np.float32)


def nearest_partners(i: np.ndarray, j: np.ndarray, sim: np.ndarray, per_image: int) -> np.ndarray:
    """Mask keeping a pair when it is among the `per_image` most similar pairs of either member
    (ties by (i, j)): a cap on how many candidate pairs a verification stage has to score."""
    keep = np.zeros(i.size, bool)
    if i.size == 0:
        return keep
    for end in (i, j):
        order = np.lexsort((j, i, -sim, end))          # by member, then similarity desc
        e = end[order]
        start = np.r_[0, np.flatnonzero(e[1:] != e[:-1]) + 1]
        rank = np.arange(e.size) - np.repeat(start, np.diff(np.r_[start, e.size]))
        keep[order[rank < per_image]] = True
    return keep


def clusters_from_pairs(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of n nodes and edges (i, j), numbered by their smallest member."""
    if n == 0:
        return np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(i.size, np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    relabel = np.empty_like(first)
    relabel[np.argsort(first, kind="stable")] = np.arange(first.size)
    return relabel[labels].astype(np.int64)


def duplicate_clusters(features: np.ndarray, threshold: float = 0.99, method: str = "auto",
                       nprobe: int = 8, batch_size: int = 8192,
                       keep_pair: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                       per_image: int | None = None, keys: np.ndarray | None = None,
                       key_threshold: float | None = None, key_per_image: int | None = None) -> np.ndarray:
    """Cluster label per row: connected components of the "similarity > threshold" graph.

    ``features``: one L2-normalised row per unique original image; for several encoders the
    concatenation with each part scaled by 1/sqrt(E), so the inner product is the mean cosine.
    ``per_image`` keeps only each image's most similar candidate pairs; with ``keys`` (pixel keys,
    one row per image) and ``key_threshold``, the pairs whose key similarity exceeds that join the
    candidates (`pixelkey.similar_pairs`, ``key_per_image`` or as many as ``per_image`` per image);
    ``keep_pair(i, j)``, a verification
    stage (`curation.verify`), returns a mask of the candidate pairs that are copies.
    Labels are 0..C-1, numbered in the order of each cluster's smallest row index.
    """
    n = int(np.asarray(features).shape[0])
    i, j = duplicate_pairs(features, threshold, method, nprobe, batch_size)
    if per_image is not None and i.size:
        m = nearest_partners(i, j, pair_dots(np.asarray(features, np.float32), i, j), per_image)
        i, j = i[m], j[m]
    if key_threshold is not None:
        if keys is None or len(keys) != n:
            raise ValueError(f"key_threshold needs one pixel key per image ({n})")
        ki, kj = pixelkey.similar_pairs(keys, key_threshold, key_per_image or per_image or n)
        both = np.unique(np.stack([np.r_[i, ki], np.r_[j, kj]], axis=1).astype(np.int64), axis=0)
        i, j = both[:, 0], both[:, 1]
    if keep_pair is not None and i.size:
        m = np.asarray(keep_pair(i, j), bool)
        i, j = i[m], j[m]
    return clusters_from_pairs(n, i, j)


def keep_one_per_cluster(labels: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Bool mask keeping, per cluster, the item with the lowest ``order`` (ties: lowest index).

    ``order[i]`` is item i's position in the curated ranking (lower is better), e.g. the index of
    its id in ``Selection.ids``.
    """
    labels = np.asarray(labels)
    order = np.asarray(order)
    if labels.ndim != 1 or labels.shape != order.shape:
        raise ValueError(f"labels and order must be 1-D of one length; got {labels.shape}, "
                         f"{order.shape}")
    n = labels.size
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    idx = np.lexsort((np.arange(n), order, labels))
    first = np.r_[True, labels[idx][1:] != labels[idx][:-1]]
    keep[idx[first]] = True
    return keep
