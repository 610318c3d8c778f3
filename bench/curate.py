"""Benchmark: the cost of curation (selection, dedup, decontamination) next to the kNN search.

Prints one JSON object:

- ``fraction``: a gallery of >= 1M synthetic normalised vectors (two 512-d encoders, combined
  1024-d), 500 queries, N = 50k. Search = exact brute-force top-k (faiss IndexFlatIP), grown by
  ``select_with_search`` as query-balanced selection needs. Then dedup of the selected items'
  original-image features, decontamination against a EuroSAT-sized reference set (27k images),
  and a backfill re-selection. ``curation_over_search`` is the goal figure (<= 0.10).
- ``throughput``: dedup of 500k retrieved items and decontamination of 500k images against 100k
  references (items/s), with planted duplicates/leaks to report recall of the approximate (IVF)
  searches used at these sizes.

``--quick`` runs a smaller version of both (not the reported figures); ``--smoke`` a tiny one in
seconds (a check that the script runs; its figures mean nothing). ``targets`` holds the goal figure
as {"value", "goal", "met"}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import faiss
import numpy as np

from index.core.allocator import tune_allocator
from curation.decontam import find_leaks
from curation.dedup import duplicate_clusters, keep_one_per_cluster
from curation.selection import SearchCache, select_with_search


def unit(rng: np.random.Generator, n: int, d: int, chunk: int = 100_000) -> np.ndarray:
    out = np.empty((n, d), np.float32)
    for a in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - a), d), dtype=np.float32)
        out[a:a + x.shape[0]] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def near(x: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(x.shape, dtype=np.float32)
    noise -= (noise * x).sum(axis=1, keepdims=True) * x
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return (cos * x + np.sqrt(1 - cos ** 2) * noise).astype(np.float32)


def combined(parts: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(parts, axis=1) / np.sqrt(len(parts)), np.float32)


def bench_fraction(gallery: int, queries: int, n: int, refs: int, enc_dim: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    encoders = 2
    dim = encoders * enc_dim
    xb = unit(rng, gallery, dim)
    xq = unit(rng, queries, dim)
    index = faiss.IndexFlatIP(dim)
    index.add(xb)
    del xb

    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}

    class timed:
        """Accumulate wall and process-CPU seconds under a name (CPU time is less sensitive to
        other processes sharing the machine)."""
        def __init__(self, name: str):
            self.name = name

        def __enter__(self):
            self.t, self.c = time.perf_counter(), time.process_time()

        def __exit__(self, *exc):
            wall[self.name] = wall.get(self.name, 0.0) + time.perf_counter() - self.t
            cpu[self.name] = cpu.get(self.name, 0.0) + time.process_time() - self.c

    depths: list[int] = []

    def search(k: int):
        depths.append(k)
        with timed("search"):
            return index.search(xq, k)

    cache = SearchCache(search)
    sel = select_with_search(cache, n, seed, "query_balanced", k0=max(1, 2 * n // queries),
                             num_gallery=gallery)
    # selection time = the loop minus the searches it called: time it again on the cached lists
    with timed("select"):
        sel = select_with_search(cache, n, seed, "query_balanced", k0=cache.depth,
                                 num_gallery=gallery)

    # original-image features of the selected items (per encoder), 1% planted duplicates,
    # and 0.1% planted near-copies of references
    per_enc = [unit(rng, len(sel), enc_dim) for _ in range(encoders)]
    dup = rng.choice(len(sel), size=len(sel) // 100, replace=False)
    for f in per_enc:
        f[dup[1::2]] = near(f[dup[::2][:dup[1::2].size]], 0.998, rng)
    ref_feats = [unit(rng, refs, enc_dim) for _ in range(encoders)]
    leak_rows = rng.choice(len(sel), size=max(1, len(sel) // 1000), replace=False)
    for f, r in zip(per_enc, ref_feats):
        f[leak_rows] = near(r[rng.choice(refs, size=leak_rows.size, replace=False)], 0.97, rng)

    with timed("dedup"):
        labels = duplicate_clusters(combined(per_enc), 0.99)
        keep = keep_one_per_cluster(labels, np.arange(len(sel)))
    with timed("decontam"):
        report = find_leaks(per_enc, ref_feats, threshold=0.95)
    removed = np.union1d(sel.ids[~keep], sel.ids[report.flagged_indices])
    before = (wall["search"], cpu["search"])
    with timed("backfill"):
        final = select_with_search(cache, n, seed, "query_balanced", k0=cache.depth,
                                   num_gallery=gallery, removed=removed)
    wall["backfill"] -= wall["search"] - before[0]  # a deeper search, if one was needed
    cpu["backfill"] -= cpu["search"] - before[1]
    parts = ("select", "dedup", "decontam", "backfill")
    cur_wall, cur_cpu = sum(wall[p] for p in parts), sum(cpu[p] for p in parts)
    return {
        "gallery_vectors": gallery, "queries": queries, "n": n, "dim": dim,
        "references": refs, "search_depths": depths, "k_prime": sel.k,
        "wall_s": {k: round(v, 3) for k, v in wall.items()},
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "duplicates_removed": int((~keep).sum()), "leaks_flagged": len(report.leaks),
        "removed_total": int(removed.size), "final_size": len(final),
        "searches": cache.searches,
        "curation_over_search_wall": round(cur_wall / wall["search"], 4),
        "curation_over_search_cpu": round(cur_cpu / cpu["search"], 4), "goal": 0.10,
        # curation cost does not grow with the gallery, search does (linearly for exact search)
        "gallery_for_goal_cpu": int(gallery * cur_cpu / cpu["search"] / 0.10),
    }


def bench_throughput(items: int, refs: int, enc_dim: int, seed: int) -> dict:
    rng = np.random.default_rng(seed + 1)
    encoders = 2
    # dedup: combined features of retrieved original images, 1000 planted duplicate pairs
    x = unit(rng, items, encoders * enc_dim)
    src = rng.choice(items // 2, size=1000, replace=False)
    dst = items // 2 + rng.choice(items // 2, size=1000, replace=False)
    x[dst] = near(x[src], 0.995, rng)
    t, c = time.perf_counter(), time.process_time()
    labels = duplicate_clusters(x, 0.99)
    dedup_s, dedup_cpu = time.perf_counter() - t, time.process_time() - c
    dedup_recall = float((labels[src] == labels[dst]).mean())
    del x, labels

    imgs = [unit(rng, items, enc_dim) for _ in range(encoders)]
    ref_feats = [unit(rng, refs, enc_dim) for _ in range(encoders)]
    rows = rng.choice(items, size=500, replace=False)
    ref_rows = rng.choice(refs, size=500, replace=False)
    imgs[0][rows] = near(ref_feats[0][ref_rows], 0.96, rng)
    imgs[1][rows] = near(ref_feats[1][ref_rows], 0.90, rng)
    t, c = time.perf_counter(), time.process_time()
    report = find_leaks(imgs, ref_feats, threshold=0.95)
    decontam_s, decontam_cpu = time.perf_counter() - t, time.process_time() - c
    found = set(report.flagged_indices.tolist())
    return {
        "items": items, "references": refs, "dim_per_encoder": enc_dim, "encoders": encoders,
        "dedup_s": round(dedup_s, 2), "dedup_cpu_s": round(dedup_cpu, 2),
        "dedup_items_per_s": round(items / dedup_s),
        "dedup_planted_pair_recall": dedup_recall,
        "decontam_s": round(decontam_s, 2), "decontam_cpu_s": round(decontam_cpu, 2),
        "decontam_items_per_s": round(items / decontam_s),
        "decontam_planted_leak_recall": len(found & set(rows.tolist())) / rows.size,
        "decontam_false_flags": len(found - set(rows.tolist())),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller run")
    p.add_argument("--smoke", action="store_true", help="tiny run in seconds (a run check, not figures)")
    p.add_argument("--enc-dim", type=int, default=None, help="feature dim per encoder (2 encoders; default 512)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    enc_dim = args.enc_dim or (32 if args.smoke else 512)
    if args.smoke:
        frac = dict(gallery=20_000, queries=20, n=1_000, refs=1_000)
        thr = dict(items=4_000, refs=1_000)
    elif args.quick:
        frac = dict(gallery=100_000, queries=100, n=5_000, refs=5_000)
        thr = dict(items=50_000, refs=10_000)
    else:
        frac = dict(gallery=1_000_000, queries=500, n=50_000, refs=27_000)
        thr = dict(items=500_000, refs=100_000)
    t = time.perf_counter()
    out = {
        "bench": "curate", "quick": args.quick, "smoke": args.smoke, "threads": faiss.omp_get_max_threads(),
        "machine": platform.processor() or platform.machine(),
        "fraction": bench_fraction(**frac, enc_dim=enc_dim, seed=args.seed),
        "throughput": bench_throughput(**thr, enc_dim=enc_dim, seed=args.seed),
    }
    ratio = out["fraction"]["curation_over_search_cpu"]
    out["targets"] = {"curation_over_search_cpu": {"value": ratio, "goal": f"<= {out['fraction']['goal']}",
                                                   "met": ratio <= out["fraction"]["goal"]}}
    out["total_s"] = round(time.perf_counter() - t, 1)
    out["load_average_1m_end"] = os.getloadavg()[0]  # > threads: timings shared the CPU
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    tune_allocator()  # index.core.allocator: as every command runs
    main()
