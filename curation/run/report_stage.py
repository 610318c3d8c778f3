"""The report stage's body: fill `curation.report_data.ReportData` from a run's state and write report.html.

What it shows is `report_items` of the run (the same call the write stage made, so the write
stage's thumbnails cover every written crop and original shown); it reads from the gallery, each by
its recorded byte range, only the images never written (removed leaks and duplicates) and the
candidates of the leak panels that were kept (verification rejected them, or a review), whose
alignment is redone at full size for the evidence; and the target's references shown. An image that cannot be read is shown as a placeholder with the reason.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from curation import report_data as rpt
from curation.report import write_report
from curation.report_evidence import aligned_evidence
from curation.report_thumbs import read_report_thumbs
from curation.run.report_items import query_rank, report_items
from curation.run.state import RunState
from curation.thresholds import limits_in_force
from index.core import contract
from index.ranged import read_by_id
from index.skips import SkipCounts

NOT_WRITTEN = "not written (its original could not be read when the crops were cut)"


def query_classes(st: RunState) -> dict[str, str]:
    """Query id -> class name, for every query of the run (text queries: ``text:<class>``)."""
    label = {q.id: st.qs.classes[q.label] for q in st.qs.queries}
    return {q: label.get(q, q.removeprefix("text:")) for q in st.query_ids}


def gallery_images(gindex, ids: Iterable[str]) -> dict[str, Any]:
    """Gallery originals by id, read by range: a PIL image, or `Unreadable` with the reader's reason."""
    got = read_by_id(gindex, ids, SkipCounts())
    out: dict[str, Any] = {i: rpt.Unreadable(reason) for i, reason in got.unreadable.items()}
    out.update(got.images)
    return out


def load_item(item) -> Any:
    """A query or reference image (`LabeledImage`), or `Unreadable` with what went wrong."""
    try:
        return item.load()
    except Exception as e:  # shown as a labelled placeholder; the run itself read it before
        return rpt.Unreadable(f"{type(e).__name__}: {e}")


def _aligned(gallery, reference) -> rpt.Aligned | None:
    if isinstance(gallery, rpt.Unreadable) or isinstance(reference, rpt.Unreadable):
        return None
    found = aligned_evidence(gallery, reference)
    return None if found is None else rpt.Aligned(*found)


def _leak_panels(st: RunState, items, originals: dict[str, Any], full: dict[str, Any],
                 limits: rpt.ReportLimits) -> list[rpt.LeakPanel]:
    """``originals``: what each panel shows; ``full``: the full gallery images verification compared."""
    leak_report, filtered = st.leak_report, st.filtered
    if not leak_report:
        return []
    refs = {r.id: r for r in st.qs.references}
    ref_images: dict[str, Any] = {}

    def ref_image(i: str):
        if i not in ref_images:
            ref_images[i] = load_item(refs[i]) if i in refs else rpt.Unreadable("not among the references")
        return ref_images[i]

    panels = []
    for leak, state in ([(x, "removed") for x in leak_report.leaks] + [(x, "cleared") for x in leak_report.cleared]
                        + [(x, "rejected") for x in items.rejected]):
        nbrs = list(zip(leak.neighbor_ids, leak.neighbor_similarity))[:limits.max_neighbours]
        if leak.verified_reference and leak.verified_reference not in dict(nbrs):
            k = leak.neighbor_ids.index(leak.verified_reference)   # the best-verifying one is always shown
            nbrs = nbrs[:-1] + [(leak.verified_reference, leak.neighbor_similarity[k])]
        image = originals.get(leak.image_id)
        panels.append(rpt.LeakPanel(
            source_id=leak.image_id, image=image, max_similarity=leak.max_similarity,
            neighbours=[rpt.ReferenceMatch(id=i, similarity=s, image=ref_image(i), verified=i == leak.verified_reference)
                        for i, s in nbrs],
            crops_removed=filtered.leak_items.get(leak.image_id, 0) if state == "removed" else 0,
            unflagged=state == "cleared", review_note="marked not a leak on review" if state == "cleared" else "",
            verify_score=leak.verify_score, verify_residual=leak.verify_residual,
            key_similarity=leak.key_similarity, rejected=state == "rejected",
            aligned=_aligned(full[leak.image_id], ref_image(leak.verified_reference))
            if leak.verified_reference else None))
    return panels


def report_data(st: RunState, counts: dict[str, Any], time_parts: dict[str, float]) -> rpt.ReportData:
    qs, records, th = st.qs, st.records, st.th
    limits = rpt.ReportLimits()
    classes = query_classes(st)
    items = report_items(records, st.leak_report, st.filtered, classes, limits)
    # written images' thumbnails come from the write stage; only images never written (removed
    # leaks and duplicates) are read from the gallery
    crop_thumbs, originals = read_report_thumbs(st.out / contract.REPORT_THUMBS_FILE)
    full = gallery_images(st.gindex, (items.original_ids() - {r.source_id for r in records}) | set(items.leak_images))
    originals = {**originals, **full}
    missing = rpt.Unreadable(NOT_WRITTEN)
    qimg = {q.id: q for q in qs.queries}
    panels = [rpt.QueryPanel(
        id=qid, class_name=classes[qid], image=load_item(qimg[qid]) if qid in qimg else None,
        retrieved=[rpt.RetrievedItem(source_id=r.source_id, crop=r.crop,
                                     similarity=next(h.similarity for h in r.queries if h.query == qid),
                                     rank=query_rank(r, qid), crop_image=crop_thumbs.get(r.key, missing),
                                     original_image=originals.get(r.source_id, missing))
                   for r in recs]) for qid, recs in items.panels]
    mosaic = [rpt.ClassMosaic(c, n, [rpt.MosaicItem(r.key, r.source_id, r.similarity, crop_thumbs.get(r.key, missing))
                                     for r in recs]) for c, n, recs in items.mosaic]
    per_query, per_class = rpt.count_per_query_and_class(records, classes)
    # removed duplicates as the duplicates section shows them: a crop of an image the set keeps, or of an
    # image removed as a duplicate of another (in a cluster)
    kept_images = {r.source_id for r in records}
    first_dups = sorted(st.filtered.duplicates & set(st.first.ids.tolist()))
    further_crops = sum(row.id in kept_images for row in st.gindex.rows(np.array(first_dups, dtype=np.int64)))
    clusters = st.filtered.clusters(kept_images)   # all of them; the report shows the largest
    thd = th.to_dict()
    c = counts
    return rpt.ReportData(
        title=f"Curated transfer set: {qs.name}", query_set=qs.name, requested=st.cfg.size,
        retrieved=c["retrieved"], removed_duplicates=c["removed_duplicate"], removed_further_crops=further_crops,
        duplicate_images=sum(not kept for cl in clusters for _, kept in cl), duplicate_clusters=len(clusters),
        removed_leaks=c["removed_leak"], backfilled=c["backfilled"], written=c["written"],
        unreadable=c["removed_unreadable"] + c["unreadable_at_write"],
        thresholds=limits_in_force(thd),
        calibration=st.calibration.to_dict() if st.calibration else None,
        rejected_total=len(st.leak_report.rejected) if st.leak_report else 0,
        encoders=[s.name for s in st.specs],
        extra={"strategy": st.cfg.strategy, "depth k": c["depth_k"], "verifier": th.verifier,
               "thresholds from": th.source, "references verified per candidate": th.neighbours,
               **search_rows(st.point, st.recall)},
        mosaic=mosaic, queries=panels, leaks=_leak_panels(st, items, originals, full, limits),
        dedup_clusters=[rpt.DedupCluster([rpt.DedupMember(id=i, image=originals.get(i, missing), kept=k)
                                          for i, k in cl]) for cl in items.clusters],
        per_query_counts=per_query, per_class_counts=per_class, without_query=sum(not r.queries for r in records),
        stages={k: dict(v) for k, v in st.stage_status.items()}, time_parts=time_parts)


def search_rows(point: dict[str, Any] | None, est: dict[str, Any] | None) -> dict[str, str]:
    """The report's lines on the search: the operating point in force and the recall estimate."""
    if not est or not point:
        return {}
    rows = {"search operating point": f"nprobe {point['nprobe']}, rerank {point['rerank']} ({point['why']})"}
    sample = est.get("sample")
    basis = ("the index is exact" if sample is None else
             f"{sample['queries']} queries, exact search over {sample['groups']} of {sample['of_groups']} "
             f"index groups ({sample['vectors']} vectors)")
    low = f"; BELOW the target {est['target']}" if est.get("below_target") else ""
    rows[f"search recall@{est['k']}"] = f"{est['recall']:.3f}, lowest query {est['min_query_recall']:.3f} ({basis}){low}"
    return rows


def write_report_html(st: RunState, counts: dict[str, Any], time_parts: dict[str, float]) -> rpt.ReportStats:
    return write_report(st.out / contract.REPORT_FILE, report_data(st, counts, time_parts))
