"""The curated set's ``report.html``: one self-contained page to inspect a curation run.

Thumbnails are inline base64 JPEG data URIs, the CSS is inline, there is no script and no
external resource, so the file can be mailed or opened from an archive. Sections (stable ids):

- ``summary``: counts (retrieved, removed as duplicate, removed as leak, backfilled, written,
  unreadable), thresholds, encoders and any extra numbers;
- ``per-query``: each query image, then its retrieved crops, each beside the original gallery
  image it was cut from (as Figures 6 and 9 of Vemulapalli et al. 2024);
- ``dedup-clusters``: the largest clusters of duplicate original images, the kept one marked;
- ``leaks``: every flagged leak beside its nearest references and their similarities, and
  whether a review un-flagged it;
- ``histograms``: the number of curated items per query and per class.

The pipeline fills a `ReportData` (plain fields; images as PIL images or encoded bytes, None for
an image that could not be read) and calls `write_report`; `count_per_query_and_class` derives the
histogram counts from the written TransferRecords. Display limits (queries, items per
query, clusters) are options; whatever is cut is stated on the page, never hidden.
"""
from __future__ import annotations

import base64
import html
import io
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

from PIL import Image

from index.atomic import atomic_path
from index.contract import TransferRecord

Thumb = Image.Image | bytes | None
"""An image to show: a PIL image, encoded image bytes, or None where it could not be read."""

SECTION_IDS = ("summary", "per-query", "dedup-clusters", "leaks", "histograms")


@dataclass
class RetrievedItem:
    source_id: str            # gallery image id
    crop: int                 # crop index within the source image
    similarity: float
    rank: int                 # rank in the query's neighbour list
    crop_image: Thumb = None
    original_image: Thumb = None
    caption: str = ""         # the gallery image's text, if any


@dataclass
class QueryPanel:
    id: str
    class_name: str
    image: Thumb
    retrieved: list[RetrievedItem] = field(default_factory=list)


@dataclass
class DedupMember:
    id: str                   # gallery image id
    image: Thumb = None
    kept: bool = False


@dataclass
class DedupCluster:
    members: list[DedupMember]


@dataclass
class ReferenceMatch:
    id: str                   # reference (target dataset) image id
    similarity: float
    image: Thumb = None
    verified: bool = False    # the reference the verification score was reached with


@dataclass
class LeakPanel:
    source_id: str            # the flagged gallery image
    image: Thumb
    max_similarity: float
    neighbours: list[ReferenceMatch] = field(default_factory=list)  # nearest references, best first
    crops_removed: int = 0
    unflagged: bool = False   # a review judged it not a leak; its crops were kept
    review_note: str = ""
    verify_score: float | None = None  # verification score (curation.verify); None: not verified
    verify_residual: float | None = None  # its residual in grey levels
    key_similarity: float | None = None   # best pixel key similarity to a reference (curation.pixelkey)
    rejected: bool = False    # above the similarity threshold, but not a copy by verification: kept


@dataclass
class ReportData:
    title: str = "Curated transfer set"
    query_set: str = ""
    requested: int | None = None     # the size N asked for
    retrieved: int = 0
    removed_duplicates: int = 0
    removed_leaks: int = 0
    backfilled: int = 0
    written: int = 0
    unreadable: int = 0
    thresholds: dict[str, float] = field(default_factory=dict)
    encoders: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    queries: list[QueryPanel] = field(default_factory=list)
    dedup_clusters: list[DedupCluster] = field(default_factory=list)
    leaks: list[LeakPanel] = field(default_factory=list)
    per_query_counts: dict[str, int] = field(default_factory=dict)
    per_class_counts: dict[str, int] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None   # curation.calibrate.Calibration.to_dict()
    rejected_total: int = 0   # candidates rejected by verification (the report shows the top ones)


@dataclass(frozen=True)
class ReportLimits:
    max_queries: int = 40
    max_per_query: int = 8
    max_clusters: int = 20
    max_cluster_members: int = 12
    max_neighbours: int = 5
    max_rejected: int = 30    # candidates rejected by verification shown (highest scores first)
    thumb_size: int = 96      # longest side of an embedded thumbnail, and its display size
    jpeg_quality: int = 85


@dataclass(frozen=True)
class ReportStats:
    images: int               # <img> elements written
    unreadable_thumbs: int    # images shown as a placeholder (None or undecodable bytes)
    bytes: int


def write_report(path: str | os.PathLike, data: ReportData, limits: ReportLimits = ReportLimits()) -> ReportStats:
    """Render `data` and write it atomically to `path`."""
    text, stats = render_report(data, limits)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return stats


def count_per_query_and_class(records: Sequence[TransferRecord],
                              query_class: dict[str, str]) -> tuple[dict[str, int], dict[str, int]]:
    """Curated items per query (an item counts for every query that retrieved it) and per class
    (each item once, for the class of its most similar query; ties by query id).

    Every query of `query_class` appears, with 0 if it retrieved nothing; a record naming a query
    missing from `query_class` raises.
    """
    per_query = {q: 0 for q in query_class}
    per_class = {c: 0 for c in dict.fromkeys(query_class.values())}
    for rec in records:
        for hit in rec.queries:
            if hit.query not in query_class:
                raise KeyError(f"record {rec.key} names query {hit.query!r}, which is not in the query set")
            per_query[hit.query] += 1
        if rec.queries:
            best = min(rec.queries, key=lambda h: (-h.similarity, h.query))
            per_class[query_class[best.query]] += 1
    return per_query, per_class


# ---------------------------------------------------------------- rendering


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def thumbnail(im: Image.Image, size: int) -> Image.Image:
    """The RGB image the report embeds for ``im``: transparency on white, longest side at most
    ``size`` (LANCZOS). Applying it twice gives the same pixels as once, so a thumbnail made
    ahead of time (and stored losslessly) renders exactly as the full image would."""
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    im = im.convert("RGB")
    if max(im.size) > size:
        im = im.copy()
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
    return im


def thumbnail_png(im: Image.Image, size: int) -> bytes:
    """``thumbnail(im, size)`` as PNG bytes (lossless, deterministic): what a stage that holds the
    decoded image stores so the report need not read it again."""
    buf = io.BytesIO()
    thumbnail(im, size).save(buf, format="PNG")
    return buf.getvalue()


class _Thumbs:
    """Encodes thumbnails once each (an original image can back several crops) and counts them."""

    def __init__(self, limits: ReportLimits):
        self.limits = limits
        self._cache: dict[int, tuple[Thumb, str | None]] = {}
        self.images = 0
        self.unreadable = 0

    def _encode(self, thumb: Thumb) -> str | None:
        if thumb is None:
            return None
        try:
            im = Image.open(io.BytesIO(thumb)) if isinstance(thumb, (bytes, bytearray)) else thumb
            im.load()
        except Exception:  # undecodable bytes are shown as a placeholder and counted
            return None
        im = thumbnail(im, self.limits.thumb_size)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=self.limits.jpeg_quality)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def img(self, thumb: Thumb, alt: str, cls: str = "t") -> str:
        key = id(thumb)
        if key not in self._cache or self._cache[key][0] is not thumb:
            self._cache[key] = (thumb, self._encode(thumb))
        uri = self._cache[key][1]
        if uri is None:
            self.unreadable += 1
            return f'<div class="{cls} missing" title="{_e(alt)}">unreadable</div>'
        self.images += 1
        return f'<img class="{cls}" src="{uri}" alt="{_e(alt)}">'


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
nav a{margin-right:1em}
table.nums td,table.nums th{padding:.15em .8em;text-align:left}table.nums td.n{text-align:right}
.t{width:__T__px;height:__T__px;object-fit:contain;image-rendering:pixelated;background:#f0f0f0;display:block}
.missing{display:flex;align-items:center;justify-content:center;font-size:11px;color:#a00;border:1px dashed #a00}
.query{display:flex;gap:1em;align-items:flex-start;margin:1em 0;padding:.5em;border:1px solid #ddd}
.qhead{width:__Q__px;flex:none}.qhead .t{outline:3px solid #246}
.grid{display:flex;flex-wrap:wrap;gap:.6em}
.pair{display:flex;flex-direction:column;border:1px solid #eee;padding:3px;font-size:11px;width:__PAIR__px}
.pair .imgs{display:flex;gap:4px}
.cap{color:#555;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.small{font-size:11px;color:#555;word-break:break-all}
.cluster,.leak{margin:1em 0;padding:.5em;border:1px solid #ddd}
.member{width:__Q__px;font-size:11px}.member.kept .t{outline:3px solid #2a2}
.leak.removed{border-left:6px solid #c33}.leak.unflagged{border-left:6px solid #999}
.badge{display:inline-block;padding:0 .4em;border-radius:3px;color:#fff;font-size:12px}
.badge.removed{background:#c33}.badge.unflagged{background:#777}.badge.rejected{background:#486}
.leak.rejected{border-left:6px solid #486}.member.verified .t{outline:3px solid #c33}
.bars td{padding:1px .5em;font-size:12px}.bar{background:#468;height:12px}
.note{color:#865;font-style:italic}
"""


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2>\n{body}\n</section>\n'


def _summary(data: ReportData) -> str:
    rows = [
        ("query set", data.query_set), ("requested size", data.requested),
        ("retrieved", data.retrieved), ("removed as duplicate", data.removed_duplicates),
        ("removed as leak", data.removed_leaks), ("backfilled", data.backfilled),
        ("written", data.written), ("unreadable", data.unreadable),
    ]
    rows += [(f"threshold: {k}", v) for k, v in sorted(data.thresholds.items())]
    rows += [(str(k), v) for k, v in sorted(data.extra.items(), key=lambda kv: str(kv[0]))]
    body = "".join(f'<tr><th>{_e(k)}</th><td class="n">{_e(_fmt(v))}</td></tr>'
                   for k, v in rows if v is not None and v != "")
    enc = "".join(f"<li>{_e(e)}</li>" for e in data.encoders) or "<li>none recorded</li>"
    return (f'<table class="nums">{body}</table>\n<h3>Encoders</h3><ul>{enc}</ul>'
            + (_calibration(data.calibration) if data.calibration else ""))


def _calibration(cal: dict[str, Any]) -> str:
    """The calibrated thresholds, recall per copy kind, and the measured curves (every 0.05)."""
    rows = "".join(f'<tr><td>{_e(k)}</td><td class="n">{r:.3f}</td>'
                   f'<td class="n">{cal["source_in_neighbours"].get(k, 0):.3f}</td></tr>'
                   for k, r in cal["recall"].items())
    head = (f'<h3>Calibration</h3><p class="small">{cal["num_images"]} reference images, one synthetic '
            f'copy per kind each; target recall {cal["recall_target"]} per kind; leak threshold '
            f'{cal["leak_threshold"]:.4g}, dedup threshold {cal["dedup_threshold"]:.4g}, verifier '
            f'{_e(cal["verify"])}: score above {_fmt(cal["verify_threshold"])}, residual at most '
            f'{_fmt(cal.get("verify_max_residual"))} grey levels, {cal["neighbours"]} nearest '
            f'references verified (by embedding, and by pixel key where its similarity is above '
            f'{_fmt(cal.get("pixel_threshold"))}); estimated false-positive rate on each image\'s nearest distinct '
            f'reference {cal["false_positive_rate"]:.3f}</p>'
            f'<table class="nums"><tr><th>copy kind</th><th>recall</th><th>source among verified '
            f'references</th></tr>{rows}</table>')
    cv = cal.get("curves") or {}
    if not cv:
        return head
    pick = [i for i, t in enumerate(cv["grid"]) if abs(round(t * 20) - t * 20) < 1e-6]
    cols = "".join(f"<th>{cv['grid'][i]:.2f}</th>" for i in pick)
    lines = [("copies: " + k, v) for k, v in cv["copies_similarity"].items()]
    lines += [("distinct nearest", cv["distinct_similarity"])]
    lines += [("verify, copies: " + k, v) for k, v in cv["copies_verify"].items()]
    lines += [("verify, distinct nearest", cv["distinct_verify"])]
    lines += [("pixel key, copies: " + k, v) for k, v in cv.get("copies_pixel", {}).items()]
    lines += [("pixel key, distinct nearest", cv["distinct_pixel"])] if "distinct_pixel" in cv else []
    row = lambda n, v, idx: f"<tr><td>{_e(n)}</td>" + "".join(f'<td class="n">{v[i]:.2f}</td>' for i in idx) + "</tr>"  # noqa: E731
    body = "".join(row(n, v, pick) for n, v in lines)
    out = (head + '<p class="small">Fraction of pairs above each threshold (similarity: max cosine '
           f'over encoders; verify: the verification score; pixel key: its similarity)</p><table class="nums"><tr><th></th>{cols}</tr>'
           f"{body}</table>")
    if "residual_grid" in cv:
        rpick = [i for i, t in enumerate(cv["residual_grid"]) if t % 8 == 0]
        rlines = [("copies: " + k, v) for k, v in cv["copies_residual"].items()]
        rlines += [("distinct nearest", cv["distinct_residual"])]
        out += ('<p class="small">Fraction of pairs whose verification residual is at most each limit '
                '(grey levels)</p><table class="nums"><tr><th></th>'
                + "".join(f"<th>{cv['residual_grid'][i]:.0f}</th>" for i in rpick) + "</tr>"
                + "".join(row(n, v, rpick) for n, v in rlines) + "</table>")
    return out


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


def _per_query(data: ReportData, limits: ReportLimits, th: _Thumbs) -> str:
    if not data.queries:
        return "<p>No queries recorded.</p>"
    shown = _spread_by_class(data.queries, limits.max_queries)
    out = []
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


def _dedup(data: ReportData, limits: ReportLimits, th: _Thumbs) -> str:
    if not data.dedup_clusters:
        return "<p>No duplicate clusters.</p>"
    clusters = sorted(data.dedup_clusters, key=lambda c: (-len(c.members), min((m.id for m in c.members), default="")))
    shown = clusters[:limits.max_clusters]
    total_removed = sum(sum(not m.kept for m in c.members) for c in clusters)
    out = [f"<p>{len(clusters)} clusters; {total_removed} duplicate images removed "
           f"(one image kept per cluster, outlined).</p>"]
    if len(shown) < len(clusters):
        out.append(f'<p class="note">Showing the {len(shown)} largest of {len(clusters)} clusters.</p>')
    for c in shown:
        members = sorted(c.members, key=lambda m: (not m.kept, m.id))
        cells = [f'<div class="member{" kept" if m.kept else ""}">{th.img(m.image, m.id)}'
                 f'<div class="small">{"kept: " if m.kept else ""}{_e(m.id)}</div></div>'
                 for m in members[:limits.max_cluster_members]]
        if len(members) > limits.max_cluster_members:
            cells.append(f'<p class="note">+{len(members) - limits.max_cluster_members} more not shown</p>')
        out.append(f'<div class="cluster"><div class="small">{len(members)} images</div>'
                   f'<div class="grid">{"".join(cells)}</div></div>')
    return "\n".join(out)


def _leaks(data: ReportData, limits: ReportLimits, th: _Thumbs) -> str:
    if not data.leaks:
        return "<p>No leaks flagged.</p>"
    n_unflagged = sum(lk.unflagged for lk in data.leaks)
    n_rejected = sum(lk.rejected for lk in data.leaks)
    n_removed = len(data.leaks) - n_unflagged - n_rejected
    out = [f"<p>{n_removed + n_unflagged} gallery images flagged; {n_removed} removed, "
           f"{n_unflagged} un-flagged by review.</p>"]
    if data.rejected_total:
        out.append(f"<p>{data.rejected_total} more were above the similarity threshold but not copies by "
                   f"verification, and kept; the {n_rejected} highest-scoring are shown for audit.</p>")
    order = sorted(data.leaks, key=lambda lk: (lk.rejected, -lk.max_similarity, lk.source_id))
    for lk in order:
        state = "rejected" if lk.rejected else "unflagged" if lk.unflagged else "removed"
        badge = {"rejected": "not a copy by verification: kept", "unflagged": "un-flagged by review: kept",
                 "removed": f"removed as leak ({lk.crops_removed} crops)"}[state]
        note = f'<div class="small">review: {_e(lk.review_note)}</div>' if lk.review_note else ""
        ver = "" if lk.verify_score is None else f", verification score {_fmt(lk.verify_score)}" + (
            "" if lk.verify_residual is None else f", residual {_fmt(lk.verify_residual)}") + (
            "" if lk.key_similarity is None else f", pixel key {_fmt(lk.key_similarity)}")
        refs = [f'<div class="member{" verified" if r.verified else ""}">{th.img(r.image, f"reference {r.id}")}'
                f'<div class="small">sim {r.similarity:.3f}{" (verified pair)" if r.verified else ""}'
                f'<br>{_e(r.id)}</div></div>'
                for r in lk.neighbours[:limits.max_neighbours]]
        out.append(
            f'<div class="leak {state}"><div class="small"><span class="badge {state}">{_e(badge)}</span> '
            f"max similarity {lk.max_similarity:.4f}{ver}</div>{note}"
            f'<div class="grid"><div class="member">{th.img(lk.image, f"flagged {lk.source_id}")}'
            f'<div class="small"><b>gallery</b><br>{_e(lk.source_id)}</div></div>'
            f'{"".join(refs)}</div></div>')
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


def _stats_line(values: Sequence[int]) -> str:
    if not values:
        return ""
    return (f'<p class="small">{len(values)} bars; min {min(values)}, median '
            f"{statistics.median(values):g}, max {max(values)}, total {sum(values)}</p>")


def _histograms(data: ReportData) -> str:
    q = list(data.per_query_counts.items())
    c = list(data.per_class_counts.items())
    return ("<h3>Items per query</h3>" + _stats_line([v for _, v in q]) + _svg_columns(q)
            + "<h3>Items per class</h3>" + _stats_line([v for _, v in c]) + _html_bars(c))


def render_report(data: ReportData, limits: ReportLimits = ReportLimits()) -> tuple[str, ReportStats]:
    """The report as an HTML string, and what it holds."""
    if limits.thumb_size < 8:
        raise ValueError(f"thumb_size must be >= 8, got {limits.thumb_size}")
    th = _Thumbs(limits)
    t = limits.thumb_size
    css = _CSS.replace("__T__", str(t)).replace("__PAIR__", str(2 * t + 4)).replace("__Q__", str(t + 14))
    sections = [
        _section("summary", "Summary", _summary(data)),
        _section("per-query", "Retrievals per query", _per_query(data, limits, th)),
        _section("dedup-clusters", "Duplicate clusters", _dedup(data, limits, th)),
        _section("leaks", "Flagged leaks", _leaks(data, limits, th)),
        _section("histograms", "Histograms", _histograms(data)),
    ]
    nav = "".join(f'<a href="#{sid}">{sid}</a>' for sid in SECTION_IDS)
    text = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(data.title)}</title><style>{css}</style></head>\n<body>"
            f"<h1>{_e(data.title)}</h1><nav>{nav}</nav>\n{''.join(sections)}</body></html>\n")
    return text, ReportStats(images=th.images, unreadable_thumbs=th.unreadable, bytes=len(text.encode("utf-8")))
