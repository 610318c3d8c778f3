"""Thresholds for duplicates and leaks, calibrated for the encoders actually in use.

The paper's thresholds (duplicates > 0.99 mean cosine, possible leaks > 0.95 max cosine) were set
for averaged OpenCLIP ViT-L/14 encoders. Other encoders spread copies differently: with ImageNet
EfficientNet-Lite0, near-copies of Fashion-MNIST images fall to cosine 0.79 while distinct images
of one class reach it. So the thresholds are measured, not assumed:

1. draw a sample of reference images (seeded) and make one near-copy of each per kind of
   `curation.copies.COPY_KINDS` (the edits a web crawl applies);
2. embed the copies with the index's encoders; per copy record its similarity to its source (max
   over encoders for leaks, mean for duplicates), and how many references are nearer (the
   source must be among the `neighbours` nearest that verification looks at); the same by pixel
   key (`curation.pixelkey`), a second way to retrieve candidates that does not depend on the
   encoders; per sampled reference record its nearest *distinct* references by embedding and by
   pixel key, the hardest look-alikes;
3. choose, per kind, the threshold that keeps `recall` of that kind's copies (a kind-wise
   guarantee, not an average), and take the lowest over kinds;
4. with verification (`curation.verify`): the embedding thresholds are loosened to keep
   ``1 - (1 - recall) / 2`` of every kind (they only select candidates); the pixel key threshold
   keeps as much by the key alone as far as that flags no more look-alikes than the embedding
   does, and lower where the embedding leaves copies unretrieved (`_pixel_threshold`); the verification
   rule (`VerifyRule`: correlation above a limit, residual at most a limit) is the one that
   confirms the fewest look-alikes among those keeping `recall` of every kind's copies that reach
   verification, and all of them where that confirms no more: for each residual limit (the
   copies' own residuals), the correlation limit that keeps them, moved to the middle of the gap
   to the look-alikes' 99th percentile (at least MIN_SCORE); a pair with a flat image cannot be
   scored and is never confirmed;
5. report the false-positive rate the chosen decision gives: the fraction of sampled references
   confirmed as a copy of one of the distinct references they would be verified against (their
   `neighbours` nearest by embedding and `pixel_neighbours` nearest by pixel key, each the fewest
   that hold the source of the loosened share of every kind's copies, at least MIN_NEIGHBOURS),
   as a retrieved look-alike would be.

`calibrate` is a pure function of (encoders, reference images, their features, options);
`cached_calibration` stores its result as JSON keyed by a fingerprint of the encoder identities,
the sampled reference ids and their content hashes and the options, so a rerun reuses it. The curves (recall per kind and
false-positive rate over a grid of thresholds) go into the curated set's manifest and report.

Why one module: the measurements, the choice of thresholds and verification rule, and the
evaluation of the false-positive rate are defined on the same `Measurements` and must use the same
neighbour counts and verification pairs; apart, the rule chosen and the rate reported for it could
disagree.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from curation import pixelkey
from curation.copies import COPY_KINDS, copy_rng, make_copy
from curation.querysets import content_hash
from curation.verify import Thumb, VerifyRule
from curation.verify_batch import match_pairs
from index.core.atomic import fingerprint, read_json, write_json
from index.encode import embed_images

CALIBRATION_VERSION = 6
MAX_NEIGHBOURS = 32                             # most references verified per candidate
MIN_NEIGHBOURS = 5                              # least (the paper's 5 nearest references)
GRID = np.round(np.linspace(0.5, 1.0, 51), 3)   # thresholds at which the curves are reported


@dataclass(frozen=True)
class Calibration:
    recall_target: float
    verify: str                         # "align" or "none"
    num_images: int
    leak_threshold: float               # on max-over-encoders cosine
    dedup_threshold: float              # on mean-over-encoders cosine
    verify_threshold: float | None      # on verify.Match.score; None without verification
    verify_max_residual: float | None   # on verify.Match.residual; None: no limit
    recall: dict[str, float]            # per kind, of the chosen decision on the sample
    false_positive_rate: float          # of the chosen decision on nearest distinct references
    neighbours: int                     # references verified per candidate, nearest first, per key
    source_in_neighbours: dict[str, float]  # per kind: the source among those references
    curves: dict[str, Any] = field(default_factory=dict)
    pixel_threshold: float | None = None   # on the pixel key similarity; None: no pixel retrieval
    pixel_neighbours: int | None = None    # references verified per candidate by pixel key

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def rule(self) -> VerifyRule | None:
        if self.verify_threshold is None:
            return None
        return VerifyRule.of(self.verify_threshold, self.verify_max_residual)

    def evaluate(self, m: "Measurements") -> dict[str, Any]:
        """`evaluate` with this calibration's decision."""
        return evaluate(m, self.leak_threshold, self.rule, self.neighbours, self.pixel_threshold, self.pixel_neighbours)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        return cls(**d)


@dataclass(frozen=True)
class Measurements:
    """Raw per-pair numbers behind a calibration (pure data; `choose` turns it into thresholds)."""
    kinds: tuple[str, ...]
    pos_max: np.ndarray        # [kinds, n] copy-to-source similarity, max over encoders
    pos_mean: np.ndarray       # [kinds, n] the same, mean over encoders
    pos_rank: np.ndarray       # [kinds, n] references more similar to the copy than its source
    pos_verify: np.ndarray     # [kinds, n] copy_match(copy, source).score; NaN when unscored
    pos_residual: np.ndarray   # [kinds, n] copy_match(copy, source).residual
    neg_max: np.ndarray        # [n, k] the k nearest distinct references, max over encoders (-inf: none)
    neg_mean: np.ndarray       # [n, k] the same, mean over encoders
    neg_verify: np.ndarray     # [n, k] copy_match(reference, distinct reference).score
    neg_residual: np.ndarray   # [n, k] its residual
    pos_pix: np.ndarray | None = None       # [kinds, n] pixel key similarity of copy and source
    pos_pix_rank: np.ndarray | None = None  # [kinds, n] references nearer the copy by pixel key
    negp_pix: np.ndarray | None = None      # [n, k] the k nearest distinct references by pixel key
    negp_verify: np.ndarray | None = None   # [n, k] their copy_match score
    negp_residual: np.ndarray | None = None  # [n, k] its residual
    neg_ids: np.ndarray | None = None       # [n, k] rows of the embedding-nearest distinct references
    negp_ids: np.ndarray | None = None      # [n, k] rows of the pixel-nearest ones

    @property
    def has_pixel(self) -> bool:
        return self.pos_pix is not None


def _lower_quantile(x: np.ndarray, keep: float, within: np.ndarray | None = None) -> float:
    """A threshold t with at least `keep` of x strictly above t (x > t is the decision), counting
    only the entries `within` (a mask) as able to pass; -inf where that cannot reach `keep`."""
    if x.size == 0:
        return 1.0
    k = int(np.floor((1.0 - keep) * x.size + 1e-9))    # entries allowed to fail
    if within is not None:
        k -= int((~within).sum())
        if k < 0:
            return -np.inf
        x = x[within]
    return float(np.sort(x)[k]) - 1e-6


def measure(models, images: Sequence, ref_feats: Sequence[np.ndarray], sample_rows: np.ndarray,
            seed: int = 0, batch_size: int = 64, verify: str = "align",
            kinds: Sequence[str] = tuple(COPY_KINDS), labels: np.ndarray | None = None,
            scores: dict | None = None, negatives: int = MAX_NEIGHBOURS,
            ref_keys: np.ndarray | None = None, progress: bool = False) -> Measurements:
    """Copies of ``images`` (the references at ``sample_rows`` of ``ref_feats``) against the
    references; ``ref_feats``: one L2-normalised [num_refs, d_e] matrix per encoder. With
    ``labels`` (one per reference), the nearest distinct references are taken within the class;
    ``negatives`` of them are kept per image, as a candidate is verified against that many.
    ``ref_keys``: the references' pixel keys (`curation.pixelkey`), to measure retrieval by them
    too. ``scores``: a dict that memoises verification scores across calls on the same images (they
    do not depend on the encoders), keyed by (seed, row, kind) and (row, other row); the pairs not
    in it are verified in batches (`curation.verify_batch.match_pairs`). ``progress``: one tqdm
    bar over the steps (each copy kind, then the look-alikes by embedding and by pixel key)."""
    scores = {} if scores is None else scores

    refs = [np.asarray(r, np.float32) for r in ref_feats]
    n, rows = len(images), np.asarray(sample_rows)
    nk = len(kinds)
    own = np.arange(n), rows
    pos_max, pos_mean = np.zeros((nk, n)), np.zeros((nk, n))
    pos_rank = np.zeros((nk, n), np.int64)
    pos_ver, pos_res = np.full((nk, n), np.nan), np.full((nk, n), np.nan)
    pixel = ref_keys is not None and verify != "none"
    pos_pix, pos_pix_rank = np.full((nk, n), -np.inf), np.zeros((nk, n), np.int64)
    thumbs = [Thumb.of(im) for im in images]
    e = len(refs)
    bar = tqdm(total=nk + 1 + int(pixel), desc="calibrate", unit="step", disable=not progress, dynamic_ncols=True)
    for ki, kind in enumerate(kinds):
        bar.set_postfix_str(f"{kind} copies", refresh=False)
        copies = [make_copy(im, kind, copy_rng(seed, int(r), kind)) for im, r in zip(images, rows)]
        feats = embed_images(models, copies, batch_size)
        sims = [f @ r.T for f, r in zip(feats, refs)]            # [n, num_refs] per encoder
        mean = sum(sims) / e
        pos_max[ki] = np.max([s[own] for s in sims], axis=0)
        pos_mean[ki] = mean[own]
        pos_rank[ki] = (mean > mean[own][:, None]).sum(axis=1)
        if pixel:
            ps = pixelkey.similarity(pixelkey.keys(copies), ref_keys)
            pos_pix[ki], pos_pix_rank[ki] = ps[own], (ps > ps[own][:, None]).sum(axis=1)
        if verify != "none":
            keys = [(seed, int(r), kind) for r in rows]
            todo = [i for i, key in enumerate(keys) if key not in scores]
            for i, m in zip(todo, match_pairs([(Thumb.of(copies[i]), thumbs[i]) for i in todo])):
                scores[keys[i]] = m
            pos_ver[ki], pos_res[ki] = np.array([scores[key] for key in keys], np.float64).reshape(n, 2).T
        bar.update(1)
    by_row = {int(r): thumbs[i] for i, r in enumerate(rows)}

    def distinct(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows [n, k], validity, verification scores [2, n, k]) of the nearest distinct references."""
        bar.set_postfix_str("nearest distinct images", refresh=False)
        sim[own] = -np.inf
        if labels is not None:
            lab = np.asarray(labels)
            sim[lab[rows][:, None] != lab[None, :]] = -np.inf
        k = min(negatives, sim.shape[1])
        nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        valid = np.isfinite(np.take_along_axis(sim, nearest, axis=1))
        ver = np.full((2, *nearest.shape), np.nan)
        if verify != "none":
            cells = list(zip(*np.nonzero(valid)))
            todo = {}
            for i, j in cells:
                other = int(nearest[i, j])
                key = (int(rows[i]), other)
                if key not in scores and key not in todo:
                    if other not in by_row:
                        by_row[other] = Thumb.of(_load(images, other))
                    todo[key] = (thumbs[i], by_row[other])
            for key, m in zip(todo, match_pairs(list(todo.values()))):
                scores[key] = m
            for i, j in cells:
                ver[:, i, j] = scores[int(rows[i]), int(nearest[i, j])]
        bar.update(1)
        return nearest, valid, ver

    sims = [r[rows] @ r.T for r in refs]
    mean = sum(sims) / e
    nearest, valid, (neg_ver, neg_res) = distinct(mean)
    neg_mean = np.where(valid, np.take_along_axis(mean, nearest, axis=1), -np.inf)
    neg_max = np.where(valid, np.max([np.take_along_axis(s, nearest, axis=1) for s in sims], axis=0), -np.inf)
    px: dict[str, Any] = {}
    if pixel:
        ps = pixelkey.similarity(ref_keys[rows], ref_keys)
        near_p, valid_p, (ver_p, res_p) = distinct(ps)
        px = dict(pos_pix=pos_pix, pos_pix_rank=pos_pix_rank,
                  negp_pix=np.where(valid_p, np.take_along_axis(ps, near_p, axis=1), -np.inf),
                  negp_verify=ver_p, negp_residual=res_p, neg_ids=nearest, negp_ids=near_p)
    bar.close()
    return Measurements(tuple(kinds), pos_max, pos_mean, pos_rank, pos_ver, pos_res, neg_max, neg_mean, neg_ver,
                        neg_res, **px)


def _load(images, j):
    loader = getattr(images, "load_reference", None)
    if loader is None:
        raise ValueError("the nearest distinct reference is outside the sample; pass images with a "
                         "load_reference(row) method")
    return loader(int(j))


def choose(m: Measurements, recall: float = 0.99, verify: str = "align",
           max_neighbours: int = MAX_NEIGHBOURS, min_neighbours: int = MIN_NEIGHBOURS) -> Calibration:
    """Thresholds from measurements: kind-wise recall first, then the fewest look-alikes confirmed."""
    if not 0.0 < recall < 1.0:
        raise ValueError(f"recall must be in (0, 1); got {recall}")
    kinds = range(len(m.kinds))
    embed_keep = recall if verify == "none" else 1.0 - (1.0 - recall) / 2
    t_leak = min(_lower_quantile(m.pos_max[k], embed_keep) for k in kinds)
    t_dedup = min(_lower_quantile(m.pos_mean[k], embed_keep) for k in kinds)
    # the fewest nearest references that hold the source of `embed_keep` of every kind's copies
    def needed(rank: np.ndarray) -> int:
        k_need = max(int(np.sort(r)[min(r.size - 1, int(np.ceil(embed_keep * r.size)) - 1)]) + 1 for r in rank)
        return int(min(max_neighbours, max(min_neighbours, k_need)))

    neighbours = needed(m.pos_rank)
    t_leak, t_dedup = round(t_leak, 6), round(t_dedup, 6)
    rule, t_pix, k_pix = None, None, None
    if verify != "none":
        if m.has_pixel:
            k_pix = needed(m.pos_pix_rank)
            t_pix = _pixel_threshold(m, t_leak, neighbours, k_pix, embed_keep)
        # among the copies that reach verification and can be scored (a pair with a flat image is
        # never confirmed: loosening the rule would not bring it back, only let look-alikes through)
        cand = _reached(m, t_leak, neighbours, t_pix, k_pix) & np.isfinite(m.pos_verify)
        # the look-alikes: every sampled image's, candidate or not (what other data may flag)
        looks = _verified_pairs(m, -np.inf, neighbours, None if t_pix is None else -np.inf, k_pix)
        rule = _verify_rule(m, cand, looks, recall)
    ev = evaluate(m, t_leak, rule, neighbours, t_pix, k_pix)
    return Calibration(
        recall_target=recall, verify=verify, num_images=int(m.neg_max.shape[0]),
        leak_threshold=t_leak, dedup_threshold=t_dedup,
        verify_threshold=None if rule is None else rule.min_score,
        verify_max_residual=None if rule is None else rule.to_dict()["max_residual"],
        recall=ev["recall"], false_positive_rate=ev["false_positive_rate"], neighbours=neighbours,
        source_in_neighbours={k: float(v) for k, v in zip(
            m.kinds, _reached(m, -np.inf, neighbours, None if t_pix is None else -np.inf, k_pix).mean(axis=1))},
        curves=curves(m), pixel_threshold=t_pix, pixel_neighbours=k_pix)


def _reached(m: Measurements, leak_threshold: float, neighbours: int, pixel_threshold: float | None = None,
             pixel_neighbours: int | None = None) -> np.ndarray:
    """[kinds, n] the copy is a candidate and its source among the references it is verified
    against: by embedding (similarity above the leak threshold, source among its `neighbours`
    nearest) or, with a pixel threshold, by pixel key (the same, with the key and its
    `pixel_neighbours`, by default as many)."""
    ok = (m.pos_max > leak_threshold) & (m.pos_rank < neighbours)
    if pixel_threshold is not None and m.has_pixel:
        ok |= (m.pos_pix > pixel_threshold) & (m.pos_pix_rank < (pixel_neighbours or neighbours))
    return ok


def _pixel_threshold(m: Measurements, leak_threshold: float, neighbours: int, pixel_neighbours: int,
                     keep: float) -> float:
    """The pixel key threshold. It keeps `keep` of every kind's copies by the key alone, as far as
    that flags no more look-alikes than the embedding already does (the fraction of sampled
    images whose embedding similarity to a distinct reference exceeds the leak threshold, at least
    1%): each flagged image costs the verification of its nearest references. Where the embedding
    leaves more copies unretrieved than `keep` allows, it is lowered until the two together
    bring them to verification, or as far as the key brings any of them (a copy whose source is
    not among its nearest by key is not brought by a lower threshold)."""
    by_embedding = _reached(m, leak_threshold, neighbours, None)
    alone = min(_lower_quantile(m.pos_pix[k], keep, within=m.pos_pix_rank[k] < pixel_neighbours)
                for k in range(len(m.kinds)))
    nearest = m.negp_pix[:, 0][np.isfinite(m.negp_pix[:, 0])]
    if nearest.size:
        flagged = float((np.where(np.isfinite(m.neg_max), m.neg_max, -np.inf) > leak_threshold).any(axis=1).mean())
        alone = max(alone, float(np.quantile(nearest, 1.0 - max(0.01, flagged))))
    t = min(1.0, alone)
    for k in range(len(m.kinds)):
        missed = ~by_embedding[k]
        short = int(missed.sum()) - int(np.floor((1.0 - keep) * missed.size + 1e-9))
        if short > 0:
            catchable = np.sort(m.pos_pix[k][missed & (m.pos_pix_rank[k] < pixel_neighbours)])[::-1]
            if catchable.size:   # as many as the key can bring (lower would only flag look-alikes)
                t = min(t, float(catchable[min(short, catchable.size) - 1]) - 1e-6)
    return round(max(t, -1.0), 6)


MIN_SCORE = 0.5   # least correlation a copy is confirmed with, however far the look-alikes lie


def _verify_rule(m: Measurements, cand: np.ndarray, looks: tuple[np.ndarray, np.ndarray, np.ndarray],
                 recall: float, limits: int = 64) -> VerifyRule:
    """The rule keeping `recall` of every kind's candidate copies that confirms the fewest look-alikes
    (per image, any of the distinct references it is verified against: `looks`, the scores,
    residuals and mask of `_verified_pairs`); where it confirms no more,
    the one keeping all of them (a sample of a hundred copies a kind says little about their 1%
    tail). Each limit sits in the middle of its gap to the look-alikes: the score limit halfway
    to the 99th percentile of the look-alikes within the residual limit (or to MIN_SCORE, where
    that is higher), the residual limit halfway to the first percentile of the residuals of the
    look-alikes above the score limit."""
    score, residual, mask = looks
    neg_s = np.where(mask, np.nan_to_num(score, nan=-1.0, neginf=-1.0), -1.0)
    neg_r = np.where(mask, residual, np.inf)
    res = m.pos_residual[cand]
    grid = np.unique(np.quantile(res, np.linspace(0.5, 1.0, limits))) if res.size else np.zeros(0)

    def at(r: float, keep: float) -> tuple[float, float] | None:
        """(look-alikes confirmed, score limit) with residual limit r; None where r loses `keep`."""
        per_kind = [_lower_quantile(m.pos_verify[k][cand[k]], keep, within=m.pos_residual[k][cand[k]] <= r)
                    for k in range(len(m.kinds))]
        s = max(-1.0, min(per_kind))
        if s <= -1.0:
            return None
        near = np.where(neg_r <= r, neg_s, -1.0).max(axis=1) if neg_s.size else np.zeros(0)
        q = max(MIN_SCORE, float(np.quantile(near, 0.99)) if near.size else -1.0)
        s = (s + q) / 2 if q < s else s   # the middle of the gap to the look-alikes
        return (float((near > s).mean()) if near.size else 0.0), s

    tried = {keep: {float(r): got for r in [*grid, np.inf] if (got := at(float(r), keep)) is not None}
             for keep in (1.0, recall)}
    if not tried[recall]:
        return VerifyRule(-1.0)
    fewest = {keep: min((fp for fp, _ in t.values()), default=np.inf) for keep, t in tried.items()}
    keep = 1.0 if fewest[1.0] <= fewest[recall] else recall
    tried, fewest = tried[keep], fewest[keep]
    tied = [r for r, (fp, _) in tried.items() if fp == fewest]
    if np.isinf(tied[-1]):      # correlation alone does as well: no residual limit
        return VerifyRule(round(tried[np.inf][1], 6))
    # the residual limit in the middle of the gap between the least that keeps the recall and the
    # look-alikes that would pass the score limit (their first percentile)
    r_lo = tied[0]
    s_lo = tried[r_lo][1]
    over = neg_r[(neg_s > s_lo) & (neg_r > r_lo)]
    r_hi = float(np.quantile(over, 0.01)) if over.size else tied[-1]
    r = (r_lo + r_hi) / 2 if r_hi > r_lo else r_lo
    got = at(r, keep)
    if got is None or got[0] > fewest:
        r, got = r_lo, tried[r_lo]
    return VerifyRule(round(got[1], 6), round(r, 4))


def _verified_pairs(m: Measurements, leak_threshold: float, neighbours: int, pixel_threshold: float | None,
                    pixel_neighbours: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, residuals, mask), each [n, pairs]: the (image, distinct reference) pairs a curation
    verifies. An image is a candidate when its embedding similarity to some reference exceeds
    the leak threshold (or its pixel key similarity the pixel threshold); it is verified against
    its `neighbours` nearest references by embedding and, with a pixel threshold, its
    `pixel_neighbours` (by default as many) nearest by pixel key
    (a reference both retrieve, once)."""
    valid = np.isfinite(m.neg_max)
    flagged = (np.where(valid, m.neg_max, -np.inf) > leak_threshold).any(axis=1)
    use_pixel = pixel_threshold is not None and m.has_pixel
    if use_pixel:
        flagged |= m.negp_pix[:, 0] > pixel_threshold
    mask = flagged[:, None] & valid & (np.arange(m.neg_max.shape[1]) < neighbours)
    if not use_pixel:
        return m.neg_verify, m.neg_residual, mask
    again = (m.negp_ids[:, :, None] == np.where(mask, m.neg_ids, -1)[:, None, :]).any(axis=2)
    mask_p = flagged[:, None] & np.isfinite(m.negp_pix) & ~again & (
        np.arange(m.negp_pix.shape[1]) < (pixel_neighbours or neighbours))
    return (np.concatenate([m.neg_verify, m.negp_verify], axis=1),
            np.concatenate([m.neg_residual, m.negp_residual], axis=1), np.concatenate([mask, mask_p], axis=1))


def evaluate(m: Measurements, leak_threshold: float, rule: VerifyRule | None,
             neighbours: int = MAX_NEIGHBOURS, pixel_threshold: float | None = None,
             pixel_neighbours: int | None = None) -> dict[str, Any]:
    """Recall per kind and false-positive rates of the decision a curation takes. Without a verify
    rule an image is a leak when its embedding similarity to some reference exceeds
    `leak_threshold`; with one, when its match with one of the references it is verified against
    (`_verified_pairs`) passes the rule. False positives: per image (a held-out image taken for a
    copy of a distinct reference) and per (image, distinct reference) pair checked."""
    if rule is None:
        pos = m.pos_max > leak_threshold
        pairs = np.isfinite(m.neg_max)
        confirmed = pairs & (m.neg_max > leak_threshold)
    else:
        pos = _reached(m, leak_threshold, neighbours, pixel_threshold, pixel_neighbours) & \
            rule.accepts(m.pos_verify, m.pos_residual)
        score, residual, pairs = _verified_pairs(m, leak_threshold, neighbours, pixel_threshold, pixel_neighbours)
        confirmed = pairs & rule.accepts(score, residual)
    neg_img = confirmed.any(axis=1)
    return {"recall": {k: float(pos[i].mean()) for i, k in enumerate(m.kinds)},
            "false_positive_rate": float(neg_img.mean()) if neg_img.size else 0.0,
            "false_positive_rate_per_pair": float(confirmed.sum() / pairs.sum()) if pairs.any() else 0.0}


RESIDUAL_GRID = np.arange(0.0, 64.1, 2.0)   # grey levels at which the residual curves are reported


def curves(m: Measurements) -> dict[str, Any]:
    """Fraction above each GRID threshold: copies per kind (embedding max, verify score, pixel key
    similarity) and the nearest distinct references; and the fraction at or below each
    RESIDUAL_GRID limit."""
    above = lambda x: [round(float((x > t).mean()), 4) for t in GRID]  # noqa: E731
    within = lambda x: [round(float((np.nan_to_num(x, nan=np.inf) <= t).mean()), 4) for t in RESIDUAL_GRID]  # noqa: E731
    return {"grid": GRID.tolist(), "residual_grid": RESIDUAL_GRID.tolist(),
            "copies_similarity": {k: above(m.pos_max[i]) for i, k in enumerate(m.kinds)},
            "copies_verify": {k: above(np.nan_to_num(m.pos_verify[i], nan=-1.0)) for i, k in enumerate(m.kinds)},
            "copies_residual": {k: within(m.pos_residual[i]) for i, k in enumerate(m.kinds)},
            "distinct_similarity": above(m.neg_max[:, 0]),
            "distinct_verify": above(np.nan_to_num(m.neg_verify[:, 0], nan=-1.0)),
            "distinct_residual": within(m.neg_residual[:, 0]),
            **({"copies_pixel": {k: above(m.pos_pix[i]) for i, k in enumerate(m.kinds)},
                "distinct_pixel": above(m.negp_pix[:, 0])} if m.has_pixel else {})}


def sample_rows(num_refs: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0xCA1])
    return np.sort(rng.choice(num_refs, size=min(size, num_refs), replace=False))


class SampledImages(list):
    """The sampled rows of `items` as images, and a loader for any other row (the nearest distinct
    reference of a sampled image lies outside the sample); `load` turns an item into an image."""

    def __init__(self, items: Sequence, rows, load: Callable[[Any], Any] = lambda item: item):
        super().__init__(load(items[int(r)]) for r in rows)
        self._items, self._load = items, load

    def load_reference(self, row: int):
        return self._load(self._items[row])


def cached_calibration(models, references: Sequence, ref_feats: Sequence[np.ndarray], cache_dir: str | os.PathLike,
                       size: int = 300, recall: float = 0.99, verify: str = "align", max_neighbours: int = MAX_NEIGHBOURS,
                       min_neighbours: int = MIN_NEIGHBOURS, seed: int = 0, batch_size: int = 64,
                       ref_keys: np.ndarray | None = None, progress: bool = False) -> tuple[Calibration, bool]:
    """(calibration, reused): computed once per (encoders, sampled reference ids and contents, options).

    ``references``: items with ``.id`` and ``.load()`` (`querysets.LabeledImage`), rows aligned
    with ``ref_feats`` and (when given: retrieval by pixel key too) ``ref_keys``. References that are
    another producer's rendering of a target image (``.rendering`` set) are left out: copies are
    made of, and distinct images counted among, the target's own images.
    """
    own = [i for i, r in enumerate(references) if getattr(r, "rendering", None) is None]
    if len(own) < len(references):  # other producers' renderings are views of these images, not images
        references, ref_feats = [references[i] for i in own], [np.asarray(f)[own] for f in ref_feats]
        ref_keys = None if ref_keys is None else ref_keys[own]
    rows = sample_rows(len(references), size, seed)
    key = {"kind": "calibration", "version": CALIBRATION_VERSION,
           "encoders": [m.spec.identity() for m in models], "sample": [references[int(r)].id for r in rows],
           "contents": [content_hash(references[int(r)]) for r in rows],   # by content, not name
           "recall": recall, "verify": verify, "max_neighbours": max_neighbours,
           "min_neighbours": min_neighbours, "seed": seed,
           "copy_kinds": list(COPY_KINDS), "pixel_key": None if ref_keys is None else pixelkey.KEY_VERSION}
    path = Path(cache_dir) / f"calibration-{fingerprint(key)}.json"
    if path.is_file():
        return Calibration.from_dict(read_json(path)["calibration"]), True
    images = SampledImages(references, rows, load=lambda item: item.load())
    m = measure(models, images, ref_feats, rows, seed, batch_size, verify, ref_keys=ref_keys, progress=progress)
    cal = choose(m, recall, verify, max_neighbours, min_neighbours)
    write_json(path, {"key": key, "calibration": cal.to_dict()})
    return cal, False
