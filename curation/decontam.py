"""De-contamination: flag retrieved images that may be the target task's own images (B.4).

Every image of the target dataset (all splits) is a reference. For each original image of a
retrieved crop and each reference, the paper takes the maximum over the encoders of the cosine
similarity; an image whose maximum over references exceeds 0.95 is a possible leak. Its 5 nearest
references (by the mean similarity over encoders) are listed for a person to inspect. With pixel
keys (`curation.pixelkey`, independent of the encoders), an image whose key similarity to a
reference exceeds ``key_threshold`` is a candidate too, and its nearest references by key join
its list: a copy the embedding scatters among look-alikes is still checked against its source;
``verify_leaks`` confirms each flagged image by a second, pixel-level signal against those nearest
references (`curation.verify`), so the decision no longer needs the person; ``read_review`` and
``clear_reviewed`` still un-flag the images a person marked as not-a-leak. All crops of a remaining
flagged image are removed by the caller (then backfilled by re-running the selection).

Flagging is a thresholded join per encoder (``dedup.similar_pairs``): exact FAISS range search for
small reference sets, an inverted-file join for large ones (``method="auto"``; ``method="flat"``
forces exact). The reported similarities and the nearest references of flagged images are exact
(FAISS ``IndexFlatIP`` kNN, batched).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import faiss
import numpy as np

from curation.dedup import check_normalised, similar_pairs
from curation.pixelkey import Keys
from curation.verify import Match, VerifyRule
from index.core.errors import InputError
from index.knn import combine_features

Features = np.ndarray | Sequence[np.ndarray]


def _per_encoder(features: Features, name: str) -> list[np.ndarray]:
    parts = [features] if isinstance(features, np.ndarray) else list(features)
    if not parts:
        raise ValueError(f"{name}: expected one feature matrix per encoder; got none")
    out = [check_normalised(p, f"{name}[{e}]") for e, p in enumerate(parts)]
    rows = {p.shape[0] for p in out}
    if len(rows) != 1:
        raise ValueError(f"{name}: every encoder needs one row per image; got row counts {sorted(rows)}")
    return out


@dataclass(frozen=True)
class Leak:
    """One possible leak: a retrieved original image too similar to a reference."""
    index: int                       # row of the image in the features passed to find_leaks
    image_id: str
    max_similarity: float            # max over encoders and references
    encoder: int                     # the encoder that gave max_similarity
    neighbor_ids: tuple[str, ...]    # nearest references by mean similarity, best first, then by pixel key
    neighbor_similarity: tuple[float, ...]   # their mean similarity over encoders
    verify_score: float | None = None      # best verification score over the neighbours (NaN: unscored)
    verify_residual: float | None = None   # the residual of that match (grey levels)
    verified_reference: str | None = None  # the neighbour that score was reached with
    key_similarity: float | None = None    # best pixel key similarity to a reference (None: no keys)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "image_id": self.image_id,
                "max_similarity": self.max_similarity, "encoder": self.encoder,
                "neighbor_ids": list(self.neighbor_ids),
                "neighbor_similarity": list(self.neighbor_similarity),
                "verify_score": self.verify_score, "verify_residual": self.verify_residual,
                "verified_reference": self.verified_reference, "key_similarity": self.key_similarity}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Leak":
        return cls(**{**d, "neighbor_ids": tuple(d["neighbor_ids"]),
                      "neighbor_similarity": tuple(d["neighbor_similarity"])})


@dataclass(frozen=True)
class LeakReport:
    threshold: float
    num_images: int
    num_references: int
    leaks: tuple[Leak, ...]                       # flagged, by max_similarity desc, index asc
    cleared: tuple[Leak, ...] = field(default=())  # flagged, then marked not-a-leak on review
    rejected: tuple[Leak, ...] = field(default=())  # above the threshold, not copies by verification
    verify_rule: VerifyRule | None = None
    key_threshold: float | None = None            # pixel key similarity that flags too (None: off)

    @property
    def flagged_indices(self) -> np.ndarray:
        return np.array(sorted(leak.index for leak in self.leaks), dtype=np.int64)

    def leak_mask(self) -> np.ndarray:
        """[num_images] bool, True for images still flagged."""
        mask = np.zeros(self.num_images, dtype=bool)
        mask[self.flagged_indices] = True
        return mask

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "num_images": self.num_images,
                "num_references": self.num_references,
                "verify_rule": None if self.verify_rule is None else self.verify_rule.to_dict(),
                "key_threshold": self.key_threshold,
                "leaks": [x.to_dict() for x in self.leaks],
                "cleared": [x.to_dict() for x in self.cleared],
                "rejected": [x.to_dict() for x in self.rejected]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LeakReport":
        rule = d.get("verify_rule")
        return cls(threshold=d["threshold"], num_images=d["num_images"], num_references=d["num_references"],
                   leaks=tuple(Leak.from_dict(x) for x in d["leaks"]),
                   cleared=tuple(Leak.from_dict(x) for x in d["cleared"]),
                   rejected=tuple(Leak.from_dict(x) for x in d["rejected"]),
                   verify_rule=None if rule is None else VerifyRule.of(rule["min_score"], rule["max_residual"]),
                   key_threshold=d.get("key_threshold"))


def _flag(images: list[np.ndarray], refs: list[np.ndarray], threshold: float, method: str,
          nprobe: int, batch_size: int) -> np.ndarray:
    """Rows with similarity > threshold to some reference in some encoder."""
    hits = [similar_pairs(x, r, threshold, method, nprobe, batch_size=batch_size)[0]
            for x, r in zip(images, refs)]
    return np.unique(np.concatenate(hits))


def _nearest(xq: np.ndarray, xb: np.ndarray, k: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (FAISS ``IndexFlatIP``, batched)."""
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    out = [index.search(xq[a:a + batch_size], k) for a in range(0, xq.shape[0], batch_size)]
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def find_leaks(image_features: Features, reference_features: Features, threshold: float = 0.95,
               k: int = 5, reference_ids: Sequence[str] | None = None,
               image_ids: Sequence[str] | None = None, method: str = "auto", nprobe: int = 16,
               batch_size: int = 16384, image_keys: np.ndarray | None = None,
               reference_keys: Keys | None = None, key_threshold: float | None = None,
               key_k: int | None = None) -> LeakReport:
    """Flag images whose max-over-encoders similarity to any reference exceeds ``threshold``
    (or, with ``key_threshold``, whose pixel key similarity to one exceeds that).

    ``image_features``/``reference_features``: one L2-normalised [rows, d_e] matrix per encoder
    (or a single matrix), encoders in the same order. Ids default to the row numbers as strings.
    ``image_keys`` ([rows, pixelkey.DIM]) and ``reference_keys`` (`pixelkey.Keys`, rows aligned
    with the reference features) are needed with ``key_threshold``; ``key_k`` (default ``k``)
    nearest references by key join each flagged image's list.
    """
    images = _per_encoder(image_features, "image_features")
    refs = _per_encoder(reference_features, "reference_features")
    if len(images) != len(refs):
        raise ValueError(f"image_features has {len(images)} encoders, reference_features "
                         f"{len(refs)}; they must match")
    for e, (x, r) in enumerate(zip(images, refs)):
        if x.shape[1] != r.shape[1]:
            raise ValueError(f"encoder {e}: image dim {x.shape[1]} != reference dim {r.shape[1]}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine similarity in [-1, 1]; got {threshold}")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    n, nr = images[0].shape[0], refs[0].shape[0]
    if key_threshold is not None:
        if image_keys is None or reference_keys is None:
            raise ValueError("key_threshold needs image_keys and reference_keys")
        if len(image_keys) != n or len(reference_keys) != nr:
            raise ValueError(f"pixel keys: {len(image_keys)} image and {len(reference_keys)} reference rows "
                             f"for {n} images and {nr} references")
    ref_ids = [str(i) for i in range(nr)] if reference_ids is None else [str(i) for i in reference_ids]
    img_ids = [str(i) for i in range(n)] if image_ids is None else [str(i) for i in image_ids]
    if len(ref_ids) != nr:
        raise ValueError(f"reference_ids has {len(ref_ids)} entries for {nr} references")
    if len(img_ids) != n:
        raise ValueError(f"image_ids has {len(img_ids)} entries for {n} images")
    if len(set(img_ids)) != n:
        raise ValueError("image_ids must be unique (a review file names images by id)")
    if n == 0 or nr == 0:
        return LeakReport(float(threshold), n, nr, (), key_threshold=key_threshold)

    flagged = _flag(images, refs, float(threshold), method, nprobe, batch_size)
    key_sims = key_rows = None
    if key_threshold is not None:
        key_sims, key_rows = reference_keys.nearest(np.asarray(image_keys, np.float32), min(key_k or k, nr))
        if key_threshold < 1.0:  # 1: off by definition (a key of unit length never exceeds 1)
            flagged = np.union1d(flagged, np.flatnonzero(key_sims[:, 0] > key_threshold))
    leaks: list[Leak] = []
    if flagged.size:
        # exact similarities for the flagged rows: the max per encoder, then neighbours by mean
        best = np.stack([_nearest(x[flagged], r, 1, batch_size)[0][:, 0]
                         for x, r in zip(images, refs)])
        max_sim, enc = best.max(axis=0), best.argmax(axis=0)
        mixed, mixed_refs = combine_features([x[flagged] for x in images]), combine_features(refs)
        sims, nbrs = _nearest(mixed, mixed_refs, min(k, nr), batch_size)
        for row, i in enumerate(flagged):
            near = [int(j) for j in nbrs[row] if j >= 0]
            if key_rows is not None:   # the nearest by pixel key join, each reference once
                near += [int(j) for j in key_rows[i] if j >= 0 and j not in near]
            leaks.append(Leak(
                index=int(i), image_id=img_ids[i], max_similarity=float(max_sim[row]),
                encoder=int(enc[row]), neighbor_ids=tuple(ref_ids[j] for j in near),
                neighbor_similarity=tuple(float(mixed[row] @ mixed_refs[j]) for j in near),
                key_similarity=None if key_sims is None else float(key_sims[i, 0])))
    leaks.sort(key=lambda x: (-x.max_similarity, x.index))
    return LeakReport(float(threshold), n, nr, tuple(leaks), key_threshold=key_threshold)


def verify_leaks(report: LeakReport, match: Callable[[str, str], Match], rule: VerifyRule) -> LeakReport:
    """Confirm each flagged image by a second signal: ``match(image_id, reference_id)`` against its
    nearest references (`Leak.neighbor_ids`, best first); it stays a leak when some match passes
    the `rule`, else it moves to `rejected`. Each keeps the match shown for audit: the passing one
    with the best score, else the best-scoring one (NaN only where no neighbour could be scored).
    """
    confirmed, rejected = [], []
    for leak in report.leaks:
        found = [match(leak.image_id, r) for r in leak.neighbor_ids]
        ok = any(rule.passes(m) for m in found)
        best = max(range(len(found)), default=None,
                   key=lambda i: (rule.passes(found[i]), not np.isnan(found[i].score), np.nan_to_num(found[i].score)))
        leak = replace(leak, verify_score=None if best is None else float(found[best].score),
                       verify_residual=None if best is None else float(found[best].residual),
                       verified_reference=None if best is None else leak.neighbor_ids[best])
        (confirmed if ok else rejected).append(leak)
    return replace(report, leaks=tuple(confirmed), rejected=report.rejected + tuple(rejected), verify_rule=rule)


def read_review(review_file: str | os.PathLike) -> list[str]:
    """Image ids marked not-a-leak: a JSON list, or an object with a "not_leaks" list."""
    with open(review_file) as f:
        data = json.load(f)
    if isinstance(data, dict):
        if "not_leaks" not in data:
            raise InputError(f"{review_file}: expected a list of image ids or an object with a "
                             f"'not_leaks' list; got keys {sorted(data)}")
        data = data["not_leaks"]
    if not isinstance(data, list) or not all(isinstance(x, (str, int)) for x in data):
        raise InputError(f"{review_file}: 'not_leaks' must be a list of image ids")
    return [str(x) for x in data]


def clear_reviewed(report: LeakReport, marked: set[str]) -> LeakReport:
    """Move the flagged images a person marked as not-a-leak from `leaks` to `cleared`."""
    keep = tuple(x for x in report.leaks if x.image_id not in marked)
    newly = tuple(x for x in report.leaks if x.image_id in marked)
    return replace(report, leaks=keep, cleared=report.cleared + newly)
