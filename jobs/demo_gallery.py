"""Build the embedded demo gallery offline, the way a user builds a real one.

Real images on this machine kind, no internet:
  * in-domain pool: Fashion-MNIST train images outside the query draw (labels hidden from the pipeline);
  * planted leaks: near-copies (re-encoded, resized) of Fashion-MNIST *test* images, for decontamination;
  * out-of-domain: crops of real photos, Tux Paint stamps (with their captions) and scikit-image's
    bundled samples, several times as many as the in-domain pool.

The images are served on a loopback HTTP server and fetched by the img2dataset wrapper from a url list,
producing WebDataset shards under OUT/gallery. OUT/truth.json holds what the pipeline must not see
(domain, class, planted source) keyed by gallery image id, for benchmarks.

    python -m jobs.demo_gallery --out demo-data [--pool 1500] [--leaks 30]
"""
from __future__ import annotations

import argparse
import csv
import functools
import http.server
import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from curation.datasets import load_fashion_mnist
from curation.querysets import get_query_set
from index.core.atomic import write_json
from index.core.images import load_image_file, to_rgb
from index.download import download
from index.gallery import iter_images, list_shards

STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
SKIMAGE_SAMPLES = ("astronaut", "brick", "camera", "cat", "coffee", "coins", "colorwheel", "grass",
                   "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page",
                   "retina", "rocket", "text", "clock", "microaneurysms", "eagle", "chelsea")


@dataclass
class Item:
    name: str              # file name served
    image: Image.Image
    caption: str
    truth: dict


def _stamp_caption(png: Path) -> str:
    txt = png.with_suffix(".txt")
    if txt.is_file():
        first = txt.read_text(errors="replace").splitlines()
        return first[0].strip() if first else ""
    return png.stem.replace("_", " ")


def _random_crops(im: Image.Image, n: int, rng: np.random.Generator, out_range=(64, 160)) -> list[Image.Image]:
    w, h = im.size
    crops = []
    for _ in range(n):
        s = rng.uniform(0.15, 0.7)
        cw, ch = min(w, max(8, int(w * np.sqrt(s)))), min(h, max(8, int(h * np.sqrt(s))))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        side = int(rng.integers(*out_range))
        scale = side / max(cw, ch)
        crops.append(im.crop((x, y, x + cw, y + ch)).resize((max(8, int(cw * scale)), max(8, int(ch * scale)))))
    return crops


def stamp_items(rng: np.random.Generator, crops_per_stamp: int, limit: int | None = None) -> list[Item]:
    if not STAMPS_DIR.is_dir():
        raise FileNotFoundError(f"{STAMPS_DIR} not found; install it with: apt-get install tuxpaint-stamps-default")
    pngs = sorted(STAMPS_DIR.rglob("*.png"))[:limit]
    items = []
    for i, p in enumerate(pngs):
        im = load_image_file(str(p))
        im.thumbnail((256, 256))
        caption = _stamp_caption(p)
        for j, c in enumerate([im] + _random_crops(im, crops_per_stamp - 1, rng)):
            items.append(Item(f"ood_stamp_{i:04d}_{j}.jpg", c, caption,
                              {"domain": "out", "source": str(p.relative_to(STAMPS_DIR))}))
    return items


def skimage_items(rng: np.random.Generator, crops_per_photo: int) -> tuple[list[Item], list[str]]:
    import skimage.data  # lazy: skimage

    items, missing = [], []
    for name in SKIMAGE_SAMPLES:
        try:
            arr = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - a sample that needs a download is not on this machine
            missing.append(name)
            continue
        arr = np.asarray(arr)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        elif arr.dtype != np.uint8:
            arr = arr.astype(np.float64)
            arr = (255 * (arr - arr.min()) / max(1e-9, float(arr.max() - arr.min()))).astype(np.uint8)
        im = to_rgb(Image.fromarray(arr))
        for j, c in enumerate(_random_crops(im, crops_per_photo, rng)):
            items.append(Item(f"ood_skimage_{name}_{j:03d}.jpg", c, f"a photo: {name}",
                              {"domain": "out", "source": f"skimage.data.{name}"}))
    return items, missing


def fashion_items(rng: np.random.Generator, pool: int, leaks: int, query_set: str, seed: int) -> list[Item]:
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    drawn = {int(q.id.rsplit("/", 1)[1]) for q in get_query_set(query_set, seed=seed).queries}
    eligible = np.array([i for i in range(len(train_x)) if i not in drawn])
    chosen = np.sort(rng.choice(eligible, size=min(pool, len(eligible)), replace=False))
    items = [Item(f"fm_train_{i:05d}.png", Image.fromarray(train_x[i]).convert("RGB"), "",
                  {"domain": "in", "label": int(train_y[i]), "source": f"fashion_mnist/train/{i:05d}"})
             for i in chosen]
    for i in np.sort(rng.choice(len(test_x), size=leaks, replace=False)):
        im = Image.fromarray(test_x[i]).convert("RGB")
        side = int(rng.integers(24, 33))
        im = im.resize((side, side), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(60, 95)))
        items.append(Item(f"leak_test_{i:05d}.jpg", Image.open(buf).convert("RGB"), "",
                          {"domain": "leak", "label": int(test_y[i]), "source": f"fashion_mnist/test/{i:05d}"}))
    return items


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the demo's output to progress bars and summaries
        pass


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def build_demo_gallery(out: str | Path, pool: int = 1500, leaks: int = 30, crops_per_stamp: int = 4,
                       crops_per_photo: int = 40, query_set: str = "fashion_mnist_10shot", seed: int = 0,
                       shard_size: int = 1000, stamps: int | None = None) -> dict:

    out = Path(out)
    done = out / "gallery.done.json"
    if done.exists():
        print(f"demo gallery: {out / 'gallery'} already built ({done})")
        return json.loads(done.read_text())
    rng = np.random.default_rng(seed)
    items = fashion_items(rng, pool, leaks, query_set, seed) + stamp_items(rng, crops_per_stamp, limit=stamps)
    sk, missing = skimage_items(rng, crops_per_photo)
    items += sk
    order = rng.permutation(len(items))  # mix domains across shards
    www = out / "www"
    www.mkdir(parents=True, exist_ok=True)
    truth_by_name = {}
    for it in items:
        it.image.save(www / it.name)
        truth_by_name[it.name] = it.truth
    server, base = serve(www)
    try:
        urls = out / "urls.csv"
        with open(urls, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["url", "caption"])
            for k in order:
                w.writerow([f"{base}/{items[k].name}", items[k].caption])
        stats = download(str(urls), str(out / "gallery"), max_side=None, processes=1, threads=16,
                         samples_per_shard=shard_size, input_format="csv",
                         url_col="url", caption_col="caption")
    finally:
        server.shutdown()
    truth = _truth_by_gallery_id(out / "gallery", truth_by_name)
    counts = {d: sum(1 for t in truth.values() if t["domain"] == d) for d in ("in", "out", "leak")}
    write_json(out / "truth.json", truth)
    summary = {"images": len(truth), "by_domain": counts, "skimage_missing": missing,
               "download": stats, "gallery": str(out / "gallery")}
    write_json(done, summary)
    print(f"demo gallery: {len(truth)} images ({counts['in']} in-domain, {counts['out']} out-of-domain, "
          f"{counts['leak']} planted leaks) -> {out / 'gallery'}")
    return summary


def _truth_by_gallery_id(gallery: Path, truth_by_name: dict) -> dict:
    """Map gallery image ids to the hidden truth through the url img2dataset stores per sample."""
    truth = {}
    for shard in list_shards(str(gallery / "*.tar")):
        for img in iter_images(shard):
            truth[img.id] = truth_by_name[img.meta["url"].rsplit("/", 1)[1]]
    return truth


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-data")
    p.add_argument("--pool", type=int, default=1500, help="in-domain Fashion-MNIST train images")
    p.add_argument("--leaks", type=int, default=30, help="planted near-copies of test images")
    p.add_argument("--crops-per-stamp", type=int, default=4)
    p.add_argument("--crops-per-photo", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    build_demo_gallery(a.out, pool=a.pool, leaks=a.leaks, crops_per_stamp=a.crops_per_stamp,
                       crops_per_photo=a.crops_per_photo, seed=a.seed)


if __name__ == "__main__":
    main()
