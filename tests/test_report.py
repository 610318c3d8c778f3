"""report.html: pictures first, self-contained, escaped, states its cuts, and reads well in a real
headless browser (tests/browser.py)."""
from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from curation.report import SECTION_IDS, render_report, write_report
from curation.report_data import (Aligned, ClassMosaic, DedupCluster, DedupMember, LeakPanel, MosaicItem, QueryPanel,
                                  ReferenceMatch, ReportData, ReportLimits, RetrievedItem, Unreadable,
                                  count_per_query_and_class)
from index.core.contract import QueryHit, TransferRecord

from browser import assert_readable_report, inspect_page

RED = (255, 0, 0)
EVIL = '<script>alert("x")</script>'


def _noise(seed: int, size=(64, 48)) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _calibration() -> dict:
    grid = [round(0.5 + 0.01 * i, 3) for i in range(51)]
    rgrid = [2.0 * i for i in range(33)]
    rise = lambda at: [1.0 if t < at else 0.0 for t in grid]  # noqa: E731
    within = lambda at: [1.0 if r >= at else 0.0 for r in rgrid]  # noqa: E731
    kinds = ["jpeg", "crop"]
    return {"recall_target": 0.99, "verify": "align", "num_images": 40, "leak_threshold": 0.8,
            "dedup_threshold": 0.85, "verify_threshold": 0.9, "verify_max_residual": 10.0,
            "recall": {"jpeg": 1.0, "crop": 0.99}, "false_positive_rate": 0.0, "neighbours": 5,
            "source_in_neighbours": {"jpeg": 1.0, "crop": 0.97}, "pixel_threshold": 0.75, "pixel_neighbours": 5,
            "curves": {"grid": grid, "residual_grid": rgrid,
                       "copies_similarity": {k: rise(0.9) for k in kinds}, "distinct_similarity": rise(0.7),
                       "copies_verify": {k: rise(0.95) for k in kinds}, "distinct_verify": rise(0.6),
                       "copies_pixel": {k: rise(0.85) for k in kinds}, "distinct_pixel": rise(0.65),
                       "copies_residual": {k: within(4) for k in kinds}, "distinct_residual": within(30)}}


def _data() -> ReportData:
    q0_items = [RetrievedItem(f"00000/k{i}", i % 3, 0.9 - 0.01 * i, i, _noise(i), _noise(100 + i, (300, 200)),
                              caption=f"caption {i} & \"quoted\"") for i in range(10)]
    q1_items = [
        RetrievedItem("00001/a", 0, 0.8, 0, Unreadable("truncated"), _noise(200)),   # unreadable crop
        RetrievedItem("00001/b", 1, 0.7, 1, _noise(201), b"not an image"),            # undecodable original
        RetrievedItem("00001/c", 2, 0.6, 2, _noise(202), _png_bytes(_noise(203))),
    ]
    grey = Image.new("L", (28, 28), 90)
    queries = [
        QueryPanel("query/red", "class A", Image.new("RGB", (64, 64), RED), q0_items),
        QueryPanel("query/b", EVIL, grey, q1_items),
        QueryPanel("query/c", "class A", Image.new("RGBA", (20, 20), (0, 0, 255, 128)), []),
    ]
    mosaic = [ClassMosaic("class A", 10, [MosaicItem(f"m{i}", f"00000/k{i}", 0.9, _noise(600 + i)) for i in range(3)]),
              ClassMosaic(EVIL, 3, [MosaicItem(f"n{i}", f"00001/{c}", 0.7, _noise(700 + i))
                                    for i, c in enumerate("abc")])]
    clusters = [
        DedupCluster([DedupMember("00002/x", _noise(300), kept=True), DedupMember("00002/y", _noise(301))]),
        DedupCluster([DedupMember(f"00003/{c}", _noise(310 + i), kept=(c == "b")) for i, c in enumerate("abc")]),
    ]
    leaks = [
        LeakPanel("00004/leak", _noise(400), 0.991,
                  [ReferenceMatch(f"ref/{j}", 0.99 - 0.01 * j, _noise(410 + j), verified=j == 0) for j in range(6)],
                  crops_removed=3, verify_score=0.97, verify_residual=3.5,
                  aligned=Aligned(_noise(420), _noise(421), Image.new("L", (30, 30), 10))),
        LeakPanel("00004/ok", _noise(500), 0.951,
                  [ReferenceMatch(f"ref/{j}", 0.95 - 0.01 * j, _noise(510 + j)) for j in range(5)],
                  unflagged=True, review_note=f"different scene {EVIL}"),
    ]
    return ReportData(
        title="test <report>", query_set="folder:/tmp/x:5shot", requested=100, retrieved=120,
        removed_duplicates=3, removed_leaks=3, backfilled=6, written=100, unreadable=1,
        thresholds={"dedup": 0.99, "leak": 0.95, "verify": 0.9, "max_residual": 10.0},
        encoders=["test-tiny-clip", "ViT-B-32.openai"],
        extra={"seed": 0}, mosaic=mosaic, queries=queries, dedup_clusters=clusters, leaks=leaks,
        per_query_counts={"query/red": 10, "query/b": 3, "query/c": 0},
        per_class_counts={"class A": 10, EVIL: 3}, calibration=_calibration(),
        stages={"filter": {"seconds": 12.5, "status": "computed"}, "write": {"seconds": 0.4, "status": "reused"}},
        time_parts={"verify pairs": 9.0, "embed originals": 2.5},
    )


# mosaic 6 + 3 queries + q0: 8 shown pairs + q1: 3 pairs - 2 placeholders + 5 cluster members
# + leaks: (1 + 5) * 2 + the aligned pair and its difference (3)
EXPECTED_IMAGES = 6 + 3 + 16 + 6 - 2 + 5 + 12 + 3
PLOTS = 5   # calibration: embedding, pixel key, verification score, residual; recall per kind
PLACEHOLDERS = ["unreadable: truncated", "undecodable thumbnail: not_image"]  # the loader's skip reasons


def _assert_self_contained(text: str) -> None:
    lower = text.lower()
    for bad in ("http://", "https://", "url(", "<script", "<link", "<iframe", "@import"):
        assert bad not in lower, bad
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith(("data:image/jpeg;base64,", "data:image/svg+xml;base64,")) for s in srcs)


def test_report_sections_images_and_counts(tmp_path):
    path = tmp_path / "report.html"
    stats = write_report(path, _data())
    text = path.read_text(encoding="utf-8")
    assert stats.images == EXPECTED_IMAGES and stats.unreadable_thumbs == 2
    assert text.count("<img ") == EXPECTED_IMAGES + PLOTS and text.count('<img class="plot"') == PLOTS
    assert [html_unescape(t) for t in re.findall(r'class="t missing"[^>]*>([^<]*)</div>', text)] == PLACEHOLDERS
    assert stats.bytes == len(text.encode("utf-8"))
    for sid in SECTION_IDS:
        assert text.count(f'id="{sid}"') == 1 and text.count(f'href="#{sid}"') == 1
    # pictures first: the class mosaic opens the page, the numbers and timings close it
    order = [text.index(f'<section id="{sid}">') for sid in SECTION_IDS]
    assert order == sorted(order) and SECTION_IDS[0] == "curated" and SECTION_IDS[-2:] == ("summary", "timings")
    assert "class A <span class=\"count\">10 items, 3 shown" in text
    assert "difference ×4" in text and "copies sim 0.990" in text     # the verified reference, aligned
    assert "verification score <b>0.97</b> (copy: &gt; 0.9)" in text and "residual <b>3.5</b> (copy: &lt;= 10)" in text
    assert "verify pairs" in _between(text, "timings") and "12.5 s" in _between(text, "timings")
    _assert_self_contained(text)
    assert "+2 more not shown" in text                      # 10 retrieved, 8 shown
    assert "removed as leak (3 crops)" in text and "un-flagged by review: kept" in text
    assert "ref/5" not in text                              # only the 5 nearest references
    assert "2 cluster(s); 3 duplicate image(s) removed" in text
    assert "3 as duplicates (3 crop(s) of 3 duplicate image(s))" in text   # the first screen counts the same
    for label, value in [("removed as duplicate", "3"), ("backfilled", "6"), ("threshold: leak", "0.95")]:
        assert re.search(rf"<th>{re.escape(label)}</th><td class=\"n\">{value}</td>", text)
    assert "ViT-B-32.openai" in text


def test_report_escapes_text():
    text, _ = render_report(_data())
    assert EVIL not in text
    assert html_escaped(EVIL) in text
    assert "&lt;report&gt;" in text and "caption 0 &amp; &quot;quoted&quot;" in text


def html_escaped(s: str) -> str:
    import html
    return html.escape(s, quote=True)


def html_unescape(s: str) -> str:
    import html
    return html.unescape(s)


def _between(text: str, sid: str) -> str:
    return text[text.index(f'<section id="{sid}">'):].split("</section>", 1)[0]


def test_thumbnails_are_bounded_jpegs():
    text, _ = render_report(_data(), ReportLimits(thumb_size=40))
    for uri in re.findall(r'src="data:image/jpeg;base64,([^"]*)"', text):
        im = Image.open(io.BytesIO(base64.b64decode(uri)))
        assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 40
    assert "width:40px;height:40px" in text


def test_query_limit_spreads_over_classes_and_says_so():
    data = _data()
    data.queries = [QueryPanel(f"q{i}", f"class {i % 4}", _noise(i), []) for i in range(20)]
    text, stats = render_report(data, ReportLimits(max_queries=4))
    assert "Showing 4 of 20 queries" in text
    shown = re.findall(r"<b>(class \d)</b><br>q\d+", text)
    assert sorted(shown) == ["class 0", "class 1", "class 2", "class 3"]


def test_empty_report_still_has_every_section():
    text, stats = render_report(ReportData())
    assert stats.images == 0
    for sid in SECTION_IDS:
        assert f'id="{sid}"' in text
    assert "No leaks flagged." in text and "No duplicate clusters." in text and "No calibration ran" in text


def test_count_per_query_and_class():
    def rec(key, *hits):
        return TransferRecord(key, key, 0, {}, [QueryHit(q, s, 0) for q, s in hits])
    records = [rec("a", ("q1", 0.9)), rec("b", ("q1", 0.5), ("q3", 0.7)), rec("c", ("q2", 0.6), ("q3", 0.6))]
    per_query, per_class = count_per_query_and_class(records, {"q1": "A", "q2": "A", "q3": "B", "q4": "C"})
    # each item once, for its most similar query: a -> q1, b -> q3, c ties q2/q3 -> q2 (class A)
    assert per_query == {"q1": 1, "q2": 1, "q3": 1, "q4": 0}
    assert per_class == {"A": 2, "B": 1, "C": 0}
    assert sum(per_query.values()) == sum(per_class.values()) == len(records)
    with pytest.raises(KeyError, match="q9"):
        count_per_query_and_class([rec("d", ("q9", 0.1))], {"q1": "A"})


def _section(text: str, sid: str) -> str:
    return re.search(rf'<section id="{sid}">(.*?)</section>', text, re.S).group(1)


def test_limits_that_are_off_say_off():
    cal = {**_calibration(), "verify_max_residual": None, "pixel_threshold": None}
    leak = LeakPanel("00004/leak", _noise(400), 0.991, [ReferenceMatch("ref/0", 0.99, _noise(410), verified=True)],
                     crops_removed=1, verify_score=0.97, verify_residual=3.5)
    data = ReportData(thresholds={"dedup": 0.99, "leak": 0.95, "verify": 0.9, "max_residual": None, "key": None},
                      calibration=cal, leaks=[leak])
    text, _ = render_report(data)
    calibration = _section(text, "calibration")
    assert "residual limit <b>off</b>" in calibration and "candidates by pixel key <b>off</b>" in calibration
    assert "score above <b>0.9</b>" in calibration and "None" not in calibration
    assert "residual <b>3.5</b> (limit off)" in _section(text, "leaks")
    for limit, shown in (("max_residual", "off"), ("key", "off"), ("verify", "0.9")):
        assert f'<th>threshold: {limit}</th><td class="n">{shown}</td>' in _section(text, "summary")
    unverified, _ = render_report(ReportData(calibration={**cal, "verify": "none", "verify_threshold": None}))
    assert "verification <b>off</b> (verifier none)" in unverified and "None" not in _section(unverified, "calibration")


def test_summary_line_says_off_for_limits_that_are_off():
    from curation.pipeline import summary_line

    counts = {"written": 5, "requested": 5, "depth_k": 8, "retrieved": 5, "removed_duplicate": 0, "removed_leak": 0,
              "removed_unreadable": 0, "backfilled": 0}

    def line(**th) -> str:
        th = {"dedup": 0.99, "leak": 0.95, "verify": 0.9, "max_residual": 3.5, "key": 0.8, "verifier": "align",
              "source": "given", **th}
        return summary_line({"counts": counts, "strategy": "query_balanced", "thresholds": th}, 1.0)

    assert "dedup 0.99 leak 0.95 verify align 0.9 residual<=3.5 key 0.8, " in line()
    assert "verify align 0.9 residual off key off, " in line(max_residual=None, key=None)
    assert "verify align 0.9 residual<=3.5 key off, " in line(key=1.0)   # --key-threshold 1 turns it off
    assert "dedup 0.99 leak 0.95 verify off, " in line(verify=None, max_residual=None, key=None, verifier="none")
    assert all("None" not in x and "-," not in x for x in (line(max_residual=None), line(verify=None)))


PAIR = [DedupCluster([DedupMember("00002/x", kept=True), DedupMember("00002/y")])]


@pytest.mark.parametrize("removed,crops,clusters,counted,lede,section", [
    (16, 16, [], (None, None), "16 as duplicates (16 further crop(s) of images already in the set)",
     "No duplicate clusters; 16 item(s) removed as duplicates were further crops"),
    (5, 3, PAIR, (None, None), "5 as duplicates (2 crop(s) of 1 duplicate image(s), 3 further crop(s) of images "
     "already in the set)", "1 cluster(s); 1 duplicate image(s) removed"),
    (2, 0, PAIR, (None, None), "2 as duplicates (2 crop(s) of 1 duplicate image(s))",
     "1 cluster(s); 1 duplicate image(s) removed"),
    # more clusters than the report shows: both count them all
    (9, 1, PAIR, (25, 30), "9 as duplicates (8 crop(s) of 30 duplicate image(s), 1 further crop(s)",
     "25 cluster(s); 30 duplicate image(s) removed"),
])
def test_first_screen_counts_duplicates_as_the_duplicates_section(removed, crops, clusters, counted, lede, section):
    text, _ = render_report(ReportData(written=10, removed_duplicates=removed, removed_further_crops=crops,
                                       dedup_clusters=clusters, duplicate_clusters=counted[0],
                                       duplicate_images=counted[1]))
    first = re.search(r'<p class="lede">(.*?)</p>', text).group(1)
    assert lede in first and (crops == 0) == ("further crop" not in first)
    dedup = _section(text, "dedup-clusters")
    assert section in dedup and (f"{crops} item(s) removed as duplicates were further crops" in dedup) == (crops > 0)
    assert ("Showing the 1 largest of 25 clusters" in dedup) == (counted[0] == 25)


def test_items_per_query_add_up_to_the_items_written():
    text, _ = render_report(ReportData(written=60, per_query_counts={"q1": 40, "q2": 20, "q3": 0},
                                       per_class_counts={"A": 60}))
    hist = _section(text, "histograms")
    assert "the 60 items written" in hist and "3 queries; min 0, median 20, max 40, total 60" in hist
    assert "1 classes; min 60, median 60, max 60, total 60" in hist
    text, _ = render_report(ReportData(written=60, per_query_counts={"q1": 50}, per_class_counts={"A": 50},
                                       without_query=12))
    hist = _section(text, "histograms")
    # 50 counted + 12 without a query = 62 selected, 60 written: 2 could not be read
    assert "50 items; 12 more have no query" in hist and "2 of the items counted were not written" in hist


# ---------------------------------------------------------------- real browser


@pytest.mark.slow
def test_report_reads_well_in_headless_chromium(tmp_path):
    path = tmp_path / "report.html"
    write_report(path, _data())
    check = inspect_page(path, tmp_path / "shot.png")
    assert_readable_report(check, min_first_screen=6, placeholders=2)
    assert [t.strip() for t in check.placeholders] == PLACEHOLDERS     # each says why it is not an image
    assert check.images == EXPECTED_IMAGES + PLOTS and check.sections == list(SECTION_IDS)
    assert check.first_screen_thumbnails >= 6          # the class mosaic is on the first screen
    arr = np.asarray(Image.open(check.screenshot).convert("RGB")).astype(int)
    assert arr.std() > 5  # not a blank page


def test_a_stored_png_thumbnail_renders_exactly_like_the_full_image():
    """The write stage stores `thumbnail_png` of the images the report shows; the report must embed
    the same JPEG from it as from the full image (RGBA, palette and large RGB sources alike)."""
    from curation.report_data import Thumbs, thumbnail_png

    limits = ReportLimits()
    rgba = _noise(7, (300, 200)).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 300), dtype=np.uint8)))
    for im in (_noise(5, (500, 120)), rgba, _noise(6, (40, 30)).convert("P"), _noise(8, (60, 50))):
        png = thumbnail_png(im, limits.thumb_size)
        assert max(Image.open(io.BytesIO(png)).size) <= limits.thumb_size
        assert Thumbs(limits)._encode(png) == Thumbs(limits)._encode(im)
        assert thumbnail_png(im, limits.thumb_size) == png   # deterministic bytes


def test_report_items_are_the_panels_the_report_shows():
    """One pure function says which written crops and originals the report shows, so the write stage
    can keep their thumbnails: each query's best ranks in that query (not the curated order), capped."""
    from curation.decontam import Leak, LeakReport
    from curation.run.report_items import report_items
    from curation.run.state import Filtered

    def rec(i: int, hits: list[tuple[str, int]]) -> TransferRecord:
        return TransferRecord(key=f"k{i}", source_id=f"00000/s{i // 2}", crop=i % 2, recipe={},
                              queries=[QueryHit(q, 0.5 + 0.01 * (q == "q1"), r) for q, r in hits], rank=i)

    # q0 retrieves k0..k9, ranked in q0 in reverse curated order; q1 retrieves k3 only
    records = [rec(i, [("q0", 9 - i)] + ([("q1", 0)] if i == 3 else [])) for i in range(10)]
    limits = ReportLimits(max_per_query=3, max_cluster_members=2, max_mosaic_per_class=3)
    classes = {"q0": "A", "q1": "B"}
    filtered = Filtered()
    filtered.link(["00000/gone1", "00000/s0", "00000/gone2"])
    leak = Leak(index=0, image_id="00000/leak", max_similarity=0.99, encoder=0, neighbor_ids=("r",),
                neighbor_similarity=(0.99,))
    lr = LeakReport(threshold=0.9, num_images=1, num_references=1, leaks=(leak,))
    items = report_items(records, lr, filtered, classes, limits)
    assert [(q, [r.key for r in rs]) for q, rs in items.panels] == [("q0", ["k9", "k8", "k7"]), ("q1", ["k3"])]
    # class A holds k0..k9 but k3 (its best query is q1, class B): 9 items, sampled first, middle, last
    assert [(c, n, [r.key for r in rs]) for c, n, rs in items.mosaic] == [("A", 9, ["k0", "k5", "k9"]),
                                                                          ("B", 1, ["k3"])]
    assert items.crop_keys() == {"k9", "k8", "k7", "k3", "k0", "k5"}
    assert items.leak_images == ("00000/leak",)
    # a cluster as the report lays it out: the kept image first, then by id; the shown ones are loaded
    assert items.clusters == ((("00000/s0", True), ("00000/gone1", False), ("00000/gone2", False)),)
    assert items.cluster_images == ("00000/s0", "00000/gone1")
    assert items.original_ids() == {"00000/s4", "00000/s3", "00000/s1", "00000/leak", "00000/gone1", "00000/s0"}
    assert report_items(records, None, Filtered(), classes, limits).original_ids() == {"00000/s4", "00000/s3", "00000/s1"}


def test_spread_takes_first_last_and_even_steps():
    from curation.run.report_items import spread

    assert spread(5, 10) == [0, 1, 2, 3, 4] and spread(9, 3) == [0, 4, 8] and spread(7, 1) == [0]
    for n in range(1, 40):
        for k in range(1, 12):
            got = spread(n, k)
            assert got == sorted(set(got)) and len(got) == min(n, k) and got[0] == 0
            assert k == 1 or got[-1] == n - 1


def _pattern(seed: int, size=(90, 70)) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    f = sum(np.sin(x / rng.uniform(3, 9) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(3, 9)) for _ in range(3))
    return Image.fromarray(np.uint8(127 + 40 * f)).convert("RGB")


def test_aligned_evidence_is_the_pair_verification_compared():
    from curation.report_evidence import aligned_evidence
    from curation.verify import aligned_pair, copy_match

    src = _pattern(1)
    buf = io.BytesIO()
    src.crop((4, 3, 86, 67)).save(buf, format="JPEG", quality=80)
    copy = Image.open(io.BytesIO(buf.getvalue()))
    g, r = aligned_pair(copy, src)
    assert g.shape == r.shape and g.shape[0] > 40          # one size: the crop found inside its source
    assert np.corrcoef(g.ravel(), r.ravel())[0, 1] > 0.95 and copy_match(copy, src).score > 0.95
    a, b, diff = aligned_evidence(copy, src)
    assert a.size == b.size == diff.size and a.mode == b.mode == diff.mode == "L"
    other = aligned_evidence(_pattern(2), src)
    assert other is not None and np.asarray(diff).mean() < np.asarray(other[2]).mean()   # a look-alike differs more
    assert aligned_evidence(Image.new("RGB", (50, 50), (90, 90, 90)), src) is None       # flat: nothing to align
