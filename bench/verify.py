"""Benchmark: copy verification, one pair at a time (`copy_match`) against batched (`match_pairs`).

Candidate pairs as curation verifies them: each gallery image (a held-out image of a set, or a
planted copy of one, every kind of `curation.copies`) against its nearest distinct references by
pixel key (`curation.pixelkey`; the hardest look-alikes), the copies also against their source.
Sets: Fashion-MNIST (28 px thumbnails), scikit-image tiles (96 px), Tux Paint stamps (31..128 px,
varied shapes). Both ways verify the same pairs in one run; their matches are compared (largest
score difference, decisions under the calibrated rules of `bench/results/copydetect_quick.json`).
Prints one JSON object with a top-level ``targets``.

    python bench/verify.py [--quick | --smoke] [--device cpu|cuda] [--neighbours 32]

``--smoke``: a few pairs a set, a check that the script runs (its figures mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from index.core.allocator import tune_allocator
from curation import pixelkey
from curation.copies import COPY_KINDS, copy_rng, make_copy
from curation.verify import Thumb, VerifyRule, copy_match
from curation.verify_batch import match_pairs
from index.device import pick_device

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers shared with the tests
from fixtures_samples import SAMPLES  # noqa: E402

GOAL = 20_000   # pairs/s on the 2-core reference machine
RULES = [VerifyRule(0.745734, 13.7998), VerifyRule(0.740866, 12.4387), VerifyRule(0.78845, 12.345),
         VerifyRule(0.980998, 4.3537)]


def candidate_pairs(name: str, pool: int, gallery: int, neighbours: int, seed: int = 0) -> list[tuple[Thumb, Thumb]]:
    images, labels = SAMPLES[name](pool, seed)
    refs = [Thumb.of(im) for im in images]
    held = list(range(gallery))
    copies = [(make_copy(images[i], k, copy_rng(seed + 1, i, k)), i) for i in held for k in COPY_KINDS]
    queries = [(images[i], i) for i in held] + copies
    keys = pixelkey.keys([q for q, _ in queries])
    sims = pixelkey.similarity(keys, pixelkey.keys(images))
    pairs = []
    for q, ((im, src), s) in enumerate(zip(queries, sims)):
        t = Thumb.of(im)
        s[src] = -np.inf                                        # its distinct references ...
        near = np.argsort(-s, kind="stable")[:neighbours]
        pairs += [(t, refs[j]) for j in near]
        if q >= len(held):                                      # ... and a planted copy's source
            pairs.append((t, refs[src]))
    return pairs


def rate(fn, pairs) -> tuple[float, float, list]:
    """(pairs per wall-clock second, pairs per CPU second of this process, results): on a shared
    machine the CPU-time rate is the steadier figure (it does not count time other jobs ran)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn(pairs)
    return len(pairs) / (time.perf_counter() - t), len(pairs) / max(1e-9, time.process_time() - c), out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small run (seconds)")
    p.add_argument("--smoke", action="store_true", help="tiny run: checks that the script runs")
    p.add_argument("--device", default=None, help="torch device for match_pairs (default: CUDA when present)")
    p.add_argument("--neighbours", type=int, default=32, help="references verified per gallery image")
    p.add_argument("--single", type=int, default=400, help="pairs timed one at a time per set")
    args = p.parse_args(argv)
    small = args.quick or args.smoke
    sizes = {"fashion_mnist": (40 if args.smoke else 200, 1 if args.smoke else 4 if args.quick else 40),
             "skimage": (20 if args.smoke else 120, 1 if small else 6),
             "stamps": (20 if args.smoke else 120, 1 if small else 6)}
    neighbours = min(args.neighbours, 2 if args.smoke else 8) if small else args.neighbours
    single_n = min(args.single, 10 if args.smoke else 60) if small else args.single
    dev = torch.device(pick_device(args.device))
    out: dict = {"bench": "verify", "quick": args.quick, "smoke": args.smoke, "neighbours": neighbours, "device": str(dev),
                 "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "torch_threads": torch.get_num_threads(),
                 "note": "measured on a shared machine (other jobs running): rates are lower bounds",
                 "load_average_1min": round(os.getloadavg()[0], 2), "sets": {}}
    total_pairs, total_batched, total_single, total_cpu = 0, 0.0, 0.0, 0.0
    for name, (pool, gallery) in sizes.items():
        pairs = candidate_pairs(name, pool, gallery, neighbours)
        for a, b in pairs:
            _ = a.flat, b.flat                                   # thumbnails are made before either timing
        sub = pairs[::max(1, len(pairs) // single_n)][:single_n]
        single_rate, single_cpu, want = rate(lambda ps: [copy_match(a, b) for a, b in ps], sub)
        match_pairs(pairs[:8], device=str(dev))                  # warm-up (CUDA context, FFT plans)
        batched_rate, batched_cpu, got = rate(lambda ps: match_pairs(ps, device=str(dev)), pairs)
        step = max(1, len(pairs) // single_n)
        w = np.array(want, np.float64).reshape(-1, 2)
        g = np.array(got[::step][:single_n], np.float64).reshape(-1, 2)
        same = [bool(np.array_equal(r.accepts(w[:, 0], w[:, 1]), r.accepts(g[:, 0], g[:, 1]))) for r in RULES]
        sizes_seen = sorted({(a.size, b.size) for a, b in pairs})
        out["sets"][name] = {
            "pairs": len(pairs), "shape_groups": len(sizes_seen),
            "single_pairs_per_s": round(single_rate, 1), "batched_pairs_per_s": round(batched_rate, 1),
            "speedup": round(batched_rate / single_rate, 2),
            "single_pairs_per_cpu_s": round(single_cpu, 1), "batched_pairs_per_cpu_s": round(batched_cpu, 1),
            "speedup_cpu_time": round(batched_cpu / single_cpu, 2),
            "compared_pairs": len(w), "max_score_difference": float(np.nanmax(np.abs(w - g)[:, 0], initial=0.0)),
            "same_nan": bool(np.array_equal(np.isnan(w), np.isnan(g))), "same_decisions": all(same)}
        total_pairs += len(pairs)
        total_batched += len(pairs) / batched_rate
        total_single += len(pairs) / single_rate
        total_cpu += len(pairs) / batched_cpu
    value = round(total_pairs / total_batched, 1)
    out["all"] = {"pairs": total_pairs, "single_pairs_per_s": round(total_pairs / total_single, 1),
                  "batched_pairs_per_s": value, "batched_pairs_per_cpu_s": round(total_pairs / total_cpu, 1)}
    out["all"]["target_measured"] = f"match_pairs on {dev}, on a shared machine (other jobs running)"
    out["targets"] = {"verify_pairs_per_s": {"value": value, "goal": f">= {GOAL}", "met": value >= GOAL}}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    tune_allocator()  # index.core.allocator: as every command runs
    main()
