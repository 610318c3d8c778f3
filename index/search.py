"""Top-k search over the gallery: exact streaming search and fan-out over per-group FAISS indexes.

Every result here is ordered by one total order: higher inner product first, then smaller global id.
Rows with fewer than k results are padded with id -1 and score -inf.

- `exact_search(queries, blocks, k)`: exact top-k over (offset, vectors) blocks streamed from disk,
  with no index. A block's scores come from one float32 GEMM; a running per-query threshold (the
  current k-th best score) turns selection into a cheap comparison pass, so after the first block
  only the few columns that can still enter the top-k are merged. k is not capped (faiss GPU
  indexes cap k at 2048; query-balanced retrieval can need more).
- `ShardedIndex`: one FAISS index per shard group; `search` fans out and merges top-k exactly.
  Flat groups are searched by GEMM + top-k in torch on the GPU when CUDA is present
  (index.torch_search); IVF groups by faiss GPU when the `gpu` extra is installed (index.faiss_gpu).
- `assign_queries` / `search_groups`: groups that share one trained quantizer are searched with the
  queries' coarse assignment computed once (`IndexIVF.search_preassigned`), so a query costs what it
  costs in one index; `search_groups` is the unit of work of a fan-out (it opens only its groups,
  memory-mapped), `plan_group_tasks` packs groups into tasks under a memory budget.
- The exact per-row selection, ordering and merge all of them use are in `index.topk`.

One module of about 500 lines, over the usual size: every path here (exact, sharded, grouped)
returns the same total order with the same padding through the same selection helpers, and reads
best side by side. Index files are opened with `index.faiss_io`; imports go one way (knn and this
module both depend on faiss_io, neither on the other).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from index.core import contract
from index.core.atomic import read_json
from index.faiss_gpu import ivf_to_gpu
from index.faiss_io import load_index
from index.topk import EMPTY_ID, check_queries, merge_topk, select_topk, sort_topk
from index.torch_search import cuda_available, torch_exact_search

OPEN_TASKS_KEPT = 4        # search tasks whose opened groups a process keeps (see _opened_groups)
GPU_MAX_K = 2048           # faiss GPU indexes refuse k (and nprobe) above this
RERANK_MIN_K = 100         # re-ranking at depth r takes r * max(k, this) candidates: short codes
                           # order a shortlist of 4*10 too coarsely (recall@10 0.79 where 4*100 gives 0.97)
SCORE_BUFFER_BYTES = 64 << 20   # memory for one block's [rows, Q] float32 score matrix


def rerank_depth(k: int, rerank: int) -> int:
    """Candidates a search of depth k re-ranked at depth `rerank` asks its groups for (k when 0)."""
    return rerank * max(k, RERANK_MIN_K) if rerank else k


# ---------------------------------------------------------------- exact streaming search

def default_block_rows(num_queries: int, budget_bytes: int = SCORE_BUFFER_BYTES) -> int:
    """Gallery rows per GEMM: the [rows, Q] float32 score block stays within `budget_bytes`.

    Between 1024 and 65536 rows, a multiple of 1024. Measured on 2 cores (bench/search.py):
    16-64k rows keep the GEMM near peak while the merge overhead per block stays small.
    """
    rows = budget_bytes // (4 * num_queries)
    return int(min(65536, max(1024, rows // 1024 * 1024)))


def exact_search(queries: np.ndarray, blocks: Iterable[tuple[int, np.ndarray]], k: int,
                 block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of `queries` [Q, dim] over streamed `(offset, vectors)` blocks.

    A block's row r has global id ``offset + r``; vectors are float16 or float32 [n, dim] (a memmap
    is fine: only `block_rows` rows are converted at a time). Returns (scores [Q, k] float32,
    ids [Q, k] int64) sorted by (higher score, smaller id), padded with (-inf, -1).

    Memory is O(Q * (k + block_rows)), whatever the gallery size. The result is exact: a column
    is skipped only when its score is below the query's current k-th best, i.e. when k entries
    already beat it strictly. Callers with very many queries split them into batches.
    """
    def with_ids():
        for offset, vectors in blocks:
            if not isinstance(offset, (int, np.integer)) or offset < 0:
                raise ValueError(f"block offsets are global row ids, integers >= 0; got {offset!r}")
            yield int(offset), vectors
    return _search_blocks(check_queries(queries, k), with_ids(), k, block_rows)


def _search_blocks(queries: np.ndarray, blocks: Iterable[tuple[int | np.ndarray, np.ndarray]], k: int,
                   block_rows: int | None) -> tuple[np.ndarray, np.ndarray]:
    """exact_search over blocks whose ids are an offset (row r has id offset + r) or an id array."""
    nq, dim = queries.shape
    qt = np.ascontiguousarray(queries.T)          # [dim, Q]: X @ qt is the fastest GEMM layout here
    rows_per = block_rows or default_block_rows(nq)
    running = RunningTopK(nq, k)
    # a reused score buffer: a fresh 64 MB array per block costs page faults comparable to the GEMM
    s_buf = np.empty((rows_per, nq), dtype=np.float32)
    # Warm-up: the first block is folded in whole (nothing to compare against yet), so it is kept
    # small (8k rows); later blocks double up to rows_per, while only ~k/seen of each passes.
    seen = 0
    for ids, vectors in blocks:
        if vectors.ndim != 2 or vectors.shape[1] != dim:
            raise ValueError(f"block {ids if np.isscalar(ids) else ''}: expected [n, {dim}] vectors; "
                             f"got {vectors.shape}")
        start = 0
        while start < len(vectors):
            step = min(rows_per, max(8 * k, 1024, seen))
            x = np.asarray(vectors[start:start + step], dtype=np.float32)
            block_ids = ids + start if np.isscalar(ids) else ids[start:start + step]
            running.add(np.matmul(x, qt, out=s_buf[:len(x)]), block_ids)
            start += len(x)
            seen += len(x)
    return running.result()


class RunningTopK:
    """Exact running top-k of Q queries over score blocks [b, Q] (one row per gallery vector).

    Each query keeps its k best (score, id) and a threshold, the k-th best score so far. An entry
    of a new block below its query's threshold is beaten strictly by k kept entries and is dropped
    at the cost of one comparison; the rest wait in a pending list, folded into the top-k (an
    exact selection) once about Q*k of them have gathered. Thresholds only rise at a fold, so
    between folds a little more passes; folds stay few (their spacing grows as the threshold
    tightens).
    """

    def __init__(self, num_queries: int, k: int):
        self.q, self.k = num_queries, k
        self.top_s = np.full((num_queries, k), -np.inf, dtype=np.float32)
        self.top_i = np.full((num_queries, k), EMPTY_ID, dtype=np.int64)
        self.thr = np.full(num_queries, -np.inf, dtype=np.float32)   # -inf until k seen
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []   # (query, score, id)
        self.num_pending = 0
        self._mask = np.empty(0, dtype=bool)

    def add(self, s: np.ndarray, ids: int | np.ndarray) -> None:
        """Fold in scores s [b, Q]; row r has id `ids + r` (an int offset) or `ids[r]` (an array)."""
        b, nq = s.shape
        first_id = ids if np.isscalar(ids) else (ids[0] if len(ids) else 0)
        if nq != self.q:
            raise ValueError(f"score block has {nq} columns; expected {self.q} queries")
        if not np.isfinite(s.sum()):   # one cheap pass; a NaN would fail every comparison silently
            raise ValueError(f"non-finite similarity in the block starting at id {first_id} "
                             "(NaN or inf in the vectors)")
        if self._mask.size < s.size:
            self._mask = np.empty(s.size, dtype=bool)
        mask = self._mask[:s.size].reshape(s.shape)
        np.greater_equal(s, self.thr, out=mask)
        passing = np.count_nonzero(mask)
        if passing == 0:
            return
        if passing * 4 >= s.size:
            # dense (first block, or tiny blocks): every query folds the whole block in now
            dense_s = np.ascontiguousarray(s.T)
            row_ids = np.arange(ids, ids + b, dtype=np.int64) if np.isscalar(ids) else np.asarray(ids, np.int64)
            dense_i = np.broadcast_to(row_ids, dense_s.shape)
            self._fold(dense_s, dense_i)
            return
        flat = np.flatnonzero(mask)             # row-major: vector, then query
        rows = flat // nq
        self.pending.append((flat % nq, s.ravel()[flat], ids + rows if np.isscalar(ids) else ids[rows]))
        self.num_pending += len(flat)
        if self.num_pending >= self.q * self.k:
            self._fold()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], ids [Q, k]) sorted by (higher score, smaller id), padded (-inf, -1)."""
        self._fold()
        return sort_topk(self.top_s, self.top_i)

    def _fold(self, dense_s: np.ndarray | None = None, dense_i: np.ndarray | None = None) -> None:
        rows = np.arange(self.q)
        parts_s, parts_i = [self.top_s], [self.top_i]
        if self.pending:
            qi = np.concatenate([p[0] for p in self.pending])
            order = np.argsort(qi.astype(np.uint16) if self.q <= 65535 else qi, kind="stable")  # radix
            qi = qi[order]
            counts = np.bincount(qi, minlength=self.q)
            pos = np.arange(len(qi)) - (np.cumsum(counts) - counts)[qi]
            width = int(counts.max())
            ps = np.full((self.q, width), -np.inf, dtype=np.float32)
            pi = np.full((self.q, width), EMPTY_ID, dtype=np.int64)
            ps[qi, pos] = np.concatenate([p[1] for p in self.pending])[order]
            pi[qi, pos] = np.concatenate([p[2] for p in self.pending])[order]
            self.pending, self.num_pending = [], 0
            if dense_s is None:
                rows = np.flatnonzero(counts)   # queries with nothing pending keep their top-k
                ps, pi = ps[rows], pi[rows]
                parts_s, parts_i = [self.top_s[rows]], [self.top_i[rows]]
            parts_s.append(ps)
            parts_i.append(pi)
        elif dense_s is None:
            return
        if dense_s is not None:
            parts_s.append(dense_s)
            parts_i.append(dense_i)
        new_s, new_i = select_topk(np.concatenate(parts_s, axis=1), np.concatenate(parts_i, axis=1), self.k)
        self.top_s[rows] = new_s
        self.top_i[rows] = new_i
        self.thr[rows] = new_s.min(axis=1)


# ---------------------------------------------------------------- exact re-ranking

def rerank(queries: np.ndarray, candidates: np.ndarray, vectors_at, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k of each query's candidate ids [Q, c], re-scored with their stored vectors.

    IndexRefine's semantics without a second copy of the vectors: `vectors_at(ids)` returns the
    float32 vectors [n, dim] of unique global ids (index.store.vectors_at reads them by row from the
    memory-mapped embedding shards). Ids < 0 are padding. Returns (scores [Q, k], ids [Q, k]) sorted
    by (higher score, smaller id), padded with (-inf, -1); each candidate's vector is read once,
    however many queries share it.
    """
    queries = check_queries(queries, k)
    candidates = np.asarray(candidates, dtype=np.int64)
    valid = candidates >= 0
    uniq, inverse = np.unique(candidates[valid], return_inverse=True)
    vectors = vectors_at(uniq) if len(uniq) else np.zeros((0, queries.shape[1]), np.float32)
    slot = np.full(candidates.shape, -1, dtype=np.int64)
    slot[valid] = inverse
    scores = np.full(candidates.shape, -np.inf, dtype=np.float32)
    ids = np.where(valid, candidates, EMPTY_ID)
    for q in range(len(candidates)):   # one [c, dim] @ [dim] product per query: c*dim floats at a time
        rows = slot[q][valid[q]]
        scores[q, valid[q]] = vectors[rows] @ queries[q]
    return sort_topk(*select_topk(scores, ids, k))


# ---------------------------------------------------------------- fan-out over FAISS groups

def _is_gpu(index) -> bool:
    return type(index).__name__.startswith("Gpu")


def flat_arrays(index) -> tuple[np.ndarray, np.ndarray] | None:
    """(vectors [n, d] float32, ids [n] int64) viewed in place for a CPU flat inner-product index.

    None for any other index. The views share memory with the index: keep it alive while using them.
    """
    import faiss  # lazy: faiss
    ids = None
    inner = index
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(index.index)
        ids = faiss.rev_swig_ptr(index.id_map.data(), index.ntotal) if index.ntotal else np.empty(0, np.int64)
    if not isinstance(inner, faiss.IndexFlat) or inner.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    n, d = int(inner.ntotal), int(inner.d)
    vectors = faiss.rev_swig_ptr(inner.get_xb(), n * d).reshape(n, d) if n else np.empty((0, d), np.float32)
    return vectors, (np.arange(n, dtype=np.int64) if ids is None else ids)


class ShardedIndex:
    """One FAISS inner-product index per shard group, searched as one index.

    `search` queries every group for its own top-k and merges them exactly by (higher score,
    smaller id). Flat groups are searched by `exact_search`'s streaming top-k over the index's own
    vectors (exact, ties included, and faster than faiss's heap at large k); approximate groups
    (IVF, HNSW...) by faiss, which picks among entries tied at its k-th score itself. k is not
    capped: a GPU index asked for more than 2048 results is searched through a CPU copy.
    """

    def __init__(self, indexes: Sequence, nprobe: int | None = None):
        import faiss  # lazy: faiss
        if not indexes:
            raise ValueError("ShardedIndex needs at least one index")
        dims = {ix.d for ix in indexes}
        if len(dims) != 1:
            raise ValueError(f"all group indexes must share one dimension; got {sorted(dims)}")
        for g, ix in enumerate(indexes):
            if ix.metric_type != faiss.METRIC_INNER_PRODUCT:
                raise ValueError(f"group {g}: expected an inner-product index (metric "
                                 f"{faiss.METRIC_INNER_PRODUCT}); got metric {ix.metric_type}")
        self.indexes = list(indexes)
        self.nprobe = nprobe
        self._cpu_copies: dict[int, object] = {}

    @classmethod
    def from_dir(cls, index_dir: str | os.PathLike, mmap: bool = False,
                 nprobe: int | None = None, manifest: dict | None = None) -> "ShardedIndex":
        """Open the groups listed in an index directory's manifest (index.core.contract).

        Groups that share one trained quantizer (manifest ``shared_quantizer``) are opened as one
        IVF index (`stack_groups`): their lists moved into it (in RAM) or viewed in place (`mmap`).
        """
        root = Path(index_dir)
        manifest = read_json(root / contract.MANIFEST_FILE) if manifest is None else manifest
        indexes = [load_index(root / g["file"], mmap=mmap) for g in manifest["groups"]]
        trained = manifest.get("trained_index")
        if manifest.get("shared_quantizer") and trained:
            indexes = [stack_groups(indexes, load_index(root / trained["file"]), move=not mmap)]
        return cls(indexes, nprobe=nprobe if nprobe is not None else manifest.get("nprobe"))

    @property
    def d(self) -> int:
        return self.indexes[0].d

    @property
    def ntotal(self) -> int:
        return sum(int(ix.ntotal) for ix in self.indexes)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               assign: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] float32, ids [Q, k] int64), sorted, padded with (-inf, -1).

        `nprobe` (default: the one given at construction, else each index's own) applies to IVF
        groups and is ignored by flat ones. `assign` (`assign_queries`' (scores, lists) [Q, p]) is
        the queries' coarse assignment by the quantizer every IVF group shares: each IVF group
        then scans those p lists (`search_preassigned`) instead of running its quantizer again.
        It is only valid for groups filled from that one trained index.
        """
        queries = check_queries(queries, k)
        if queries.shape[1] != self.d:
            raise ValueError(f"queries have dim {queries.shape[1]}; the index has dim {self.d}")
        if assign is not None:
            assign = _check_assign(assign, len(queries))
        nprobe = nprobe if nprobe is not None else self.nprobe
        parts = [self._search_group(g, queries, k, nprobe, assign) for g in range(len(self.indexes))]
        return merge_topk(parts, k)

    def _search_group(self, g: int, queries: np.ndarray, k: int, nprobe: int | None,
                      assign: tuple[np.ndarray, np.ndarray] | None = None):
        import faiss  # lazy: faiss
        index = self.indexes[g]
        flat = flat_arrays(index)
        if flat is not None:
            vectors, ids = flat
            if cuda_available():  # the same top-k by block GEMM + top-k on the GPU (index.torch_search)
                return torch_exact_search(queries, [(ids, vectors)], k, device="cuda")
            rows = default_block_rows(len(queries))
            return _search_blocks(queries, ((ids[a:a + rows], vectors[a:a + rows])
                                            for a in range(0, len(vectors), rows)), k, rows)
        if _is_gpu(index) and k > GPU_MAX_K:
            if g not in self._cpu_copies:
                self._cpu_copies[g] = faiss.index_gpu_to_cpu(index)
            index = self._cpu_copies[g]
        kk = min(k, max(int(index.ntotal), 1))   # faiss pads to k anyway; don't ask for more
        try:
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError:
            ivf = None
        if ivf is not None and assign is not None and _is_plain_ivf(index):
            scores, lists = assign
            saved = ivf.nprobe
            ivf.nprobe = lists.shape[1]   # faiss's wrapper checks the lists' width against nprobe
            try:
                return ivf.search_preassigned(queries, kk, lists, scores)
            finally:
                ivf.nprobe = saved
        if ivf is None or nprobe is None:
            return index.search(queries, kk)
        saved = ivf.nprobe
        ivf.nprobe = int(nprobe)
        try:
            return index.search(queries, kk)
        finally:
            ivf.nprobe = saved


# ---------------------------------------------------------------- one shared quantizer, fan-out

def _is_plain_ivf(index) -> bool:
    """An IndexIVF searched on the raw queries (no pre-transform or refinement around it)."""
    import faiss  # lazy: faiss
    return isinstance(faiss.downcast_index(index), faiss.IndexIVF)


def _check_assign(assign: tuple[np.ndarray, np.ndarray], num_queries: int) -> tuple[np.ndarray, np.ndarray]:
    scores, lists = (np.asarray(a) for a in assign)
    if scores.shape != lists.shape or lists.ndim != 2 or len(lists) != num_queries or lists.shape[1] < 1:
        raise ValueError(f"assign must be (scores, lists), both [{num_queries}, nprobe]; "
                         f"got shapes {scores.shape} and {lists.shape}")
    return np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(lists, dtype=np.int64)


def assign_queries(trained, queries: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """The queries' coarse assignment by an IVF index's quantizer: (scores, lists) [Q, min(nprobe, nlist)].

    `trained` is the shared trained (empty) index every group was filled from, or any group of
    it: they hold the same quantizer. These are the lists `index.search` would probe, computed
    once for all groups instead of once per group.
    """
    if not _is_plain_ivf(trained):
        raise ValueError(f"assign_queries needs a plain IVF index (no pre-transform); got {type(trained).__name__}")
    import faiss  # lazy: faiss
    ivf = faiss.extract_index_ivf(trained)
    if not isinstance(nprobe, (int, np.integer)) or nprobe < 1:
        raise ValueError(f"nprobe must be a positive integer; got {nprobe!r}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    return ivf.quantizer.search(queries, min(int(nprobe), int(ivf.nlist)))


def stack_groups(indexes: Sequence, trained, move: bool = False):
    """One IVF index over groups filled from the same trained index: list l is every group's list l.

    A query then scans each probed list once, in one faiss call with one result heap and one
    distance table, as in a single index, instead of once per group. `move`: the groups' entries
    are moved into a copy of `trained` (`merge_from`; the groups are left empty; the index holds
    what the groups held). Otherwise the lists are viewed in place (faiss HStackInvertedLists,
    read-only: works on memory-mapped groups and reads only the probed lists); the view keeps
    the groups alive. Within a list, group g's entries come before group g+1's.
    """
    import faiss  # lazy: faiss
    if not indexes:
        raise ValueError("stack_groups needs at least one group")
    if not _is_plain_ivf(trained):
        raise ValueError(f"stack_groups needs a plain IVF trained index; got {type(trained).__name__}")
    ivfs = []
    for g, ix in enumerate(indexes):
        if not _is_plain_ivf(ix) or type(faiss.downcast_index(ix)) is not type(faiss.downcast_index(trained)):
            raise ValueError(f"group {g} ({type(ix).__name__}) was not filled from the trained index "
                             f"({type(trained).__name__})")
        ivf = faiss.extract_index_ivf(ix)
        if ivf.nlist != faiss.extract_index_ivf(trained).nlist or ivf.code_size != faiss.extract_index_ivf(trained).code_size:
            raise ValueError(f"group {g}: nlist/code size differ from the trained index's")
        ivfs.append(ivf)
    out = faiss.clone_index(trained)
    out_ivf = faiss.extract_index_ivf(out)
    if move:
        for ivf in ivfs:
            out_ivf.merge_from(ivf, 0)
        return out
    ptrs = faiss.InvertedListsPtrVector()
    for ivf in ivfs:
        ptrs.push_back(ivf.invlists)
    stacked = faiss.HStackInvertedLists(ptrs.size(), ptrs.data())
    out_ivf.replace_invlists(stacked, False)
    out_ivf.ntotal = sum(int(ivf.ntotal) for ivf in ivfs)
    out.referenced_objects = [stacked, ptrs, *indexes]   # faiss holds raw pointers: keep the owners alive
    return out


def search_groups(root: str | os.PathLike, group_files: Sequence[str], queries: np.ndarray, k: int,
                  nprobe: int | None = None, assign: tuple[np.ndarray, np.ndarray] | None = None,
                  trained_file: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Merged top-k (scores, ids) [Q, k] of the listed groups of an index directory.

    The unit of work of a search fan-out: it opens only `group_files` (paths relative to `root`),
    memory-mapped (`faiss_io.load_index(mmap=True)`: a search faults in the probed lists, or a Flat
    group's vectors, as page cache), searches them and closes them. With `trained_file` (the
    shared trained index the groups were filled from) the groups are searched as one index
    (`stack_groups`), with `assign` (`assign_queries`, computed once for all tasks) as the coarse
    assignment; without, group by group as `ShardedIndex.search` does. Pure: the result depends
    only on the files and the arguments, so tasks run anywhere and merge with `merge_topk`.
    """
    if not group_files:
        raise ValueError("search_groups needs at least one group file")
    root = Path(root)
    files = tuple(group_files) + ((trained_file,) if trained_file is not None else ())
    stamp = tuple((st.st_size, st.st_mtime_ns) for st in (os.stat(root / f) for f in files))
    return _opened_groups(str(root), tuple(group_files), trained_file, stamp).search(queries, k, nprobe, assign)


@functools.lru_cache(maxsize=OPEN_TASKS_KEPT)
def _opened_groups(root: str, group_files: tuple[str, ...], trained_file: str | None,
                   stamp: tuple) -> "ShardedIndex":
    """A task's groups, opened memory-mapped and kept open for the next search of the same groups in
    this process (query-balanced selection deepens k, backfill searches again): their lists stay page
    cache, which the kernel reclaims, not process memory. `stamp` (sizes and mtimes) keys the files'
    contents, so a rebuilt index is opened afresh."""
    indexes = [load_index(Path(root) / f, mmap=True) for f in group_files]
    if trained_file is not None:
        indexes = [stack_groups(indexes, load_index(Path(root) / trained_file))]
    return ShardedIndex([ivf_to_gpu(ix) for ix in indexes])


def plan_group_tasks(sizes: Sequence[int], budget_bytes: int) -> list[list[int]]:
    """Consecutive group positions packed into tasks whose files sum to at most `budget_bytes`.

    A group larger than the budget gets a task of its own (one group is the unit). Every group is
    in exactly one task, in order.
    """
    if budget_bytes < 1:
        raise ValueError(f"budget_bytes must be >= 1; got {budget_bytes}")
    tasks: list[list[int]] = []
    used = 0
    for g, size in enumerate(sizes):
        if size < 0:
            raise ValueError(f"group {g}: file size must be >= 0; got {size}")
        if tasks and used + size <= budget_bytes:
            tasks[-1].append(g)
            used += size
        else:
            tasks.append([g])
            used = size
    return tasks


@dataclass(frozen=True)
class GroupSearchTask:
    """One task of a search fan-out: plain data (numpy arrays), so it travels to a Ray worker."""
    root: str
    files: tuple[str, ...]
    queries: np.ndarray
    k: int
    nprobe: int | None = None
    assign: tuple[np.ndarray, np.ndarray] | None = None
    trained_file: str | None = None


def run_group_search(task: GroupSearchTask) -> tuple[np.ndarray, np.ndarray]:
    return search_groups(task.root, task.files, task.queries, task.k, task.nprobe, task.assign, task.trained_file)


def group_search_worker():
    """The `make_worker` of a search fan-out (`executor.map(group_search_worker, tasks)`)."""
    return run_group_search
