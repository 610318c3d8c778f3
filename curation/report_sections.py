"""The HTML of each section of the curation report (`curation.report`): pictures, then numbers.

Each function takes the `ReportData`, the `ReportLimits` and the thumbnail encoder where it shows
images, and returns the section's body; whatever a limit cuts is said on the page.
"""
from __future__ import annotations

import statistics
from typing import Sequence

from curation.htmlpage import escape as _e, fmt as _fmt, table
from curation.report_data import QueryPanel, ReportData, ReportLimits, Thumbs
from curation.thresholds import limit_text


def lede(data: ReportData) -> str:
    """One sentence on what the run produced, above the pictures."""
    classes = len(data.per_class_counts)
    parts = [f"<b>{data.written}</b> crops written" + (f" of {data.requested} asked for" if data.requested else ""),
             f"{classes} classes" if classes else "",
             f"{data.removed_leaks} removed as leaks of the target's images",
             *_duplicates(data),
             f"{data.unreadable} unreadable" if data.unreadable else "",
             f"{data.backfilled} backfilled from deeper neighbours" if data.backfilled else ""]
    return f'<p class="lede">{", ".join(p for p in parts if p)}.</p>'


def _duplicate_images(data: ReportData) -> tuple[int, int]:
    """(clusters, images removed as duplicates of another image), as the duplicates section counts them."""
    clusters = len(data.dedup_clusters) if data.duplicate_clusters is None else data.duplicate_clusters
    images = (sum(sum(not m.kept for m in c.members) for c in data.dedup_clusters)
              if data.duplicate_images is None else data.duplicate_images)
    return clusters, images


def _duplicates(data: ReportData) -> list[str]:
    """The items removed as duplicates, split as the duplicates section shows them: crops of images that
    duplicate another image (its clusters), and further crops of an image the set keeps (no cluster)."""
    crops, further = data.removed_duplicates - data.removed_further_crops, data.removed_further_crops
    if not data.removed_duplicates:
        return ["0 as duplicates"]
    parts = [f"{crops} crop(s) of {_duplicate_images(data)[1]} duplicate image(s)" if crops else "",
             f"{further} further crop(s) of images already in the set" if further else ""]
    return [f"{data.removed_duplicates} as duplicates ({', '.join(p for p in parts if p)})"]


def mosaic(data: ReportData, limits: ReportLimits, th: Thumbs) -> str:
    if not data.mosaic:
        return "<p>No curated items.</p>"
    out = [f'<p class="small">Up to {limits.max_mosaic_per_class} crops per class, spread evenly over the '
           "class's curated ranks (an item belongs to the class of its most similar query).</p>"]
    for m in data.mosaic:
        shown = f", {len(m.items)} shown" if len(m.items) < m.count else ""
        tiles = "".join(th.img(it.image, f"{it.key} (from {it.source_id}, sim {it.similarity:.3f})")
                        for it in m.items)
        out.append(f'<div class="mosaic"><h3>{_e(m.class_name)} <span class="count">{m.count} items{shown}'
                   f'</span></h3><div class="tiles">{tiles}</div></div>')
    return "\n".join(out)


def _spread_by_class(queries: Sequence[QueryPanel], limit: int) -> list[QueryPanel]:
    """Up to `limit` queries, taken round-robin over classes, shown in their original order."""
    if len(queries) <= limit:
        return list(queries)
    by_class: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        by_class.setdefault(q.class_name, []).append(i)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for idx in by_class.values():
            if depth < len(idx) and len(chosen) < limit:
                chosen.append(idx[depth])
        depth += 1
    return [queries[i] for i in sorted(chosen)]


def per_query(data: ReportData, limits: ReportLimits, th: Thumbs) -> str:
    if not data.queries:
        return "<p>No queries recorded.</p>"
    shown = _spread_by_class(data.queries, limits.max_queries)
    out = ['<p class="small">Each query (outlined) beside its best-ranked curated crops, each crop with the '
           "gallery image it was cut from.</p>"]
    if len(shown) < len(data.queries):
        out.append(f'<p class="note">Showing {len(shown)} of {len(data.queries)} queries '
                   f"(spread over classes).</p>")
    for q in shown:
        items = sorted(q.retrieved, key=lambda r: (r.rank, -r.similarity, r.source_id, r.crop))
        cells = []
        for r in items[:limits.max_per_query]:
            cap = f'<div class="cap" title="{_e(r.caption)}">{_e(r.caption)}</div>' if r.caption else ""
            cells.append(
                '<div class="pair"><div class="imgs">'
                f'{th.img(r.crop_image, f"crop {r.crop} of {r.source_id}")}'
                f'{th.img(r.original_image, f"original {r.source_id}")}</div>'
                f'<div class="small">#{r.rank} sim {r.similarity:.3f} · crop {r.crop}<br>{_e(r.source_id)}</div>'
                f"{cap}</div>")
        more = len(items) - limits.max_per_query
        if more > 0:
            cells.append(f'<p class="note">+{more} more not shown</p>')
        if not items:
            cells.append("<p>Nothing retrieved for this query.</p>")
        out.append(
            f'<div class="query"><div class="qhead">{th.img(q.image, f"query {q.id}")}'
            f'<div class="small"><b>{_e(q.class_name)}</b><br>{_e(q.id)}</div></div>'
            f'<div class="grid">{"".join(cells)}</div></div>')
    return "\n".join(out)


def _limit(name: str, value: float | None, limit: float | None, op: str) -> str:
    if value is None:
        return ""
    return f"{name} <b>{_fmt(value)}</b>" + (" (limit off)" if limit is None else f" (copy: {_e(op)} {_fmt(limit)})")


def leaks(data: ReportData, limits: ReportLimits, th: Thumbs) -> str:
    if not data.leaks:
        return "<p>No leaks flagged.</p>"
    n_unflagged = sum(lk.unflagged for lk in data.leaks)
    n_rejected = sum(lk.rejected for lk in data.leaks)
    n_removed = len(data.leaks) - n_unflagged - n_rejected
    out = [f"<p>{n_removed + n_unflagged} gallery images flagged; {n_removed} removed, "
           f"{n_unflagged} un-flagged by review. Each is shown beside the reference it copies (outlined red), "
           "the two as verification aligned them and what differs there, then its other nearest "
           "references.</p>"]
    if data.rejected_total:
        out.append(f"<p>{data.rejected_total} more were above the similarity threshold but not copies by "
                   f"verification, and kept; the {n_rejected} highest-scoring are shown last, for audit.</p>")
    order = sorted(data.leaks, key=lambda lk: (lk.rejected, -lk.max_similarity, lk.source_id))
    thr = data.thresholds
    for lk in order:
        state = "rejected" if lk.rejected else "unflagged" if lk.unflagged else "removed"
        badge = {"rejected": "not a copy by verification: kept", "unflagged": "un-flagged by review: kept",
                 "removed": f"removed as leak ({lk.crops_removed} crops)"}[state]
        note = f'<div class="small">review: {_e(lk.review_note)}</div>' if lk.review_note else ""
        evidence = ", ".join(p for p in (
            _limit("verification score", lk.verify_score, thr.get("verify"), ">"),
            _limit("residual", lk.verify_residual, thr.get("max_residual"), "<="),
            _limit("max similarity", lk.max_similarity, thr.get("leak"), ">"),
            _limit("pixel key", lk.key_similarity, thr.get("key"), ">")) if p)
        verified = [r for r in lk.neighbours if r.verified]
        others = [r for r in lk.neighbours if not r.verified][:max(0, limits.max_neighbours - len(verified))]

        def ref(r, lk=lk) -> str:
            return (f'<div class="member{" verified" if r.verified else ""}">{th.img(r.image, f"reference {r.id}")}'
                    f'<div class="small">{"copies " if r.verified else ""}sim {r.similarity:.3f}<br>{_e(r.id)}</div>'
                    "</div>")
        aligned = ""
        if lk.aligned is not None:
            a = lk.aligned
            aligned = ('<div class="evidence">'
                       f'<div class="member">{th.img(a.gallery, "gallery image, aligned")}'
                       '<div class="small">gallery, aligned</div></div>'
                       f'<div class="member">{th.img(a.reference, "reference, aligned")}'
                       '<div class="small">reference, aligned</div></div>'
                       f'<div class="member">{th.img(a.difference, "difference after the fit")}'
                       '<div class="small">difference ×4</div></div></div>')
        out.append(
            f'<div class="leak {state}"><div class="small"><span class="badge {state}">{_e(badge)}</span> '
            f"{evidence}</div>{note}"
            f'<div class="grid"><div class="member">{th.img(lk.image, f"flagged {lk.source_id}")}'
            f'<div class="small"><b>gallery</b><br>{_e(lk.source_id)}</div></div>'
            f'{"".join(ref(r) for r in verified)}{aligned}{"".join(ref(r) for r in others)}</div></div>')
    return "\n".join(out)


def dedup(data: ReportData, limits: ReportLimits, th: Thumbs) -> str:
    crops = data.removed_further_crops
    further = (f"{crops} item(s) removed as duplicates were further crops of an image already in the set "
               "(one crop per image is kept)") if crops else ""
    if not data.dedup_clusters:
        return "<p>No duplicate clusters" + (f"; {further}" if further else "") + ".</p>"
    clusters = sorted(data.dedup_clusters, key=lambda c: (-len(c.members), min((m.id for m in c.members), default="")))
    shown = clusters[:limits.max_clusters]
    n_clusters, n_images = _duplicate_images(data)
    out = [f"<p>{n_clusters} cluster(s); {n_images} duplicate image(s) removed "
           f"(one image kept per cluster, outlined green, first in its row).</p>"]
    if further:
        out.append(f'<p class="small">{further}.</p>')
    if len(shown) < n_clusters:
        out.append(f'<p class="note">Showing the {len(shown)} largest of {n_clusters} clusters.</p>')
    for c in shown:
        members = sorted(c.members, key=lambda m: (not m.kept, m.id))
        cells = [f'<div class="member{" kept" if m.kept else ""}">{th.img(m.image, m.id)}'
                 f'<div class="small">{"kept: " if m.kept else ""}{_e(m.id)}</div></div>'
                 for m in members[:limits.max_cluster_members]]
        if len(members) > limits.max_cluster_members:
            cells.append(f'<p class="note">+{len(members) - limits.max_cluster_members} more not shown</p>')
        kept = "" if any(m.kept for m in c.members) else " (none kept in the final set)"
        out.append(f'<div class="cluster"><div class="small">{len(members)} images{kept}</div>'
                   f'<div class="grid">{"".join(cells)}</div></div>')
    return "\n".join(out)


def _svg_columns(counts: Sequence[tuple[str, int]], height: int = 120) -> str:
    n = len(counts)
    if not n:
        return "<p>No counts.</p>"
    peak = max(max(c for _, c in counts), 1)
    bar_w = max(2, min(24, 900 // n))
    width = bar_w * n
    rects = []
    for i, (name, c) in enumerate(counts):
        h = round(height * c / peak, 1)
        rects.append(f'<rect x="{i * bar_w}" y="{height - h}" width="{max(bar_w - 1, 1)}" height="{h}" '
                     f'fill="#468"><title>{_e(name)}: {c}</title></rect>')
    return (f'<svg width="{width}" height="{height + 2}" viewBox="0 0 {width} {height + 2}" role="img">'
            f'<line x1="0" y1="{height + 1}" x2="{width}" y2="{height + 1}" stroke="#888"/>'
            f'{"".join(rects)}</svg>')


def _html_bars(counts: Sequence[tuple[str, int]]) -> str:
    if not counts:
        return "<p>No counts.</p>"
    peak = max(max(c for _, c in counts), 1)
    rows = "".join(f'<tr><td>{_e(name)}</td><td style="width:400px"><div class="bar" '
                   f'style="width:{100 * c / peak:.1f}%"></div></td><td>{c}</td></tr>'
                   for name, c in counts)
    return f'<table class="bars">{rows}</table>'


def _stats_line(values: Sequence[int], what: str) -> str:
    if not values:
        return ""
    return (f'<p class="small">{len(values)} {what}; min {min(values)}, median '
            f"{statistics.median(values):g}, max {max(values)}, total {sum(values)}</p>")


def _what_is_counted(data: ReportData) -> str:
    """What the per-query and per-class totals count, and how they relate to the items written."""
    total = sum(data.per_query_counts.values())
    rule = ("Each curated item is counted once, for its most similar query (ties by query id) and that "
            "query's class, so both totals are the same")
    if total == data.written and not data.without_query:
        return f'<p class="small">{rule}: the {data.written} items written.</p>'
    not_written = total + data.without_query - data.written
    parts = [f"{total} items"]
    if data.without_query:
        parts.append(f"{data.without_query} more have no query (drawn at random) and are in no bar")
    if not_written:
        parts.append(f"{not_written} of the items counted were not written (unreadable when their crops were cut)")
    return f'<p class="small">{rule}: {"; ".join(parts)}; {data.written} items written.</p>'



def histograms(data: ReportData) -> str:
    q = list(data.per_query_counts.items())
    c = list(data.per_class_counts.items())
    return (_what_is_counted(data) + "<h3>Items per query</h3>" + _stats_line([v for _, v in q], "queries")
            + _svg_columns(q) + "<h3>Items per class</h3>" + _stats_line([v for _, v in c], "classes")
            + _html_bars(c))


def summary(data: ReportData) -> str:
    rows = [
        ("query set", data.query_set), ("requested size", data.requested),
        ("retrieved", data.retrieved), ("removed as duplicate", data.removed_duplicates),
        ("of them, further crops of an image in the set", data.removed_further_crops),
        ("removed as leak", data.removed_leaks), ("backfilled", data.backfilled),
        ("written", data.written), ("unreadable", data.unreadable),
    ]
    rows += [(f"threshold: {k}", limit_text(v)) for k, v in sorted(data.thresholds.items())]
    rows += [(str(k), v) for k, v in sorted(data.extra.items(), key=lambda kv: str(kv[0]))]
    enc = "".join(f"<li>{_e(e)}</li>" for e in data.encoders) or "<li>none recorded</li>"
    return f"{table(rows)}\n<h3>Encoders</h3><ul>{enc}</ul>"


def timings(data: ReportData) -> str:
    """Stage times (and whether each was computed or reused), then the largest parts within them."""
    if not data.stages and not data.time_parts:
        return "<p>No timings recorded.</p>"
    rows = "".join(f'<tr><td>{_e(k)}</td><td class="n">{v["seconds"]:.1f} s</td><td>{_e(v["status"])}</td></tr>'
                   for k, v in data.stages.items())
    parts = sorted(data.time_parts.items(), key=lambda kv: -kv[1])
    prow = "".join(f'<tr><td>{_e(k)}</td><td class="n">{v:.1f} s</td></tr>' for k, v in parts)
    return (f'<p class="small">The stages before this report, as this run ran them (a reused stage was read '
            f'from its record).</p><table class="nums"><tr><th>stage</th><th>time</th><th>status</th></tr>{rows}'
            "</table>" + (f'<h3>Largest parts</h3><table class="nums">{prow}</table>' if parts else ""))
