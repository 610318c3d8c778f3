"""The curated set's ``report.html``: one self-contained page to look at a curation run, pictures first.

Thumbnails are inline base64 JPEG data URIs and the plots inline SVG (`curation.plots`), the CSS is
inline, there is no script and no external resource, so the file can be mailed or opened from an
archive. A table of contents links the sections (stable ids), in this order:

- ``curated``: what the student will learn from: a sample of crops per class, with the counts;
- ``per-query``: each query image beside its retrieved crops and the original gallery images they
  were cut from (as Figures 6 and 9 of Vemulapalli et al. 2024);
- ``leaks``: every removed leak beside the reference it copies, with the verification evidence (the
  aligned pair, what still differs, score and residual against their limits), its other nearest
  references; then the candidates verification rejected (kept);
- ``dedup-clusters``: the largest clusters of duplicate original images, one row each, the kept one
  marked;
- ``calibration``: the calibration curves as plots, the chosen thresholds as lines
  (`curation.report_calibration`);
- ``histograms``: curated items per query and per class;
- ``summary``: the numbers (counts, thresholds, encoders); ``timings``: where the time went.

The pipeline fills a `ReportData` (plain fields; images as PIL images or encoded bytes, `Unreadable`
with its reason where an image could not be read) and calls `write_report`. A placeholder is drawn
only for an image that could not be read, and says why. Display limits are options; whatever is cut
is stated on the page, never hidden.

Why one module: it is the report's data model (ReportData and its panels, the form the run fills)
and the one function that assembles the page from it; each section's HTML is already apart
(`curation.report_sections`). The thumbnail functions live here because the write stage stores
exactly the thumbnail the page would make (`thumbnail_png`), so one definition serves both.
"""
from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

from PIL import Image

from curation import htmlpage
from index.atomic import atomic_path
from index.contract import TransferRecord


class Unreadable(NamedTuple):
    """An image that could not be read, and why (a reader's skip reason, or an exception's message)."""
    reason: str


Thumb = Image.Image | bytes | Unreadable | None
"""An image to show: a PIL image, encoded image bytes, or why it could not be read (None: not
recorded, shown as "not available")."""

SECTIONS = (("curated", "Curated set"), ("per-query", "Retrievals per query"), ("leaks", "Removed: leaks"),
            ("dedup-clusters", "Removed: duplicates"), ("calibration", "Calibration"),
            ("histograms", "Items per query and class"), ("summary", "Numbers"), ("timings", "Timings"))
SECTION_IDS = tuple(sid for sid, _ in SECTIONS)


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
class MosaicItem:
    key: str                  # transfer record key
    source_id: str
    similarity: float
    image: Thumb = None       # the crop


@dataclass
class ClassMosaic:
    class_name: str
    count: int                # curated items of this class (each item once, for its most similar query)
    items: list[MosaicItem] = field(default_factory=list)   # a sample, spread over the class's ranks


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
class Aligned:
    """What verification compared: the two images at their best alignment, and what differs there."""
    gallery: Thumb
    reference: Thumb
    difference: Thumb


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
    aligned: Aligned | None = None   # against the verified reference


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
    mosaic: list[ClassMosaic] = field(default_factory=list)
    queries: list[QueryPanel] = field(default_factory=list)
    dedup_clusters: list[DedupCluster] = field(default_factory=list)
    leaks: list[LeakPanel] = field(default_factory=list)
    per_query_counts: dict[str, int] = field(default_factory=dict)
    per_class_counts: dict[str, int] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None   # curation.calibrate.Calibration.to_dict()
    rejected_total: int = 0   # candidates rejected by verification (the report shows the top ones)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)   # stage -> {"seconds", "status"}
    time_parts: dict[str, float] = field(default_factory=dict)        # finer parts of the stages, seconds


@dataclass(frozen=True)
class ReportLimits:
    max_queries: int = 40
    max_per_query: int = 8
    max_mosaic_per_class: int = 12
    max_clusters: int = 20
    max_cluster_members: int = 12
    max_neighbours: int = 5
    max_rejected: int = 30    # candidates rejected by verification shown (highest scores first)
    thumb_size: int = 96      # longest side of an embedded thumbnail, and its display size
    jpeg_quality: int = 85


@dataclass(frozen=True)
class ReportStats:
    images: int               # <img> elements of thumbnails written (plots not counted)
    unreadable_thumbs: int    # images shown as a placeholder (unreadable, not recorded, undecodable bytes)
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
        best = record_class(rec, query_class)
        if best is not None:
            per_class[best] += 1
    return per_query, per_class


def record_class(rec: TransferRecord, query_class: dict[str, str]) -> str | None:
    """The class of a record's most similar query (ties by query id); None without queries."""
    if not rec.queries:
        return None
    return query_class[min(rec.queries, key=lambda h: (-h.similarity, h.query)).query]


# ---------------------------------------------------------------- thumbnails


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
        self._cache: dict[int, tuple[Thumb, str]] = {}
        self.images = 0
        self.unreadable = 0

    def _encode(self, thumb: Thumb) -> str:
        """A data URI, or the placeholder's text (no "data:" prefix) saying why there is no image."""
        if thumb is None:
            return "not available"
        if isinstance(thumb, Unreadable):
            return f"unreadable: {thumb.reason}"
        try:
            im = Image.open(io.BytesIO(thumb)) if isinstance(thumb, (bytes, bytearray)) else thumb
            im.load()
        except Exception as e:  # undecodable bytes are shown as a placeholder and counted
            return f"undecodable thumbnail: {type(e).__name__}"
        im = thumbnail(im, self.limits.thumb_size)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=self.limits.jpeg_quality)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def img(self, thumb: Thumb, alt: str, cls: str = "t") -> str:
        key = id(thumb)
        if key not in self._cache or self._cache[key][0] is not thumb:
            self._cache[key] = (thumb, self._encode(thumb))
        uri = self._cache[key][1]
        if not uri.startswith("data:"):
            self.unreadable += 1
            return (f'<div class="{cls} missing" title="{htmlpage.escape(alt)}">'
                    f'{htmlpage.escape(uri)}</div>')
        self.images += 1
        return f'<img class="{cls}" src="{uri}" alt="{htmlpage.escape(alt)}" title="{htmlpage.escape(alt)}">'


_CSS = """
.t{width:__T__px;height:__T__px;object-fit:contain;image-rendering:pixelated;background:#f0f0f0;display:block}
.missing{display:flex;align-items:center;justify-content:center;text-align:center;font-size:10px;color:#a00;
 border:1px dashed #a00;box-sizing:border-box;padding:2px;overflow:hidden}
.lede{font-size:15px;margin:.6em 0}
.mosaic{margin:.6em 0}.mosaic h3{margin:.2em 0;font-size:14px}.mosaic .count{color:#555;font-weight:normal}
.tiles{display:flex;flex-wrap:wrap;gap:3px}
.query{display:flex;gap:1em;align-items:flex-start;margin:1em 0;padding:.5em;border:1px solid #ddd}
.qhead{width:__Q__px;flex:none}.qhead .t{outline:3px solid #246}
.grid{display:flex;flex-wrap:wrap;gap:.6em;align-items:flex-start}
.pair{display:flex;flex-direction:column;border:1px solid #eee;padding:3px;font-size:11px;width:__PAIR__px}
.pair .imgs{display:flex;gap:4px}
.cap{color:#555;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.cluster,.leak{margin:1em 0;padding:.5em;border:1px solid #ddd}
.member{width:__Q__px;font-size:11px}.member.kept .t{outline:4px solid #2a2}
.evidence{display:flex;gap:4px;padding:3px;background:#f6f6f6;border-radius:3px}
.evidence .member{width:auto}.evidence .small{text-align:center}
.leak.removed{border-left:6px solid #c33}.leak.unflagged{border-left:6px solid #999}
.badge{display:inline-block;padding:0 .4em;border-radius:3px;color:#fff;font-size:12px}
.badge.removed{background:#c33}.badge.unflagged{background:#777}.badge.rejected{background:#486}
.badge.kept{background:#2a2}
.leak.rejected{border-left:6px solid #486}.member.verified .t{outline:3px solid #c33}
.bars td{padding:1px .5em;font-size:12px}.bar{background:#468;height:12px}
"""


def render_report(data: ReportData, limits: ReportLimits = ReportLimits()) -> tuple[str, ReportStats]:
    """The report as an HTML string, and what it holds."""
    from curation import report_sections as rs
    from curation.report_calibration import calibration_section

    if limits.thumb_size < 8:
        raise ValueError(f"thumb_size must be >= 8, got {limits.thumb_size}")
    th = _Thumbs(limits)
    t = limits.thumb_size
    css = _CSS.replace("__T__", str(t)).replace("__PAIR__", str(2 * t + 4)).replace("__Q__", str(t + 14))
    bodies = {
        "curated": rs.lede(data) + rs.mosaic(data, limits, th),
        "per-query": rs.per_query(data, limits, th),
        "leaks": rs.leaks(data, limits, th),
        "dedup-clusters": rs.dedup(data, limits, th),
        "calibration": calibration_section(data.calibration),
        "histograms": rs.histograms(data),
        "summary": rs.summary(data),
        "timings": rs.timings(data),
    }
    text = htmlpage.page(data.title, [(sid, title, bodies[sid]) for sid, title in SECTIONS], css)
    return text, ReportStats(images=th.images, unreadable_thumbs=th.unreadable, bytes=len(text.encode("utf-8")))
