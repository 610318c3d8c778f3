"""Benchmark: leak (copy) detection per transformation kind, per encoder, per image set.

For each image set of `tests/fixtures_samples.py` and each encoder: a pool of labelled real images is
embedded; thresholds are calibrated (`curation.calibrate`) on one half of the pool and measured on
the other half with fresh copies (another seed). Recall = copies of a held-out image that the
decision flags, per kind of `curation.copies`; false-positive rate = held-out images flagged
against their nearest distinct image of the same class (by embedding). Two decisions:

- ``paper``: max cosine > 0.95, no verification (the paper's fixed leak threshold);
- ``calibrated_with_verification``: a candidate by the calibrated embedding threshold or the
  calibrated pixel key threshold (`curation.pixelkey`), its source among the references it is
  verified against (its nearest by embedding and by pixel key), and verification
  (`curation.verify.copy_match`) passing its calibrated rule (correlation above a limit, residual
  at most a limit); ``..._embedding_retrieval_only`` is the same without the pixel key.

``verifiers`` compares pixel verifiers on the same pairs (alignment NCC, pHash when ``imagehash``
is installed), ``time_per_1000_candidates_s`` is the verification cost (one pair at a time and
batched, `curation.verify_batch`, which calibration uses) and
``pixel_key_s_per_1000_images`` the cost of the keys. Prints one JSON object.

    python bench/copydetect.py [--quick] [--pool 600] [--encoders efficientnet_lite0,test-tiny-clip]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from index.core.allocator import tune_allocator
from curation import pixelkey
from curation.calibrate import SampledImages, choose, evaluate, measure
from curation.copies import COPY_KINDS, copy_rng, make_copy
from curation.verify import Thumb, copy_match
from curation.verify_batch import match_pairs
from index.encode import embed_images
from index.encoders import build_encoder, resolve_encoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers shared with the tests
from fixtures_samples import SAMPLES  # noqa: E402

PAPER_LEAK = 0.95


def run_one(models, images, labels, seed: int, recall: float, scores: dict, keys: np.ndarray) -> dict:
    feats = embed_images(models, images, 32)
    rows = np.arange(len(images))
    cal_rows, test_rows = rows[0::2], rows[1::2]
    m_cal = measure(models, SampledImages(images, cal_rows), feats, cal_rows, seed=seed, scores=scores,
                    ref_keys=keys)
    cal = choose(m_cal, recall)
    m_test = measure(models, SampledImages(images, test_rows), feats, test_rows, seed=seed + 1, labels=labels,
                     scores=scores, ref_keys=keys)
    paper = evaluate(m_test, PAPER_LEAK, None)
    ours = cal.evaluate(m_test)
    no_key = evaluate(m_test, cal.leak_threshold, cal.rule, cal.neighbours)
    embed_only = evaluate(m_test, min(choose(m_cal, recall, verify="none").leak_threshold, 1.0), None)
    return {
        "thresholds": {"leak": cal.leak_threshold, "dedup": cal.dedup_threshold, "verify": cal.verify_threshold,
                       "verify_max_residual": cal.verify_max_residual,
                       "neighbours": cal.neighbours, "pixel_key": cal.pixel_threshold,
                       "pixel_key_neighbours": cal.pixel_neighbours,
                       "estimated_false_positive_rate": cal.false_positive_rate},
        "paper": paper, "calibrated_embedding_only": embed_only, "calibrated_with_verification": ours,
        "calibrated_with_verification_embedding_retrieval_only": no_key,
        "copy_similarity_min": {k: round(float(m_test.pos_max[i].min()), 4) for i, k in enumerate(m_test.kinds)},
        "copy_similarity_median": {k: round(float(np.median(m_test.pos_max[i])), 4)
                                   for i, k in enumerate(m_test.kinds)},
        "distinct_similarity_max": round(float(m_test.neg_max[:, 0].max()), 4),
    }


def verifier_comparison(images, labels, seed: int) -> dict:
    """Verifier scores alone: copies (1st percentile per kind) vs nearest same-class distinct
    images by pixel key (99th percentile), the hardest look-alikes for a pixel verifier."""
    keys = pixelkey.keys(images)
    s = pixelkey.similarity(keys, keys)
    np.fill_diagonal(s, -2)
    s[labels[:, None] != labels[None, :]] = -2
    nn = s.argmax(1)
    def align(a, b) -> dict[str, float]:
        m = copy_match(a, b)
        return {"align_ncc": m.score, "align_residual": -m.residual}   # negated: higher = more alike

    verifiers = {"align": align}
    try:
        import imagehash
        from PIL import ImageOps

        def phash(a, b) -> dict[str, float]:
            ha = imagehash.phash(a)
            return {"phash": 1 - min(ha - imagehash.phash(b), ha - imagehash.phash(ImageOps.mirror(b))) / 32}

        verifiers["phash"] = phash
    except ImportError:
        pass
    out = {}
    for fn in verifiers.values():
        t = time.perf_counter()
        neg = [fn(images[i], images[nn[i]]) for i in range(len(images))]
        dt = time.perf_counter() - t
        pos = {k: [fn(make_copy(im, k, copy_rng(seed, i, k)), im) for i, im in enumerate(images)] for k in COPY_KINDS}
        for name in neg[0]:
            n = np.array([d[name] for d in neg], np.float64)
            p = {k: np.array([d[name] for d in v], np.float64) for k, v in pos.items()}
            # quantiles over the pairs that can be scored (a flat image cannot: counted apart)
            out[name] = {"copies_p01": {k: round(float(np.nanquantile(v, 0.01)), 3) for k, v in p.items()},
                         "lookalike_p99": round(float(np.nanquantile(n, 0.99)), 3),
                         "unscorable": round(float(np.mean([np.isnan(v).mean() for v in p.values()])), 4),
                         "ms_per_pair": round(1e3 * dt / len(images), 2)}
    return out


def time_candidates(images, n: int = 200) -> dict[str, float]:
    """Seconds to verify 1,000 candidate pairs (thumbnails made per pair, as in curation), one
    pair at a time (`copy_match`) and batched (`match_pairs`); bench/verify.py measures more."""
    pairs = [(images[i % len(images)], images[(i * 7 + 1) % len(images)]) for i in range(n)]
    t = time.perf_counter()
    for a, b in pairs:
        copy_match(Thumb.of(a), Thumb.of(b))
    single = time.perf_counter() - t
    t = time.perf_counter()
    match_pairs([(Thumb.of(a), Thumb.of(b)) for a, b in pairs])
    batched = time.perf_counter() - t
    return {"single": round(single * 1000 / n, 2), "batched": round(batched * 1000 / n, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--pool", type=int, default=600, help="labelled images per set (half calibrate, half test)")
    p.add_argument("--sets", default=",".join(SAMPLES), help=f"from: {', '.join(SAMPLES)}")
    p.add_argument("--encoders", default="efficientnet_lite0,test-tiny-clip")
    p.add_argument("--image-size", type=int, default=None, help="CNN input size override (default: the encoder's)")
    p.add_argument("--recall", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="seconds: 16 skimage tiles, test-tiny-clip (a run check)")
    args = p.parse_args(argv)
    if args.smoke:
        args.quick, args.pool, args.sets, args.encoders = False, 16, "skimage", "test-tiny-clip"
    torch.set_num_threads(args.threads)
    pool = 120 if args.quick else args.pool
    out: dict = {"bench": "copydetect", "quick": args.quick, "pool": pool, "recall_target": args.recall,
                 "machine": platform.processor() or platform.machine(), "threads": args.threads,
                 "results": {}, "verifiers": {}}
    for name in args.sets.split(","):
        images, labels = SAMPLES[name](pool, args.seed)
        t = time.perf_counter()
        keys = pixelkey.keys(images)
        out.setdefault("pixel_key_s_per_1000_images", {})[name] = round((time.perf_counter() - t) * 1000 / len(images), 3)
        out["verifiers"][name] = verifier_comparison(images[:min(len(images), 200)], labels[:200], args.seed)
        scores: dict = {}   # verification scores, shared by the encoders
        for enc in args.encoders.split(","):
            spec = resolve_encoder(enc, image_size=args.image_size if enc != "test-tiny-clip" else None)
            t = time.perf_counter()
            r = run_one([build_encoder(spec)], images, labels, args.seed, args.recall, scores, keys)
            r["seconds"] = round(time.perf_counter() - t, 1)
            out["results"][f"{name}/{enc}"] = r
            print(json.dumps({f"{name}/{enc}": r}), flush=True)
        out.setdefault("time_per_1000_candidates_s", {})[name] = time_candidates(images)
    out["targets"] = targets(out["results"], args.recall)
    print(json.dumps(out, indent=2))


def targets(results: dict, recall: float) -> dict:
    """The copy-detection goals over every set/encoder run, with calibrated thresholds, pixel keys and
    verification: recall of the weakest copy kind >= the target, false positives per image <= 0.01."""
    runs = [r["calibrated_with_verification"] for r in results.values()]
    weakest = min(min(r["recall"].values()) for r in runs)
    fpr = max(r["false_positive_rate"] for r in runs)
    return {"weakest_kind_recall": {"value": round(weakest, 4), "goal": f">= {recall}", "met": weakest >= recall},
            "false_positives_per_image": {"value": round(fpr, 4), "goal": "<= 0.01", "met": fpr <= 0.01}}


if __name__ == "__main__":
    tune_allocator()  # index.core.allocator: as every command runs
    main()
