"""De-duplication of retrieved items (Vemulapalli et al. 2024, B.3).

Two retrieved crops are duplicates when their *original images* have average similarity (mean
cosine over the encoders) > 0.99. Duplicate pairs are clustered (connected components, i.e.
union-find) and one item per cluster is kept. Because the comparison is between original images,
all crops of one original image fall in one cluster, so at most one crop per image survives.

The API works on unique original images: ``image_index`` maps each retrieved item to a row of the
unique-image feature matrix, ``duplicate_clusters`` labels those images, ``clusters_for_items``
carries the labels back to items and ``keep_one_per_cluster`` keeps the best-ranked item of each
cluster. The caller then backfills (``selection.select_with_search(..., removed=...)``).

Pairs come from a FAISS range search in batches: exact (``IndexFlatIP``) for small inputs, an IVF
index for large ones (``method="auto"``). IVF only compares vectors in the ``nprobe`` cells nearest
to the query, so it can miss a pair whose members fall in cells further apart; at threshold 0.99
the two members are nearly the same vector, and a pair is found from either side.
"""
from __future__ import annotations

import math
from typing import Sequence

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from index.registry import choice

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


def ip_index(x: np.ndarray, method: str = "auto", nprobe: int = 8,
             exact_max: int = EXACT_MAX, seed: int = 0) -> faiss.Index:
    """An inner-product index over normalised rows: flat (exact) or IVF-Flat (approximate).

    IVF uses nlist ~ sqrt(nprobe * n), which balances the coarse assignment (nlist dot products per
    query) against the list scan (nprobe * n / nlist); trained on a seeded sample.
    """
    choice("search method", method, SEARCH_METHODS)
    n, d = x.shape
    if method == "flat" or (method == "auto" and n <= exact_max):
        index = faiss.IndexFlatIP(d)
        index.add(x)
        return index
    if nprobe < 1:
        raise ValueError(f"nprobe must be >= 1; got {nprobe}")
    nlist = max(1, min(n // 39, int(math.sqrt(nprobe * n))))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    index.cp.seed = seed
    sample = min(n, 40 * nlist)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
    index.train(x[rows])
    index.add(x)
    index.nprobe = min(nprobe, nlist)
    return index


def duplicate_pairs(features: np.ndarray, threshold: float = 0.99, method: str = "auto",
                    nprobe: int = 8, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) with inner product > threshold, as two int64 arrays."""
    x = check_normalised(features, "features")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine similarity in [-1, 1]; got {threshold}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    n = x.shape[0]
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    index = ip_index(x, method=method, nprobe=nprobe)
    src, dst = [], []
    for a in range(0, n, batch_size):
        lims, _, found = index.range_search(x[a:a + batch_size], float(threshold))
        counts = np.diff(lims).astype(np.int64)
        i = np.repeat(np.arange(a, a + counts.size, dtype=np.int64), counts)
        j = found.astype(np.int64)
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        keep = i != j  # self matches; a pair found from both sides is merged by np.unique below
        src.append(lo[keep])
        dst.append(hi[keep])
    i, j = np.concatenate(src), np.concatenate(dst)
    if i.size:
        pairs = np.unique(np.stack([i, j], axis=1), axis=0)
        i, j = pairs[:, 0], pairs[:, 1]
    return i, j


def duplicate_clusters(features: np.ndarray, threshold: float = 0.99, method: str = "auto",
                       nprobe: int = 8, batch_size: int = 8192) -> np.ndarray:
    """Cluster label per row: connected components of the "similarity > threshold" graph.

    ``features``: one L2-normalised row per unique original image; for several encoders the
    concatenation with each part scaled by 1/sqrt(E), so the inner product is the mean cosine.
    Labels are 0..C-1, numbered in the order of each cluster's smallest row index.
    """
    n = int(np.asarray(features).shape[0])
    i, j = duplicate_pairs(features, threshold, method, nprobe, batch_size)
    if n == 0:
        return np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(i.size, np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    relabel = np.empty_like(first)
    relabel[np.argsort(first, kind="stable")] = np.arange(first.size)
    return relabel[labels].astype(np.int64)


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


def image_index(item_source_ids: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique original image ids in first-occurrence order, item -> row of that array)."""
    src = np.asarray(item_source_ids)
    if src.ndim != 1:
        raise ValueError(f"item_source_ids must be 1-D; got shape {src.shape}")
    uniq, first, inverse = np.unique(src, return_index=True, return_inverse=True)
    by_first = np.argsort(first, kind="stable")
    rank = np.empty_like(by_first)
    rank[by_first] = np.arange(by_first.size)
    return uniq[by_first], rank[inverse.reshape(-1)].astype(np.int64)


def clusters_for_items(item_image_index: np.ndarray, image_labels: np.ndarray) -> np.ndarray:
    """Item-level cluster labels from image-level ones: crops of one image share its label."""
    idx = np.asarray(item_image_index)
    labels = np.asarray(image_labels)
    if idx.ndim != 1 or labels.ndim != 1:
        raise ValueError("item_image_index and image_labels must be 1-D")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"item_image_index must be integers; got {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= labels.size):
        raise ValueError(f"item_image_index must be in [0, {labels.size}); got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    return labels[idx].astype(np.int64)
