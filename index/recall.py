"""Recall of approximate search: how much of the exact top-k a search returned, and the operating point
(IVF lists probed, re-ranking depth) that meets a recall target.

    estimate_recall(retrieved, sample, fraction, k)   recall@k from exact search over a sample of groups
    sample_groups(sizes, budget, seed)                 the groups searched exactly (whole groups, seeded)
    exact_in_groups(gindex, groups, queries, k)        exact top-k within those groups, from the stored vectors
    measure_operating_points(gindex, ...)              recall@k and query time per (nprobe, rerank) point
    choose_point(points, target, k)                    the fastest point that meets the target at depth k

The estimator. Exact search over the whole gallery costs what the gallery costs, so it runs over a
random sample of index groups holding a fraction f of the vectors. For one query with retrieved list
R (k ids, scored exactly) and exact top-k list S of the sample, the items of S missing from R stand
for 1/f missed items each in the whole gallery. Walking R and the missed items together by exact
score, each retrieved item weighing 1 and each missed item 1/f, the first k units of weight are the
estimated exact top-k; recall@k is the retrieved share of them. With f = 1 (every group sampled)
this is recall@k exactly: |R & S| / k. Every group is filled from one shared quantizer, so a query
probes the same lists in every group and the sample sees the search the run made.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from index import store
from index.knn import lossy_codes
from index.search import exact_search, rerank
from index.topk import check_queries

DEPTHS = (10, 100, 1000)              # recall@k measured at these depths (capped by the gallery)
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
RERANKS = (0, 2, 4, 8)             # candidates re-scored per result: 0 = faiss's own scores
POINTS_VERSION = 2                    # of what a measurement records (part of its fingerprint)
GOOD_ENOUGH = 0.999                   # a sweep over nprobe stops once every depth reaches this


def estimate_recall(retrieved: tuple[np.ndarray, np.ndarray], sample: tuple[np.ndarray, np.ndarray],
                    fraction: float, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """float64 [Q]: each query's estimated recall@k (module docstring).

    `retrieved`: (exact scores, ids) [Q, c] of what the search returned, sorted (its first k count);
    `sample`: (exact scores, ids) [Q, >=k] of exact search over groups holding `fraction` of the
    vectors; ids < 0 are padding. `exclude`: one id per query left out of both lists (a gallery
    vector used as a query finds itself; search k + 1 deep then). A query with nothing to find has
    recall 1.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    (rs, ri), (ss, si) = (tuple(np.asarray(a) for a in x) for x in (retrieved, sample))
    weight_missed = 1.0 / fraction
    out = np.empty(len(ri), dtype=np.float64)
    for q in range(len(ri)):
        keep_r, keep_s = ri[q] >= 0, si[q] >= 0
        if exclude is not None:
            keep_r &= ri[q] != exclude[q]
            keep_s &= si[q] != exclude[q]
        r_ids, r_scores = ri[q][keep_r][:k], rs[q][keep_r][:k]
        missed = keep_s & ~np.isin(si[q], r_ids)
        n_missed = int(missed.sum())
        scores = np.concatenate([r_scores, ss[q][missed]])
        weights = np.concatenate([np.ones(len(r_ids)), np.full(n_missed, weight_missed)])
        is_retrieved = np.concatenate([np.ones(len(r_ids), bool), np.zeros(n_missed, bool)])
        order = np.lexsort((~is_retrieved, -scores))   # by score; at a tie the retrieved item first
        before = np.cumsum(weights[order]) - weights[order]
        want = min(float(k), float(weights.sum()))
        out[q] = 1.0 if want <= 0 else min(1.0, is_retrieved[order][before < want].sum() / want)
    return out


def sample_groups(sizes: Sequence[int], budget: int, seed: int = 0) -> list[int]:
    """Positions of whole groups, in a seeded random order, until their vectors reach `budget` (at
    least one group): the sample exact search runs over. All groups when they fit."""
    order = np.random.default_rng(seed).permutation(len(sizes))
    picked, used = [], 0
    for g in order:
        if picked and used + sizes[g] > budget:
            continue
        picked.append(int(g))
        used += int(sizes[g])
    return sorted(picked)


def group_shards(gindex, groups: Sequence[int]) -> list[dict[str, Any]]:
    """The manifest shard entries of the given group positions."""
    names = {n for g in groups for n in gindex.manifest["groups"][g]["shards"]}
    return [s for s in gindex.shards if s["name"] in names]


def exact_in_groups(gindex, groups: Sequence[int], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (scores, ids) of `queries` within the given groups, streamed from the stored vectors."""
    shards = group_shards(gindex, groups)
    return exact_search(queries, store.iter_blocks(gindex.root, shards, gindex.encoder_names), k)


def exact_scores(gindex, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float32 [Q, c]: the exact scores of retrieved ids [Q, c] (-inf at padding), from the stored vectors."""
    return rerank(queries, ids, gindex.vectors_at, ids.shape[1])[0] if ids.size else np.zeros(ids.shape, np.float32)


@dataclass(frozen=True)
class Sample:
    """Exact search over a sample of groups, for queries at the depths measured."""
    queries: np.ndarray
    groups: list[int]
    vectors: int
    fraction: float
    exact: tuple[np.ndarray, np.ndarray]   # exact top-max(depths) within the sample
    seconds: float                         # that exact search's time
    exclude: np.ndarray | None = None

    def describe(self, num_groups: int, query_source: str) -> dict[str, Any]:
        return {"queries": int(len(self.queries)), "query_source": query_source, "groups": len(self.groups),
                "of_groups": int(num_groups), "vectors": int(self.vectors), "fraction": round(self.fraction, 6),
                "exact_seconds": round(self.seconds, 4),
                "exact_seconds_whole_estimate": round(self.seconds / self.fraction, 3)}


def exact_sample(gindex, queries: np.ndarray, k: int, budget: int, seed: int = 0,
                 exclude: np.ndarray | None = None) -> Sample:
    """Exact top-k of `queries` over a seeded sample of whole groups holding about `budget` vectors."""
    queries = check_queries(queries, k)
    sizes = [g["num_vectors"] for g in gindex.manifest["groups"]]
    groups = sample_groups(sizes, budget, seed)
    vectors = sum(sizes[g] for g in groups)
    t = time.perf_counter()
    exact = exact_in_groups(gindex, groups, queries, k + (exclude is not None))
    return Sample(queries, groups, vectors, vectors / max(1, gindex.num_vectors), exact,
                  time.perf_counter() - t, exclude)


def recall_of(gindex, sample: Sample, scores: np.ndarray, ids: np.ndarray, k: int, exact_scored: bool) -> float:
    """Mean estimated recall@k over the sample's queries of a search's (scores, ids)."""
    if not exact_scored:
        scores = exact_scores(gindex, sample.queries, ids)
    return float(estimate_recall((scores, ids), sample.exact, sample.fraction, k, sample.exclude).mean())


def depths(num_vectors: int, depths: Sequence[int] = DEPTHS) -> list[int]:
    """The measured depths a gallery of `num_vectors` can answer (at least one)."""
    kept = [k for k in depths if k < num_vectors]
    return kept or [max(1, num_vectors - 1)]


def measure_operating_points(gindex, sample: Sample, nlist: int, lossy: bool,
                             ks: Sequence[int] = DEPTHS,
                             log: Callable[[str], None] = lambda m: None) -> list[dict[str, Any]]:
    """Recall@k (estimated against `sample`) and seconds per query of `gindex.search` at each depth
    k in `ks`, for each point (nprobe, rerank): nprobe doubling up to nlist, and for indexes with
    lossy codes (`lossy`: PQ, SQ) each re-ranking depth in RERANKS (0: faiss's scores; r >= 1:
    r*max(k, 100) candidates re-scored from the stored vectors). A sweep over nprobe stops once every
    depth reaches GOOD_ENOUGH, or (after its first four points) once a query at every depth takes
    twice what exact search would over the whole index (estimated from the sample's). Searches run
    without the index's result cache."""
    points = []
    q = sample.queries
    extra = 1 if sample.exclude is not None else 0
    gindex.search(q[:1], 1, nprobe=1, cache=False)   # warm-up: the first search opens the index
    exact_per_query = sample.seconds / sample.fraction / len(q)
    for rr in (RERANKS if lossy else (0,)):
        nprobes = [p for p in NPROBES if p < nlist] + [nlist]
        for step, nprobe in enumerate(nprobes):
            recall, seconds = {}, {}
            for k in ks:
                t = time.perf_counter()
                s, i = gindex.search(q, k + extra, nprobe=nprobe, rerank=rr, cache=False)
                seconds[str(k)] = round((time.perf_counter() - t) / len(q), 6)
                recall[str(k)] = round(recall_of(gindex, sample, s, i, k, exact_scored=rr > 0), 4)
            points.append({"nprobe": nprobe, "rerank": rr, "recall": recall, "seconds_per_query": seconds})
            log(f"nprobe {nprobe:5d} rerank {rr}: recall {recall}, s/query {seconds}")
            if min(recall.values()) >= GOOD_ENOUGH or (step >= 3 and min(seconds.values()) > 2 * exact_per_query):
                break
    return points


def _at_depth(point: dict[str, Any], k: int, key: str) -> float:
    """The point's figure at the shallowest measured depth >= k (the deepest if none is)."""
    measured = sorted(int(d) for d in point[key])
    d = next((d for d in measured if d >= k), measured[-1])
    return float(point[key][str(d)])


def choose_point(points: Sequence[dict[str, Any]], target: float, k: int) -> dict[str, Any]:
    """The operating point in force at depth k: the fastest point whose recall@k (at the shallowest
    measured depth >= k) reaches `target`; when none does, the point of highest recall. Returns
    {"nprobe", "rerank", "k", "recall", "seconds_per_query", "target", "why"}."""
    if not points:
        raise ValueError("choose_point needs measured operating points")
    meeting = [p for p in points if _at_depth(p, k, "recall") >= target]
    if meeting:
        best = min(meeting, key=lambda p: (_at_depth(p, k, "seconds_per_query"), p["nprobe"], p["rerank"]))
        why = f"the fastest measured point with recall@{k} >= {target}"
    else:
        best = max(points, key=lambda p: (_at_depth(p, k, "recall"), -_at_depth(p, k, "seconds_per_query")))
        why = f"no measured point reaches recall@{k} {target}: the point of highest recall"
    return {"nprobe": best["nprobe"], "rerank": best["rerank"], "k": int(k),
            "recall": _at_depth(best, k, "recall"), "seconds_per_query": _at_depth(best, k, "seconds_per_query"),
            "target": target, "why": why}


def fixed_point(points: Sequence[dict[str, Any]], nprobe: int, rerank: int, target: float | None,
                k: int) -> dict[str, Any]:
    """The operating point a user fixed (nprobe, rerank), with its measured recall where it was measured."""
    match = [p for p in points if p["nprobe"] == nprobe and p["rerank"] == rerank]
    recall = _at_depth(match[0], k, "recall") if match else None
    return {"nprobe": int(nprobe), "rerank": int(rerank), "k": int(k), "recall": recall,
            "seconds_per_query": _at_depth(match[0], k, "seconds_per_query") if match else None,
            "target": target, "why": "set by the user" + ("" if match else " (not among the measured points)")}


def point_for(manifest: dict[str, Any], k: int, nprobe: int | None = None, rerank: int | None = None,
              target: float | None = None) -> dict[str, Any]:
    """The operating point a search at depth k runs at, from an index manifest's measured points:
    `nprobe` given fixes it (with `rerank`, default the index's); otherwise the fastest point reaching
    `target` (default the index's own, faiss.recall_target) at k, among those with `rerank` if given.
    An index without measured points (Flat, older, or built with recall_target null) runs at its
    recorded nprobe and rerank, or the ones given."""
    measured = manifest.get("recall") or {}
    points = measured.get("points") or []
    own = manifest.get("operating_point") or {}
    target = own.get("target") if target is None else target
    if not points:
        why = own.get("why", "recall not measured (an index built before operating points were recorded)")
        return {"nprobe": nprobe if nprobe is not None else manifest.get("nprobe"),
                "rerank": int(rerank if rerank is not None else manifest.get("rerank", 0)), "k": int(k),
                "recall": own.get("recall"), "seconds_per_query": None, "target": target,
                "why": "set by the user" if nprobe is not None or rerank is not None else why}
    if nprobe is not None:
        return fixed_point(points, nprobe, int(rerank if rerank is not None else manifest.get("rerank", 0)),
                           target, k)
    allowed = [p for p in points if rerank is None or p["rerank"] == rerank] or points
    return choose_point(allowed, target if target is not None else 0.95, k)


def estimate_run(gindex, queries: np.ndarray, scores: np.ndarray, ids: np.ndarray, k: int, budget: int,
                 seed: int = 0, rerank: int = 0, target: float | None = None) -> dict[str, Any]:
    """The estimated recall@k of a search that returned (scores, ids) [Q, k] for `queries`, by exact
    search over a seeded sample of whole groups of about `budget` vectors (`estimate_recall`): the
    mean over queries, the lowest query's, the sample it rests on and its cost. An exact (Flat)
    index has recall 1 without a sample."""
    factory = gindex.manifest["index_factory"]
    base = {"k": int(k), "queries": int(len(queries)), "target": target}
    if factory == "Flat":
        return {**base, "recall": 1.0, "min_query_recall": 1.0, "below_target": False, "sample": None,
                "why": "exact search (Flat)"}
    t = time.perf_counter()
    sample = exact_sample(gindex, queries, k, budget, seed)
    if rerank == 0 and lossy_codes(factory):
        scores = exact_scores(gindex, sample.queries, ids)
    per_query = estimate_recall((scores, ids), sample.exact, sample.fraction, k)
    mean = float(per_query.mean())
    return {**base, "recall": round(mean, 4), "min_query_recall": round(float(per_query.min()), 4),
            "below_target": target is not None and mean < target,
            "sample": sample.describe(len(gindex.manifest["groups"]), "this run's queries"),
            "seconds": round(time.perf_counter() - t, 3),
            "why": "estimated: exact search over a sample of index groups" if sample.fraction < 1 else
            "exact search over every group"}
