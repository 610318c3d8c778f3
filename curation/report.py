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

The pipeline fills a `ReportData` (`curation.report_data`: plain fields; images as PIL images or
encoded bytes, `Unreadable` with its reason where an image could not be read) and calls
`write_report`. A placeholder is drawn only for an image that could not be read, and says why.
Display limits are options; whatever is cut is stated on the page, never hidden. This module
assembles the page; each section's HTML is in `curation.report_sections`.
"""
from __future__ import annotations

import os

from curation import htmlpage, report_sections as rs
from curation.report_calibration import calibration_section
from curation.report_data import ReportData, ReportLimits, ReportStats, Thumbs
from index.core.atomic import atomic_path

SECTIONS = (("curated", "Curated set"), ("per-query", "Retrievals per query"), ("leaks", "Removed: leaks"),
            ("dedup-clusters", "Removed: duplicates"), ("calibration", "Calibration"),
            ("histograms", "Items per query and class"), ("summary", "Numbers"), ("timings", "Timings"))
SECTION_IDS = tuple(sid for sid, _ in SECTIONS)


def write_report(path: str | os.PathLike, data: ReportData, limits: ReportLimits = ReportLimits()) -> ReportStats:
    """Render `data` and write it atomically to `path`."""
    text, stats = render_report(data, limits)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return stats


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
    if limits.thumb_size < 8:
        raise ValueError(f"thumb_size must be >= 8, got {limits.thumb_size}")
    th = Thumbs(limits)
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
