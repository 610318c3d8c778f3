"""Which images the curation report shows: a pure function of the run's results.

The write stage calls it before materialising the crops, so the originals it decodes anyway also
yield the report's thumbnails of the written images it shows; the report stage calls it again and
reads from the gallery only the images that were never written (removed leaks and duplicates).
Both must agree exactly, hence one function.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from curation.report_data import ReportLimits, record_class
from index.core.contract import TransferRecord


@dataclass(frozen=True)
class ReportItems:
    mosaic: tuple[tuple[str, int, tuple[TransferRecord, ...]], ...]  # (class, its item count, a sample)
    panels: tuple[tuple[str, tuple[TransferRecord, ...]], ...]  # (query id, its records by rank in it)
    rejected: tuple                                  # verification-rejected candidates shown (LeakCandidate)
    leak_images: tuple[str, ...]                     # originals of the leak panels (removed, cleared, rejected)
    clusters: tuple[tuple[tuple[str, bool], ...], ...]   # duplicate clusters shown: (image id, kept), whole
    cluster_images: tuple[str, ...]                  # their members shown (max_cluster_members of each)

    def crop_keys(self) -> set[str]:
        """Keys of the transfer records whose crop the class mosaic or a per-query panel shows."""
        return {r.key for _, recs in self.panels for r in recs} | {r.key for _, _, recs in self.mosaic for r in recs}

    def original_ids(self) -> set[str]:
        """Every gallery original the report shows (panels, leaks, duplicate clusters)."""
        return ({r.source_id for _, recs in self.panels for r in recs} | set(self.leak_images)
                | set(self.cluster_images))


def query_rank(rec: TransferRecord, qid: str) -> int:
    return next(h.rank for h in rec.queries if h.query == qid)


def spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def class_mosaic(records: Sequence[TransferRecord], query_class: dict[str, str], per_class: int
                 ) -> tuple[tuple[str, int, tuple[TransferRecord, ...]], ...]:
    """Per class (in `query_class` order): its item count and up to ``per_class`` of its records,
    spread evenly over its curated ranks, so the sample shows the best and the last it holds."""
    by_class: dict[str, list[TransferRecord]] = {c: [] for c in dict.fromkeys(query_class.values())}
    for rec in records:
        c = record_class(rec, query_class)
        if c is not None:
            by_class[c].append(rec)
    return tuple((c, len(recs), tuple(recs[i] for i in spread(len(recs), per_class))) for c, recs in by_class.items())


def report_items(records: Sequence[TransferRecord], leak_report, filtered, query_class: dict[str, str],
                 limits: ReportLimits = ReportLimits()) -> ReportItems:
    """The class mosaic, panels, leaks and clusters the report shows, each capped by ``limits``.

    ``records``: every transfer record of the final selection, in curated order; ``leak_report``:
    the filter stage's LeakReport (or None); ``filtered``: its Filtered (for duplicate clusters);
    ``query_class``: query id -> class name. Up to ``4 * max_queries`` query panels are kept (the
    renderer spreads its ``max_queries`` over classes), each with its ``max_per_query``
    best-ranked records in that query.
    """
    by_query: dict[str, list[TransferRecord]] = defaultdict(list)
    for rec in records:
        for h in rec.queries:
            by_query[h.query].append(rec)
    panels = tuple((q, tuple(sorted(by_query[q], key=lambda r: query_rank(r, q))[:limits.max_per_query]))
                   for q in list(by_query)[: limits.max_queries * 4])
    rejected = tuple(sorted(leak_report.rejected, key=lambda x: -np.nan_to_num(x.verify_score or 0.0))[
        :limits.max_rejected]) if leak_report else ()
    leak_images = tuple(x.image_id for x in (leak_report.leaks + leak_report.cleared + rejected)) \
        if leak_report else ()
    # each cluster as the report lays it out: the kept image first, then by id
    clusters = [sorted(cl, key=lambda m: (not m[1], m[0])) for cl in sorted(
        filtered.clusters({r.source_id for r in records}), key=len, reverse=True)[:limits.max_clusters]]
    return ReportItems(mosaic=class_mosaic(records, query_class, limits.max_mosaic_per_class),
                       panels=panels, rejected=rejected, leak_images=leak_images,
                       clusters=tuple(tuple(cl) for cl in clusters),
                       cluster_images=tuple(i for cl in clusters for i, _ in cl[:limits.max_cluster_members]))
