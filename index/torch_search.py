"""Exact inner-product top-k in torch (block GEMM + top-k), on the GPU or the CPU, with no cap on k.

faiss's GPU indexes refuse k above 2,048 while query-balanced selection can need more. This is
`index.search.exact_search`'s algorithm on a torch device: each block of gallery vectors gives one
GEMM against the queries; a per-query threshold (the k-th best score so far) drops every score
that k kept entries already beat, the few that pass are gathered and folded into the running top-k
by an exact selection. Ties at the k-th score are broken by the smaller id, and the result is
ordered by `index.topk.sort_topk`, so the lists are what `exact_search` returns for the same
scores.

On CUDA the GEMM runs in the vectors' own dtype (float16 as stored) with float32 accumulation and
output (``torch.mm(..., out_dtype=float32)``); the queries are rounded to that dtype, so scores are
exact for the rounded queries (within about 1e-3 of float32 queries' for unit vectors). On the CPU
everything is float32, as in `exact_search`.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from index.topk import EMPTY_ID, check_queries, sort_topk

CUDA_SCORE_BYTES = 2 << 30      # one block's [Q, rows] float32 scores on a GPU
CPU_SCORE_BYTES = 64 << 20


def cuda_available() -> bool:
    return torch.cuda.is_available()


def block_rows_for(num_queries: int, device: str) -> int:
    """Gallery rows per GEMM so that the [Q, rows] float32 score block fits its budget."""
    budget = CUDA_SCORE_BYTES if device.startswith("cuda") else CPU_SCORE_BYTES
    return int(max(1024, budget // (4 * num_queries) // 1024 * 1024))


def _scores(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[Q, b] float32 = q @ x.T; half-precision inputs accumulate and return float32."""
    if x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda:
        try:
            return torch.mm(q, x.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch without mm's out_dtype
            return torch.mm(q.float(), x.T.float())
    return torch.mm(q, x.T)


def select_topk(s: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best entries of each row by (higher score, smaller id), unordered, [Q, k] each; rows
    shorter than k are padded with (-inf, EMPTY_ID). torch.topk picks among entries tied at the k-th
    score arbitrarily; rows where that matters are redone with two stable sorts (id, then score)."""
    q, n = s.shape
    if n <= k:
        return (torch.nn.functional.pad(s, (0, k - n), value=-float("inf")),
                torch.nn.functional.pad(ids, (0, k - n), value=EMPTY_ID))
    vals, pos = torch.topk(s, k, dim=1, sorted=False)
    top_i = ids.gather(1, pos)
    kth = vals.min(dim=1, keepdim=True).values
    tied_all = (s == kth).sum(dim=1)
    tied_kept = (vals == kth).sum(dim=1)
    # a row is ambiguous if some tied entry was left out (then the kept tied ids must be the smallest)
    rows = torch.nonzero(tied_all > tied_kept).flatten()
    if len(rows):
        rs, ri = s[rows], ids[rows]
        by_id = torch.argsort(ri, dim=1, stable=True)
        rs, ri = rs.gather(1, by_id), ri.gather(1, by_id)
        by_score = torch.argsort(rs, dim=1, descending=True, stable=True)[:, :k]
        vals[rows], top_i[rows] = rs.gather(1, by_score), ri.gather(1, by_score)
    return vals, top_i


class TorchTopK:
    """The running exact top-k of Q queries over [Q, b] score blocks, on the scores' device."""

    def __init__(self, num_queries: int, k: int, device: torch.device):
        self.q, self.k, self.device = num_queries, k, device
        self.top_s = torch.full((num_queries, k), -float("inf"), device=device)
        self.top_i = torch.full((num_queries, k), EMPTY_ID, dtype=torch.int64, device=device)
        self.thr = torch.full((num_queries, 1), -float("inf"), device=device)
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.num_pending = 0

    def add(self, s: torch.Tensor, ids: torch.Tensor) -> None:
        """Fold in scores s [Q, b] of the vectors with ids [b]."""
        mask = s >= self.thr
        passing = int(mask.sum())
        if passing == 0:
            return
        if passing * 4 >= s.numel():  # dense (the first block): fold the whole block in now
            self._fold(s, ids.expand(self.q, -1))
            return
        qi, col = torch.nonzero(mask, as_tuple=True)
        self.pending.append((qi, s[qi, col], ids[col]))
        self.num_pending += passing
        if self.num_pending >= self.q * self.k:
            self._fold()

    def _fold(self, dense_s: torch.Tensor | None = None, dense_i: torch.Tensor | None = None) -> None:
        parts_s, parts_i = [self.top_s], [self.top_i]
        if self.pending:
            qi = torch.cat([p[0] for p in self.pending])
            ps = torch.cat([p[1] for p in self.pending])
            pi = torch.cat([p[2] for p in self.pending])
            self.pending, self.num_pending = [], 0
            order = torch.argsort(qi, stable=True)
            qi, ps, pi = qi[order], ps[order], pi[order]
            counts = torch.bincount(qi, minlength=self.q)
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.arange(len(qi), device=self.device) - starts[qi]
            width = int(counts.max())
            grid_s = torch.full((self.q, width), -float("inf"), device=self.device)
            grid_i = torch.full((self.q, width), EMPTY_ID, dtype=torch.int64, device=self.device)
            grid_s[qi, pos], grid_i[qi, pos] = ps, pi
            parts_s.append(grid_s)
            parts_i.append(grid_i)
        if dense_s is not None:
            parts_s.append(dense_s)
            parts_i.append(dense_i)
        if len(parts_s) == 1:
            return
        self.top_s, self.top_i = select_topk(torch.cat(parts_s, 1), torch.cat(parts_i, 1), self.k)
        self.thr = self.top_s.min(dim=1, keepdim=True).values

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._fold()
        return sort_topk(self.top_s.cpu().numpy(), self.top_i.cpu().numpy())


def _block_ids(ids: int | np.ndarray | torch.Tensor, start: int, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(ids, (int, np.integer)):
        return torch.arange(int(ids) + start, int(ids) + start + n, dtype=torch.int64, device=device)
    return torch.as_tensor(np.asarray(ids[start:start + n], dtype=np.int64) if not isinstance(ids, torch.Tensor)
                           else ids[start:start + n], device=device).to(torch.int64)


def torch_exact_search(queries: np.ndarray, blocks: Iterable[tuple[int | np.ndarray, np.ndarray | torch.Tensor]],
                       k: int, device: str = "cuda", block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of `queries` [Q, dim] over `(ids, vectors)` blocks, on `device`.

    `ids` is a block's first global id (row r has id ids + r) or an id array; `vectors` a numpy
    array (a memmap is fine: `block_rows` rows are moved at a time) or a tensor, possibly already
    on the device. Returns (scores [Q, k] float32, ids [Q, k] int64) as `exact_search` does.
    """
    queries = check_queries(queries, k)
    dev = torch.device(device)
    rows_per = block_rows or block_rows_for(len(queries), device)
    cuda = dev.type == "cuda"
    q32 = torch.from_numpy(queries).to(dev)
    qs: dict[torch.dtype, torch.Tensor] = {}
    running = TorchTopK(len(queries), k, dev)
    seen = 0
    with torch.no_grad():
        for ids, vectors in blocks:
            if vectors.ndim != 2 or vectors.shape[1] != queries.shape[1]:
                raise ValueError(f"expected [n, {queries.shape[1]}] vectors; got {tuple(vectors.shape)}")
            start = 0
            while start < len(vectors):
                step = min(rows_per, max(8 * k, 1024, seen))
                part = vectors[start:start + step]
                x = part.to(dev) if isinstance(part, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(part)).to(dev)
                if not cuda or x.dtype not in (torch.float16, torch.bfloat16):
                    x = x.float()
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(f"non-finite values in the block starting at row {seen} (NaN or inf)")
                q = qs.setdefault(x.dtype, q32.to(x.dtype))
                running.add(_scores(q, x), _block_ids(ids, start, len(x), dev))
                start += len(x)
                seen += len(x)
    return running.result()
