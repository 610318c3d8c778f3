"""report.html: self-contained, escaped, states its cuts, and renders in a real headless browser."""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation.report import (
    SECTION_IDS, DedupCluster, DedupMember, LeakPanel, QueryPanel, ReferenceMatch, ReportData,
    ReportLimits, RetrievedItem, count_per_query_and_class, render_report, write_report,
)
from index.contract import QueryHit, TransferRecord

RED = (255, 0, 0)
EVIL = '<script>alert("x")</script>'


def _noise(seed: int, size=(64, 48)) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _data() -> ReportData:
    q0_items = [RetrievedItem(f"00000/k{i}", i % 3, 0.9 - 0.01 * i, i, _noise(i), _noise(100 + i, (300, 200)),
                              caption=f"caption {i} & \"quoted\"") for i in range(10)]
    q1_items = [
        RetrievedItem("00001/a", 0, 0.8, 0, None, _noise(200)),                       # unreadable crop
        RetrievedItem("00001/b", 1, 0.7, 1, _noise(201), b"not an image"),            # undecodable original
        RetrievedItem("00001/c", 2, 0.6, 2, _noise(202), _png_bytes(_noise(203))),
    ]
    grey = Image.new("L", (28, 28), 90)
    queries = [
        QueryPanel("query/red", "class A", Image.new("RGB", (64, 64), RED), q0_items),
        QueryPanel("query/b", EVIL, grey, q1_items),
        QueryPanel("query/c", "class A", Image.new("RGBA", (20, 20), (0, 0, 255, 128)), []),
    ]
    clusters = [
        DedupCluster([DedupMember("00002/x", _noise(300), kept=True), DedupMember("00002/y", _noise(301))]),
        DedupCluster([DedupMember(f"00003/{c}", _noise(310 + i), kept=(c == "b")) for i, c in enumerate("abc")]),
    ]
    leaks = [
        LeakPanel("00004/leak", _noise(400), 0.991,
                  [ReferenceMatch(f"ref/{j}", 0.99 - 0.01 * j, _noise(410 + j)) for j in range(6)], crops_removed=3),
        LeakPanel("00004/ok", _noise(500), 0.951,
                  [ReferenceMatch(f"ref/{j}", 0.95 - 0.01 * j, _noise(510 + j)) for j in range(5)],
                  unflagged=True, review_note=f"different scene {EVIL}"),
    ]
    return ReportData(
        title="test <report>", query_set="folder:/tmp/x:5shot", requested=100, retrieved=120,
        removed_duplicates=3, removed_leaks=3, backfilled=6, written=100, unreadable=1,
        thresholds={"dedup": 0.99, "leak": 0.95}, encoders=["test-tiny-clip", "ViT-B-32.openai"],
        extra={"seed": 0}, queries=queries, dedup_clusters=clusters, leaks=leaks,
        per_query_counts={"query/red": 10, "query/b": 3, "query/c": 0},
        per_class_counts={"class A": 10, EVIL: 3},
    )


# 3 queries + q0: 8 shown pairs + q1: 3 pairs - 2 unreadable + 5 cluster members + leaks: (1 + 5) * 2
EXPECTED_IMAGES = 3 + 16 + 6 - 2 + 5 + 12


def _assert_self_contained(text: str) -> None:
    lower = text.lower()
    for bad in ("http://", "https://", "url(", "<script", "<link", "<iframe", "@import"):
        assert bad not in lower, bad
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)


def test_report_sections_images_and_counts(tmp_path):
    path = tmp_path / "report.html"
    stats = write_report(path, _data())
    text = path.read_text(encoding="utf-8")
    assert stats.images == EXPECTED_IMAGES and stats.unreadable_thumbs == 2
    assert text.count("<img ") == EXPECTED_IMAGES and text.count(">unreadable</div>") == 2
    assert stats.bytes == len(text.encode("utf-8"))
    for sid in SECTION_IDS:
        assert text.count(f'id="{sid}"') == 1
    _assert_self_contained(text)
    assert "+2 more not shown" in text                      # 10 retrieved, 8 shown
    assert "removed as leak (3 crops)" in text and "un-flagged by review: kept" in text
    assert "ref/5" not in text                              # only the 5 nearest references
    assert "2 clusters; 3 duplicate images removed" in text
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
    assert "No leaks flagged." in text and "No duplicate clusters." in text


def test_count_per_query_and_class():
    def rec(key, *hits):
        return TransferRecord(key, key, 0, {}, [QueryHit(q, s, 0) for q, s in hits])
    records = [rec("a", ("q1", 0.9)), rec("b", ("q1", 0.5), ("q3", 0.7)), rec("c", ("q2", 0.6), ("q3", 0.6))]
    per_query, per_class = count_per_query_and_class(records, {"q1": "A", "q2": "A", "q3": "B", "q4": "C"})
    assert per_query == {"q1": 2, "q2": 1, "q3": 2, "q4": 0}
    assert per_class == {"A": 2, "B": 1, "C": 0}  # c ties q2/q3 -> q2 (class A)
    with pytest.raises(KeyError, match="q9"):
        count_per_query_and_class([rec("d", ("q9", 0.1))], {"q1": "A"})


# ---------------------------------------------------------------- real browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    assert Path(CHROMIUM).exists() or shutil.which("chromium"), "chromium is missing: apt-get install chromium"
    profile = tmp_path / "profile"
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    path = tmp_path / "report.html"
    write_report(path, _data())
    url = path.resolve().as_uri()

    dom = _chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for sid in SECTION_IDS:
        assert re.search(rf'<section id="{sid}">', dom.stdout), sid
    assert len(re.findall(r"<img ", dom.stdout)) == EXPECTED_IMAGES
    assert "<script>alert" not in dom.stdout

    shot = tmp_path / "shot.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,1600", url)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    arr = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert arr.std() > 5  # not a blank page
    # the solid red query image was decoded from its data URI and painted (shown at 96x96)
    red = (arr[..., 0] > 240) & (arr[..., 1] < 30) & (arr[..., 2] < 30)
    assert 0.8 * 96 * 96 < red.sum() < 1.2 * 96 * 96


def test_a_stored_png_thumbnail_renders_exactly_like_the_full_image():
    """The write stage stores `thumbnail_png` of the images the report shows; the report must embed
    the same JPEG from it as from the full image (RGBA, palette and large RGB sources alike)."""
    from curation.report import _Thumbs, thumbnail_png

    limits = ReportLimits()
    rgba = _noise(7, (300, 200)).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 300), dtype=np.uint8)))
    for im in (_noise(5, (500, 120)), rgba, _noise(6, (40, 30)).convert("P"), _noise(8, (60, 50))):
        png = thumbnail_png(im, limits.thumb_size)
        assert max(Image.open(io.BytesIO(png)).size) <= limits.thumb_size
        assert _Thumbs(limits)._encode(png) == _Thumbs(limits)._encode(im)
        assert thumbnail_png(im, limits.thumb_size) == png   # deterministic bytes


def test_report_items_are_the_panels_the_report_shows():
    """One pure function says which written crops and originals the report shows, so the write stage
    can keep their thumbnails: each query's best ranks in that query (not the curated order), capped."""
    from curation.decontam import Leak, LeakReport
    from curation.run.report_items import report_items
    from curation.run.state import Filtered

    def rec(i: int, hits: list[tuple[str, int]]) -> TransferRecord:
        return TransferRecord(key=f"k{i}", source_id=f"00000/s{i // 2}", crop=i % 2, recipe={},
                              queries=[QueryHit(q, 0.5, r) for q, r in hits], rank=i)

    # q0 retrieves k0..k9, ranked in q0 in reverse curated order; q1 retrieves k3 only
    records = [rec(i, [("q0", 9 - i)] + ([("q1", 0)] if i == 3 else [])) for i in range(10)]
    limits = ReportLimits(max_per_query=3, max_cluster_members=2)
    filtered = Filtered()
    filtered.link(["00000/gone1", "00000/s0", "00000/gone2"])
    leak = Leak(index=0, image_id="00000/leak", max_similarity=0.99, encoder=0, neighbor_ids=("r",),
                neighbor_similarity=(0.99,))
    lr = LeakReport(threshold=0.9, num_images=1, num_references=1, leaks=(leak,))
    items = report_items(records, lr, filtered, limits)
    assert [(q, [r.key for r in rs]) for q, rs in items.panels] == [("q0", ["k9", "k8", "k7"]), ("q1", ["k3"])]
    assert items.crop_keys() == {"k9", "k8", "k7", "k3"}
    assert items.leak_images == ("00000/leak",)
    assert items.clusters == ((("00000/gone1", False), ("00000/gone2", False), ("00000/s0", True)),)
    assert items.cluster_images == ("00000/gone1", "00000/gone2")
    assert items.original_ids() == {"00000/s4", "00000/s3", "00000/s1", "00000/leak", "00000/gone1", "00000/gone2"}
    assert report_items(records, None, Filtered(), limits).original_ids() == {"00000/s4", "00000/s3", "00000/s1"}
