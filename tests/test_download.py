"""img2dataset wrapper against a loopback HTTP server: shards are readable and failures are counted."""
from __future__ import annotations

import functools
import http.server
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index.download import download, input_format_of, summarize
from index.gallery import iter_images, list_shards
from index.skips import SkipCounts

SIZES = {"a.png": (64, 48), "b.jpg": (30, 50), "c.png": (20, 20)}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture()
def server(tmp_path: Path):
    site = tmp_path / "site"
    site.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            buf, format="PNG" if name.endswith("png") else "JPEG")
        (site / name).write_bytes(buf.getvalue())
    (site / "page.html").write_text("<html>not an image</html>")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _urls(base: str) -> list[str]:
    return [f"{base}/{n}" for n in SIZES] + [f"{base}/missing.jpg", f"{base}/page.html"]


def _check_stats(stats: dict, out: Path) -> None:
    assert (stats["count"], stats["successes"], stats["failed_to_download"], stats["failed_to_resize"]) == (5, 3, 1, 1)
    assert stats["shards"] == ["00000"] and stats["incomplete_shards"] == []
    assert stats["status"]["success"] == 3
    assert any("404" in k for k in stats["status"])
    assert summarize(str(out)) == stats


@pytest.mark.slow
def test_download_txt_keeps_original_size(server: str, tmp_path: Path):
    url_list = tmp_path / "urls.txt"
    url_list.write_text("\n".join(_urls(server)) + "\n")
    out = tmp_path / "gallery"
    stats = download(str(url_list), str(out), threads=2)
    _check_stats(stats, out)
    counts = SkipCounts()
    images = [g for s in list_shards(str(out)) for g in iter_images(s, counts)]
    assert counts.total == 0  # failed urls are not written as samples
    assert len(images) == 3
    for g in images:
        name = g.meta["url"].rsplit("/", 1)[1]
        assert g.image.size == SIZES[name]
        assert g.id == f"00000/{g.key}" and g.meta["status"] == "success" and g.caption is None


@pytest.mark.slow
def test_download_table_with_captions_and_max_side(server: str, tmp_path: Path):
    import pandas as pd
    urls = _urls(server)
    url_list = tmp_path / "urls.parquet"
    pd.DataFrame({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}).to_parquet(url_list)
    out = tmp_path / "gallery"
    stats = download(str(url_list), str(out), max_side=32, threads=2)
    _check_stats(stats, out)
    images = [g for s in list_shards(str(out)) for g in iter_images(s)]
    assert len(images) == 3
    for g in images:
        name = g.meta["url"].rsplit("/", 1)[1]
        w, h = SIZES[name]
        scale = min(1.0, 32 / max(w, h))  # shrink only, aspect kept
        assert g.image.size == (round(w * scale), round(h * scale))
        assert g.caption == f"caption {urls.index(g.meta['url'])}"


def test_summarize_flags_shards_without_stats(tmp_path: Path):
    (tmp_path / "00000.tar").write_bytes(b"")
    (tmp_path / "00000_stats.json").write_text(
        '{"count": 4, "successes": 3, "failed_to_download": 1, "failed_to_resize": 0, "status_dict": {"success": 3}}')
    (tmp_path / "00001.tar").write_bytes(b"")  # killed before img2dataset wrote its stats
    s = summarize(str(tmp_path))
    assert (s["count"], s["successes"], s["failed_to_download"]) == (4, 3, 1)
    assert s["shards"] == ["00000", "00001"] and s["incomplete_shards"] == ["00001"]


def test_bad_arguments(tmp_path: Path):
    assert input_format_of("x/urls.csv.gz") == "csv.gz" and input_format_of("u.TXT") == "txt"
    with pytest.raises(ValueError, match=r"valid extensions: \.txt"):
        input_format_of("urls.xlsx")
    with pytest.raises(FileNotFoundError):
        download(str(tmp_path / "none.txt"), str(tmp_path / "out"))
    table = tmp_path / "u.csv"
    table.write_text("link,caption\nhttp://x/a.jpg,a\n")
    with pytest.raises(ValueError, match="has no column 'url'; its columns: link, caption"):
        download(str(table), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="valid choices"):
        download(str(table), str(tmp_path / "out"), input_format="xls")
