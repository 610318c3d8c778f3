"""Copy detection behind one interface: which gallery images are leaks of the target dataset,
which are duplicates of each other.

The filter stage calls `CopyDetector.leaks` and `CopyDetector.duplicates`; the rules live in
`curation.decontam` (embedding + pixel key candidates, confirmed against the nearest references) and
`curation.dedup` (candidate pairs, confirmed pairwise, connected components), the second signal in
`curation.verify`, the thresholds in `curation.thresholds`. Each call gathers all its candidate
pairs, reads the thumbnails they need once, and verifies the pairs not seen before in one batch,
fanned out over the executor in chunks; results are memoised across backfill rounds, so a pair is
verified once per run.

`match_pairs` is the one place batch verification is called from.
"""
from __future__ import annotations

import functools
import time
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from curation import verify_batch
from curation.decontam import LeakReport, find_leaks, verify_leaks
from curation.dedup import duplicate_clusters
from curation.pixelkey import Keys
from curation.thresholds import Thresholds
from curation.verify import NO_MATCH, Match, Thumb
from index.core.executor import Executor, LocalExecutor, chunks
from index.knn import combine_features

PAIRS_PER_TASK = 2048   # verification pairs per executor task (thumbnails travel with the task)


def match_pairs(pairs: Sequence[tuple[Thumb, Thumb]], *, device: str | None = None,
                progress: bool | str = False) -> list[Match]:
    """`copy_match` of every pair, batched by thumbnail sizes (`curation.verify_batch`)."""
    return verify_batch.match_pairs(pairs, device=device, progress=progress)


def _verify_task(task: tuple[list[tuple[int, int]], list[Thumb]], device: str | None) -> list[tuple[float, float]]:
    pairs, thumbs = task
    return [tuple(m) for m in match_pairs([(thumbs[a], thumbs[b]) for a, b in pairs], device=device)]


def _verify_worker(device: str | None) -> Callable:
    return functools.partial(_verify_task, device=device)


class CopyDetector:
    """Leaks and duplicates among gallery originals, for one run's thresholds and references.

    ``load_references(ids)`` / ``load_gallery(ids)`` return {id: PIL image} (missing ids: unreadable,
    their pairs score NaN and never pass). ``ref_keys`` may be None when no key threshold is in force.
    """

    def __init__(self, th: Thresholds, ref_ids: Sequence[str], ref_feats: Sequence[np.ndarray],
                 ref_keys: Keys | None, load_references: Callable[[set[str]], dict[str, Image.Image]],
                 load_gallery: Callable[[set[str]], dict[str, Image.Image]],
                 executor: Executor | None = None, device: str | None = None,
                 pairs_per_task: int = PAIRS_PER_TASK):
        self.th, self.ref_ids, self.ref_feats, self.ref_keys = th, list(ref_ids), list(ref_feats), ref_keys
        self._load = {False: load_references, True: load_gallery}
        self.executor = executor or LocalExecutor()
        self.device, self.pairs_per_task = device, pairs_per_task
        self.thumbs: dict[tuple[bool, str], Thumb | None] = {}   # (is gallery, id) -> thumbnail
        self.memo: dict[tuple[str, str, bool], Match] = {}       # (gallery id, other id, other is gallery)
        self.seconds = 0.0

    @property
    def pairs_verified(self) -> int:
        return len(self.memo)

    def leaks(self, image_ids: Sequence[str], feats: Sequence[np.ndarray], keys: np.ndarray | None) -> LeakReport:
        """Decontamination of these gallery originals (one feature matrix per encoder, rows aligned
        with ``image_ids``; ``keys`` their pixel keys, used when a key threshold is in force)."""
        th = self.th
        report = find_leaks(list(feats), self.ref_feats, th.leak, th.neighbours, reference_ids=self.ref_ids,
                            image_ids=list(image_ids), key_threshold=th.key, key_k=th.key_neighbours,
                            image_keys=keys if th.key is not None else None, reference_keys=self.ref_keys)
        if th.rule is None:
            return report
        self.verify([(x.image_id, r, False) for x in report.leaks for r in x.neighbor_ids])
        return verify_leaks(report, lambda a, b: self.memo[(a, b, False)], th.rule)

    def duplicates(self, image_ids: Sequence[str], feats: Sequence[np.ndarray], keys: np.ndarray | None) -> np.ndarray:
        """Cluster label per image (`curation.dedup.duplicate_clusters`), verified pairs only when a
        verifier is in force."""
        th, ids = self.th, [str(i) for i in image_ids]
        rule = th.rule

        def keep_pair(i: np.ndarray, j: np.ndarray) -> np.ndarray:
            pairs = [(ids[a], ids[b], True) for a, b in zip(i, j)]
            self.verify(pairs)
            found = [self.memo[p] for p in pairs]
            return np.asarray(rule.accepts([m.score for m in found], [m.residual for m in found]), bool)

        return duplicate_clusters(combine_features(list(feats)), th.dedup,
                                  keep_pair=None if rule is None else keep_pair,
                                  per_image=None if rule is None else th.neighbours,
                                  keys=keys if th.key is not None else None, key_threshold=th.key,
                                  key_per_image=th.key_neighbours)

    def verify(self, pairs: Iterable[tuple[str, str, bool]]) -> None:
        """Score the pairs not scored before, in one batch over the executor."""
        todo = sorted({p for p in pairs if p not in self.memo})
        if not todo:
            return
        t = time.perf_counter()
        self._prefetch(True, {a for a, _, _ in todo} | {b for _, b, g in todo if g})
        self._prefetch(False, {b for _, b, g in todo if not g})
        scorable = []
        for a, b, g in todo:
            if self.thumbs[(True, a)] is None or self.thumbs[(g, b)] is None:
                self.memo[(a, b, g)] = NO_MATCH
            else:
                scorable.append((a, b, g))
        tasks = []
        for part in chunks(scorable, self.pairs_per_task):
            slot: dict[tuple[bool, str], int] = {}
            idx = [(slot.setdefault((True, a), len(slot)), slot.setdefault((g, b), len(slot))) for a, b, g in part]
            tasks.append((idx, [self.thumbs[k] for k in slot]))
        results = self.executor.map(functools.partial(_verify_worker, self.device), tasks, desc="verify pairs",
                                    units=[len(idx) for idx, _ in tasks], unit="pair")
        for part, res in zip(chunks(scorable, self.pairs_per_task), results):
            for p, m in zip(part, res):
                self.memo[p] = Match(float(m[0]), float(m[1]))
        self.seconds += time.perf_counter() - t

    def _prefetch(self, gallery: bool, ids: set[str]) -> None:
        missing = {i for i in ids if (gallery, i) not in self.thumbs}
        if missing:
            found = self._load[gallery](missing)
            for i in missing:
                self.thumbs[(gallery, i)] = Thumb.of(found[i]) if i in found else None
