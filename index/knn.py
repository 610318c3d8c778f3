"""FAISS index per shard group: combined vectors, the factory rule, training, streaming build.

Vectors are the combined multi-encoder features (`combine_features`), so inner product = mean
cosine over the encoders; every index here uses METRIC_INNER_PRODUCT. FAISS ids are global int64
row numbers (shard offset + row in shard, index.core.contract).

Search lives in index.search; reading and writing index files in index.faiss_io.

Why one module: choosing a group's factory (memory rule, dimension check, whether the gallery can
train it), sizing and drawing its training sample, and building it: all three rest on the same IVF/PQ
training constants (MIN_POINTS_PER_LIST, PQ_MIN_TRAIN, TRAIN_POINTS_PER_LIST); apart, the check
that a factory is trainable and the sample that trains it could drift from each other.
"""
from __future__ import annotations

import math
import re
from typing import Iterable

import numpy as np

from index.core.errors import ConfigError

MIN_POINTS_PER_LIST = 39      # faiss warns below this many training points per centroid
TRAIN_POINTS_PER_LIST = 50    # training sample size per IVF list (faiss uses at most 256)
PQ_MIN_TRAIN = 256 * MIN_POINTS_PER_LIST   # 8-bit PQ: 256 centroids per sub-quantizer
FASTSCAN_MIN_TRAIN = 16 * MIN_POINTS_PER_LIST  # 4-bit fast-scan PQ: 16 centroids per sub-quantizer
FASTSCAN_BLOCK = 32           # fast-scan lists store codes in blocks of 32 vectors
PQ_TRAIN = 65536
HNSW_QUANTIZER_LISTS = 65536  # from this many IVF lists the coarse quantizer is an HNSW graph
DEFAULT_NPROBE = 32
ID_BYTES = 8                  # int64 id stored per vector (IndexIDMap or inverted lists)


def combine_features(mats: list[np.ndarray]) -> np.ndarray:
    """float32 [n, sum(dims)]: each encoder's L2-normalised features scaled by 1/sqrt(E), concatenated.

    The inner product of two combined rows is then the mean of the per-encoder cosines, so one
    index over the concatenation answers the paper's averaged similarity exactly.
    """
    if not mats:
        raise ValueError("combine_features needs one feature matrix per encoder; got none")
    if any(np.ndim(m) != 2 for m in mats):
        raise ValueError(f"feature matrices must be 2-D; got shapes {[np.shape(m) for m in mats]}")
    rows = {len(m) for m in mats}
    if len(rows) != 1:
        raise ValueError(f"every encoder needs one row per crop; got row counts {sorted(rows)}")
    scale = np.float32(1.0 / math.sqrt(len(mats)))
    out = np.empty((rows.pop(), sum(m.shape[1] for m in mats)), dtype=np.float32)
    col = 0
    for m in mats:
        np.multiply(np.asarray(m, dtype=np.float32), scale, out=out[:, col:col + m.shape[1]])
        col += m.shape[1]
    return out


# ---------------------------------------------------------------- the factory rule

def ivf_nlist(num_vectors: int) -> int:
    """4 * sqrt(n) rounded to a power of two, halved until every list gets >= 39 training points."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(max(num_vectors, 1)), 1)))
    while nlist > 1 and num_vectors / nlist < MIN_POINTS_PER_LIST:
        nlist //= 2
    return nlist


def _bytes_flat(n: int, dim: int) -> int:
    return n * (4 * dim + ID_BYTES)


def _bytes_ivf_flat(n: int, dim: int, nlist: int) -> int:
    return n * (4 * dim + ID_BYTES) + nlist * dim * 4


def _bytes_ivf_pq(n: int, dim: int, nlist: int, m: int) -> int:
    return n * (m + ID_BYTES) + nlist * dim * 4 + 256 * dim * 4


def _bytes_ivf_fastscan(n: int, dim: int, nlist: int, m: int) -> int:
    """m 4-bit codes per vector (m/2 bytes), lists padded to blocks of 32, 16-centroid codebooks."""
    return n * (m // 2 + ID_BYTES) + nlist * (dim * 4 + FASTSCAN_BLOCK * m // 2) + 16 * dim * 4


def validate_factory(factory: str, dim: int) -> str:
    import faiss  # lazy: faiss
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ConfigError(f"invalid faiss factory string {factory!r} for dim {dim} ({e}); examples: "
                         "'Flat', 'IVF1024,Flat', 'IVF4096,PQ64', 'HNSW32,Flat', or 'auto'") from None
    return factory


def ivf_lists(factory: str) -> int | None:
    """The number of IVF lists a factory string names; None for a factory without IVF (Flat, HNSW...)."""
    ivf = re.search(r"IVF(\d+)", factory)
    return int(ivf.group(1)) if ivf else None


def lossy_codes(factory: str) -> bool:
    """Whether a factory stores compressed codes (PQ, SQ, residual or additive quantizers, LSH): its
    scores are approximate, so re-ranking candidates with the exact vectors can change the top-k."""
    return re.search(r"PQ|SQ|RQ|LSQ|LSH", factory) is not None


def min_training_vectors(factory: str) -> int:
    """The fewest training vectors faiss accepts for `factory`: one per IVF list, 2**nbits per PQ
    sub-quantizer (0 for a factory that needs no training)."""
    need = 0
    ivf = re.search(r"IVF(\d+)", factory)
    if ivf:
        need = int(ivf.group(1))
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", factory)
    if pq:
        need = max(need, 2 ** int(pq.group(2) or 8))
    return need


def check_trainable(factory: str, dim: int, num_vectors: int, what: str) -> None:
    """Refuse a factory that cannot be trained on `num_vectors` vectors, before any training."""
    need = min_training_vectors(factory)
    if need and needs_training(factory, dim) and num_vectors < need:
        raise ConfigError(f"faiss factory {factory!r} needs at least {need} training vectors; {what} "
                          f"{num_vectors}: use fewer IVF lists (about 4*sqrt(n)), a Flat index, or 'auto'")


def choose_factory(num_vectors: int, dim: int, memory_budget_bytes: int,
                   flat_threshold: int = 200_000, factory: str | None = None,
                   total_vectors: int | None = None) -> str:
    """The faiss factory string for one group of `num_vectors` vectors of `dim` float32 dims.

    A user-supplied `factory` (anything but None/"auto") wins; it is only validated. Otherwise,
    with n = num_vectors, T = `total_vectors` (the whole gallery when every group shares one
    trained quantizer; default n, a group on its own), nlist = `ivf_nlist(T)` (4*sqrt(T) rounded
    to a power of two, capped so each list gets >= 39 training points) and "fits" meaning one
    group's index RAM is within the budget:

    1. ``Flat`` (exact) if T < flat_threshold and n * (4*dim + 8) bytes fits;
    2. ``IVF{nlist},Flat`` if n * (4*dim + 8) + nlist * 4*dim bytes fits (exact vectors, probed lists);
    3. ``IVF{nlist},PQ{m}x4fs`` otherwise: fast-scan PQ with 4-bit codes, m the largest even
       divisor of dim with m <= dim/2 (sub-quantizers of >= 2 dims) such that
       n * (m/2 + 8) + nlist * (4*dim + 16*m) + 16 * 4*dim bytes fits. The codes only choose the
       candidates: re-ranking them with the vectors stored beside the index (index.search.rerank)
       restores the order, so short codes that fast-scan reads in SIMD registers beat long 8-bit
       codes (bench/recall.py: faster training and scan, higher recall at equal query time on
       real-embedding-derived vectors). The longest codes are kept: on clustered data, 4-dim
       sub-quantizers lose neighbours that no re-ranking depth up to 8 recovers (recall@100 0.88
       against 0.996 with 2-dim ones, tests/test_recall.py's mixture);
    4. ``IVF{nlist},PQ{m}`` (8-bit codes, m <= dim/2) where dim has no even divisor that fits.

    From HNSW_QUANTIZER_LISTS lists on, the coarse quantizer is an HNSW graph over the centroids
    (``IVF{nlist}_HNSW32``, as autofaiss's keys have it): assigning a vector to one of 2^16..2^19
    lists by a flat scan costs more than scanning the lists it probes.

    Groups that share a quantizer act as one index of T vectors: the lists are sized for T, so a
    query probing `nprobe` lists scans about nprobe * T / nlist vectors over all groups together,
    whatever the number of groups (with per-group lists it would be nprobe * T / nlist(n)).

    Raises when even PQ with 1-byte codes does not fit, or when PQ is needed for fewer vectors
    than it can be trained on (624 for 4-bit codes, 9984 for 8-bit): the message gives the bytes
    each option needs.
    """
    if factory is not None and factory != "auto":
        return validate_factory(factory, dim)
    if num_vectors < 1 or dim < 1:
        raise ValueError(f"need num_vectors >= 1 and dim >= 1; got {num_vectors}, {dim}")
    n, budget = int(num_vectors), int(memory_budget_bytes)
    total = n if total_vectors is None else int(total_vectors)
    if total < n:
        raise ValueError(f"total_vectors ({total}) must be >= the group's num_vectors ({n})")
    if total < flat_threshold and _bytes_flat(n, dim) <= budget:
        return "Flat"
    nlist = ivf_nlist(total)
    ivf = f"IVF{nlist}" + ("_HNSW32" if nlist >= HNSW_QUANTIZER_LISTS else "")
    if _bytes_ivf_flat(n, dim, nlist) <= budget:
        return f"{ivf},Flat"
    fast = [m for m in range(2, dim // 2 + 1, 2)
            if dim % m == 0 and _bytes_ivf_fastscan(n, dim, nlist, m) <= budget]
    if fast and total >= FASTSCAN_MIN_TRAIN:
        return f"{ivf},PQ{max(fast)}x4fs"
    fitting = [m for m in range(1, dim // 2 + 1) if dim % m == 0 and _bytes_ivf_pq(n, dim, nlist, m) <= budget]
    if not fitting or total < PQ_MIN_TRAIN:
        raise ConfigError(
            f"memory budget {budget} bytes is too small for {n} vectors of dim {dim}: Flat needs "
            f"{_bytes_flat(n, dim)}, IVF{nlist},Flat {_bytes_ivf_flat(n, dim, nlist)}, IVF{nlist},PQ2x4fs "
            f"{_bytes_ivf_fastscan(n, dim, nlist, 2)}, IVF{nlist},PQ1 {_bytes_ivf_pq(n, dim, nlist, 1)} bytes "
            f"(and PQ needs >= {FASTSCAN_MIN_TRAIN} vectors to train with 4-bit codes, {PQ_MIN_TRAIN} with "
            "8-bit); raise the budget or pass a factory string")
    return f"{ivf},PQ{max(fitting)}"


# ---------------------------------------------------------------- training

def _probe_dim(factory: str) -> int:
    """A dimension every size in the factory string divides (PQ m, OPQ m_d, PCA d...)."""
    return math.lcm(4, *(int(x) for x in re.findall(r"\d+", factory) if 0 < int(x) <= 4096))


def needs_training(factory: str, dim: int | None = None) -> bool:
    import faiss  # lazy: faiss
    return not faiss.index_factory(dim or _probe_dim(factory), factory, faiss.METRIC_INNER_PRODUCT).is_trained


def training_size(factory: str) -> int:
    """Training vectors to sample: 50 per IVF list, at least 65536 for PQ/other trained parts."""
    if not needs_training(factory):
        return 0
    ivf = re.search(r"IVF(\d+)", factory)
    size = TRAIN_POINTS_PER_LIST * int(ivf.group(1)) if ivf else 0
    rest = re.sub(r"IVF\d+(_HNSW\d+)?", "", factory).replace("Flat", "").strip(",")
    if rest or not ivf:   # PQ, SQ, OPQ, PCA...: trained on their own sample
        size = max(size, PQ_TRAIN)
    return size


def training_sample(blocks: Iterable[tuple[int, np.ndarray]], num_vectors: int, size: int,
                    seed: int = 0) -> np.ndarray:
    """float32 [min(size, n), dim]: a seeded uniform sample of rows from streamed (offset, vectors) blocks.

    Only the sampled rows are kept in memory; rows are drawn by position in the stream.
    """
    size = min(int(size), int(num_vectors))
    pick = np.sort(np.random.default_rng(seed).choice(num_vectors, size=size, replace=False))
    parts, pos = [], 0
    for _, vectors in blocks:
        lo, hi = np.searchsorted(pick, [pos, pos + len(vectors)])
        if hi > lo:
            parts.append(np.asarray(vectors[pick[lo:hi] - pos], dtype=np.float32))
        pos += len(vectors)
    if pos != num_vectors:
        raise ValueError(f"training_sample: blocks hold {pos} vectors; expected {num_vectors}")
    if not parts:
        raise ValueError("training_sample: no vectors to sample")
    return np.ascontiguousarray(np.concatenate(parts))


def gallery_sample_rows(counts: list[int], size: int, seed: int = 0) -> list[np.ndarray]:
    """Sorted row numbers to sample from each of several shards of `counts[i]` rows: `size` in all.

    Every shard contributes in proportion to its rows (largest-remainder rounding, so the shares
    sum to exactly min(size, total)); shard i's rows are drawn uniformly by a generator seeded
    with (seed, i). Deterministic for the seed, and each shard's draw depends only on its own row
    count and share, so the sample of a 140k-shard gallery is planned without touching any shard.
    """
    counts = [int(c) for c in counts]
    if any(c < 0 for c in counts):
        raise ValueError(f"shard row counts must be >= 0; got {counts}")
    total = sum(counts)
    size = min(int(size), total)
    if size < 0:
        raise ValueError(f"sample size must be >= 0; got {size}")
    if total == 0:
        return [np.empty(0, np.int64) for _ in counts]
    exact = np.array(counts, dtype=np.float64) * size / total
    share = np.floor(exact).astype(np.int64)
    rest = size - int(share.sum())
    if rest:   # the largest remainders get one more row; ties by shard position (stable sort)
        share[np.argsort(-(exact - share), kind="stable")[:rest]] += 1
    return [np.sort(np.random.default_rng([seed, i]).choice(c, size=int(m), replace=False)).astype(np.int64)
            if m else np.empty(0, np.int64) for i, (c, m) in enumerate(zip(counts, share))]


# ---------------------------------------------------------------- build, save, load

def _ivf(index):
    import faiss  # lazy: faiss
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def build_index(blocks: Iterable[tuple[np.ndarray, np.ndarray]], factory: str, dim: int,
                train_sample: np.ndarray | None, metric: int | None = None,
                nprobe: int | None = None, seed: int = 0, trained=None):
    """A faiss index over streamed (ids int64 [n], vectors [n, dim]) blocks.

    The index is trained (when the factory needs it) on `train_sample` only, with faiss's
    clustering seeded by `seed`, so two builds from the same input are identical. With `trained`
    (an empty trained index, e.g. `train_index`'s, shared by every group) a copy of it is filled
    instead and nothing is trained: every group built from it has the same centroids and codebooks.
    Blocks are added one at a time: building never holds more than one block besides the index
    itself. Indexes without their own id storage (Flat, HNSW...) are wrapped in IndexIDMap. IVF
    indexes get `nprobe` (default 32, at most nlist) as their search default.
    """
    import faiss  # lazy: faiss
    metric = faiss.METRIC_INNER_PRODUCT if metric is None else metric
    validate_factory(factory, dim)
    if trained is not None:
        if trained.d != dim or trained.metric_type != metric or not trained.is_trained or trained.ntotal:
            raise ValueError(f"trained index must be an empty trained index of dim {dim} and metric {metric}; "
                             f"got dim {trained.d}, metric {trained.metric_type}, "
                             f"is_trained {trained.is_trained}, ntotal {trained.ntotal}")
        index = faiss.clone_index(trained)
    else:
        index = faiss.index_factory(dim, factory, metric)
    ivf = _ivf(index)
    if ivf is None and not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.IndexIDMap(index)
    if not index.is_trained:
        if train_sample is None or len(train_sample) == 0:
            raise ValueError(f"factory {factory!r} needs training; pass train_sample "
                             f"(about {training_size(factory)} vectors, see training_sample)")
        x = np.ascontiguousarray(train_sample, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != dim:
            raise ValueError(f"train_sample must be [n, {dim}]; got {x.shape}")
        _seed_clustering(index, seed)
        index.train(x)
    if ivf is not None:
        ivf.nprobe = min(int(nprobe or DEFAULT_NPROBE), ivf.nlist)
    added = 0
    for ids, vectors in blocks:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != dim or ids.shape != (len(x),):
            raise ValueError(f"block {added}: expected ids [n] and vectors [n, {dim}]; "
                             f"got {ids.shape} and {x.shape}")
        if len(x):
            index.add_with_ids(x, ids)
        added += 1
    return index


def train_index(factory: str, dim: int, train_sample: np.ndarray, nprobe: int | None = None, seed: int = 0):
    """An empty index of `factory`, trained on `train_sample` (coarse quantizer, PQ codebooks...).

    Saved once and filled by every group (`build_index(..., trained=...)`), so the groups share
    one quantizer: a query's coarse assignment is the same in every group and is computed once.
    """
    return build_index([], factory, dim, train_sample, nprobe=nprobe, seed=seed)


def _seed_clustering(index, seed: int) -> None:
    """Seed every k-means faiss runs while training (coarse quantizer, PQ)."""
    import faiss  # lazy: faiss
    ivf = _ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        sub = faiss.downcast_index(ivf)
        if hasattr(sub, "pq"):
            sub.pq.cp.seed = seed
        if hasattr(sub, "do_polysemous_training"):
            # Hamming-filter codes serve only L2 polysemous search; training them takes minutes
            sub.do_polysemous_training = False
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if hasattr(inner, "pq"):
        inner.pq.cp.seed = seed
