"""Labelled real images on this machine, for measuring copy detection (tests, bench/copydetect.py).

``SAMPLES[name](n, seed) -> (images, labels)``; a label groups distinct images of one class (the
look-alikes a copy detector must not confuse with copies):

    fashion_mnist  Fashion-MNIST test images (28x28 grayscale), label = class
    stamps         Tux Paint stamps (flattened on white, at most 128 px), label = top-level folder
    skimage        disjoint 96 px tiles of scikit-image's bundled photos, label = photo
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from index.core.images import load_image_file

STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cat", "coffee", "coins", "grass", "gravel", "horse",
                  "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket",
                  "text", "clock", "microaneurysms", "eagle", "chelsea", "logo", "colorwheel")


def _pick(n: int, total: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))


def fashion_mnist(n: int, seed: int = 0) -> tuple[list[Image.Image], np.ndarray]:
    from curation.datasets import load_fashion_mnist

    x, y = load_fashion_mnist("test")
    idx = _pick(n, len(x), seed)
    return [Image.fromarray(x[i]).convert("RGB") for i in idx], y[idx].copy()


def stamps(n: int, seed: int = 0) -> tuple[list[Image.Image], np.ndarray]:
    if not STAMPS_DIR.is_dir():
        raise FileNotFoundError(f"{STAMPS_DIR} not found; apt-get install tuxpaint-stamps-default")
    pngs = sorted(STAMPS_DIR.rglob("*.png"))
    idx = _pick(n, len(pngs), seed)
    images, labels = [], []
    for i in idx:
        im = load_image_file(str(pngs[i]))   # the stamps' transparency on white, as every stage reads it
        im.thumbnail((128, 128))
        images.append(im)
        labels.append(pngs[i].relative_to(STAMPS_DIR).parts[0])
    return images, np.array(labels)


def bundled_skimage(name: str) -> np.ndarray | None:
    """scikit-image's sample `name`, or None where it is not bundled (it would need a download)."""
    import skimage.data

    try:
        return np.asarray(getattr(skimage.data, name)())
    except BaseException as e:  # noqa: BLE001 - a sample that needs a download is not here
        # (under pytest, scikit-image reports that as a skip, a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return None


def skimage_tiles(n: int, seed: int = 0, tile: int = 96) -> tuple[list[Image.Image], np.ndarray]:
    images, labels = [], []
    for name in SKIMAGE_PHOTOS:
        arr = bundled_skimage(name)
        if arr is None:
            continue
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        elif arr.dtype != np.uint8:
            arr = (255 * (arr - arr.min()) / max(1e-9, float(arr.max() - arr.min()))).astype(np.uint8)
        im = Image.fromarray(arr).convert("RGB")
        im.thumbnail((384, 384))
        w, h = im.size
        for y in range(0, h - tile + 1, tile):
            for x in range(0, w - tile + 1, tile):
                images.append(im.crop((x, y, x + tile, y + tile)))
                labels.append(name)
    idx = _pick(n, len(images), seed)
    return [images[i] for i in idx], np.array(labels)[idx]


SAMPLES: dict[str, Callable[[int, int], tuple[list[Image.Image], np.ndarray]]] = {
    "fashion_mnist": fashion_mnist, "stamps": stamps, "skimage": skimage_tiles}
