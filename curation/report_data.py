"""What the curation report shows: the plain data a run fills (`ReportData`), and the thumbnails its
images become (`thumbnail`, and `Thumbs`, which encodes each once as a data URI and counts them).

`curation.report` renders it; `curation.report_sections` holds each section's HTML.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

from PIL import Image

from curation import htmlpage
from index.core.contract import TransferRecord
from index.core.images import decode_image, to_rgb


class Unreadable(NamedTuple):
    """An image that could not be read, and why (a reader's skip reason, or an exception's message)."""
    reason: str


Thumb = Image.Image | bytes | Unreadable | None
"""An image to show: a PIL image, encoded image bytes, or why it could not be read (None: not
recorded, shown as "not available")."""

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
    removed_duplicates: int = 0      # items; of them, these were further crops of an image the set keeps:
    removed_further_crops: int = 0   # the others are crops of images removed as duplicates of other images
    duplicate_images: int | None = None    # images removed as duplicates of another (None: count dedup_clusters)
    duplicate_clusters: int | None = None  # clusters of them, all (dedup_clusters holds the largest; None: those)
    removed_leaks: int = 0
    backfilled: int = 0
    written: int = 0
    unreadable: int = 0
    thresholds: dict[str, float | None] = field(default_factory=dict)   # None: the limit is off
    encoders: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    mosaic: list[ClassMosaic] = field(default_factory=list)
    queries: list[QueryPanel] = field(default_factory=list)
    dedup_clusters: list[DedupCluster] = field(default_factory=list)
    leaks: list[LeakPanel] = field(default_factory=list)
    per_query_counts: dict[str, int] = field(default_factory=dict)
    per_class_counts: dict[str, int] = field(default_factory=dict)
    without_query: int = 0    # curated items no query retrieved (random strategy): in neither count
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


def count_per_query_and_class(records: Sequence[TransferRecord],
                              query_class: dict[str, str]) -> tuple[dict[str, int], dict[str, int]]:
    """Curated items per query and per class, each item counted once: for its most similar query (ties
    by query id) and that query's class, so both add up to the items that have a query (all of them but
    under the ``random`` strategy). An item several queries retrieved counts for the nearest only.

    Every query of `query_class` appears, with 0 if no item is nearest to it; a record naming a query
    missing from `query_class` raises.
    """
    per_query = {q: 0 for q in query_class}
    per_class = {c: 0 for c in dict.fromkeys(query_class.values())}
    for rec in records:
        for hit in rec.queries:
            if hit.query not in query_class:
                raise KeyError(f"record {rec.key} names query {hit.query!r}, which is not in the query set")
        best = record_query(rec)
        if best is not None:
            per_query[best] += 1
            per_class[query_class[best]] += 1
    return per_query, per_class


def record_query(rec: TransferRecord) -> str | None:
    """A record's most similar query (ties by query id); None without queries."""
    if not rec.queries:
        return None
    return min(rec.queries, key=lambda h: (-h.similarity, h.query)).query


def record_class(rec: TransferRecord, query_class: dict[str, str]) -> str | None:
    """The class of a record's most similar query (ties by query id); None without queries."""
    best = record_query(rec)
    return None if best is None else query_class[best]


# ---------------------------------------------------------------- thumbnails


def thumbnail(im: Image.Image, size: int) -> Image.Image:
    """The RGB image the report embeds for ``im``: as the image loader gives it (transparency on
    white), longest side at most ``size`` (LANCZOS). Applying it twice gives the same pixels as
    once, so a thumbnail made ahead of time (and stored losslessly) renders exactly as the full
    image would."""
    im = to_rgb(im)
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


class Thumbs:
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
        im, reason = decode_image(bytes(thumb)) if isinstance(thumb, (bytes, bytearray)) else (thumb, None)
        if im is None:  # undecodable bytes are shown as a placeholder and counted
            return f"undecodable thumbnail: {reason}"
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
