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

from curation.report import ReportLimits
from index.contract import TransferRecord


@dataclass(frozen=True)
class ReportItems:
    panels: tuple[tuple[str, tuple[TransferRecord, ...]], ...]  # (query id, its records by rank in it)
    rejected: tuple                                  # verification-rejected candidates shown (LeakCandidate)
    leak_images: tuple[str, ...]                     # originals of the leak panels (removed, cleared, rejected)
    clusters: tuple[tuple[tuple[str, bool], ...], ...]   # duplicate clusters shown: (image id, kept), whole
    cluster_images: tuple[str, ...]                  # their members shown (max_cluster_members of each)

    def crop_keys(self) -> set[str]:
        """Keys of the transfer records whose crop a per-query panel shows."""
        return {r.key for _, recs in self.panels for r in recs}

    def original_ids(self) -> set[str]:
        """Every gallery original the report shows (panels, leaks, duplicate clusters)."""
        return ({r.source_id for _, recs in self.panels for r in recs} | set(self.leak_images)
                | set(self.cluster_images))


def query_rank(rec: TransferRecord, qid: str) -> int:
    return next(h.rank for h in rec.queries if h.query == qid)


def report_items(records: Sequence[TransferRecord], leak_report, filtered,
                 limits: ReportLimits = ReportLimits()) -> ReportItems:
    """The panels, leaks and clusters the report shows, each capped by ``limits``.

    ``records``: every transfer record of the final selection, in curated order; ``leak_report``:
    the filter stage's LeakReport (or None); ``filtered``: its Filtered (for duplicate clusters).
    Up to ``4 * max_queries`` query panels are kept (the renderer spreads its ``max_queries`` over
    classes), each with its ``max_per_query`` best-ranked records in that query.
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
    clusters = sorted(filtered.clusters({r.source_id for r in records}), key=len, reverse=True)[:limits.max_clusters]
    return ReportItems(panels=panels, rejected=rejected, leak_images=leak_images,
                       clusters=tuple(tuple(cl) for cl in clusters),
                       cluster_images=tuple(i for cl in clusters for i, _ in cl[:limits.max_cluster_members]))
