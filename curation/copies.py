"""Synthetic near-copies: the edits a web crawl applies to an image it re-publishes.

``COPY_KINDS[kind](image, rng) -> image`` is a pure function of the PIL image and the numpy
generator (same inputs, same output). Calibration (`curation.calibrate`), the tests and
``bench/copydetect.py`` all draw copies from this one family:

    jpeg        re-encode as JPEG at quality 40..95
    resize      scale both sides by 0.5..1.0 (bilinear, bicubic or Lanczos)
    crop        keep 85..100% of the area, aspect within +-5%, at a random position
    colour      brightness x0.9..1.1, contrast x0.85..1.15, saturation x0.8..1.2
    flip        horizontal mirror
    format      re-save as lossy WebP (quality 50..90) or as a 256-colour GIF
    pad         letterbox: bands of 5..20% of the side on two opposite sides, black, white or grey
    resize_jpeg a downscale (0.5..1.0) then a JPEG re-encode (40..95): the usual thumbnailer
    img2dataset what img2dataset stores (its own resizer): border, keep_ratio, center_crop or
                keep_ratio_largest at 128, 256 or 384 px, upscaling or not, JPEG 80..95; for an
                oblong image (shorter side < 85% of the longer) keep_ratio(_largest) only

A target image that another producer renders differently (EXIF orientation ignored, alpha dropped,
an oblong image cut or padded to a square) is matched through its other renderings, held as
references of their own (curation.querysets), not through a copy kind.

Every output is RGB. Ranges are the documented family; they are what calibrated thresholds are
calibrated for, so a wider family (heavier crops, rotations, overlays) needs its own kinds here.
"""
from __future__ import annotations

import io
import os
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from index.core.images import load_image_bytes, oblong, to_rgb

CopyFn = Callable[[Image.Image, np.random.Generator], Image.Image]

_RESAMPLE = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)


def _rgb(im: Image.Image) -> Image.Image:
    """The image as the loader gives it, without the source's metadata (a palette image's
    transparency entry would otherwise follow it into a GIF)."""
    return Image.fromarray(np.asarray(to_rgb(im)), "RGB")


def _encode(im: Image.Image, fmt: str, **kw) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return load_image_bytes(buf.getvalue(), f"a {fmt} copy")


def jpeg(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    return _encode(_rgb(im), "JPEG", quality=int(rng.integers(40, 96)))


def resize(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    s = float(rng.uniform(0.5, 1.0))
    w, h = im.size
    return _rgb(im).resize((max(1, round(w * s)), max(1, round(h * s))),
                           _RESAMPLE[int(rng.integers(len(_RESAMPLE)))])


def crop(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    area = float(rng.uniform(0.85, 1.0))
    aspect = float(np.exp(rng.uniform(np.log(0.95), np.log(1.05))))
    w, h = im.size
    cw = min(w, max(1, round(w * np.sqrt(area * aspect))))
    ch = min(h, max(1, round(h * np.sqrt(area / aspect))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return _rgb(im).crop((x, y, x + cw, y + ch))


def colour(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    out = _rgb(im)
    for enhancer, lo, hi in ((ImageEnhance.Brightness, 0.9, 1.1), (ImageEnhance.Contrast, 0.85, 1.15),
                             (ImageEnhance.Color, 0.8, 1.2)):
        out = enhancer(out).enhance(float(rng.uniform(lo, hi)))
    return out


def flip(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.mirror(_rgb(im))


def format_change(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    if rng.random() < 0.5:
        return _encode(_rgb(im), "WEBP", quality=int(rng.integers(50, 91)))
    return _encode(_rgb(im).quantize(256), "GIF")


def pad(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = im.size
    fill = [(0, 0, 0), (255, 255, 255), (128, 128, 128)][int(rng.integers(3))]
    if rng.random() < 0.5:   # bands above and below
        band = max(1, round(h * rng.uniform(0.05, 0.2)))
        border = (0, band, 0, band)
    else:                    # bands left and right
        band = max(1, round(w * rng.uniform(0.05, 0.2)))
        border = (band, 0, band, 0)
    return ImageOps.expand(_rgb(im), border=border, fill=fill)


def resize_jpeg(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    return jpeg(resize(im, rng), rng)


I2D_MODES = ("border", "keep_ratio", "center_crop", "keep_ratio_largest")
I2D_SIZES = (128, 256, 384)


def img2dataset(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What img2dataset stores for a downloaded image: its own resizer (OpenCV), one of its resize
    modes at a common size, upscaling or not, JPEG at quality 80..95."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would ask PyPI on import
    from img2dataset.resizer import Resizer  # lazy: img2dataset

    buf = io.BytesIO()
    _rgb(im).save(buf, format="PNG")
    mode = str(rng.choice(I2D_MODES))
    if oblong(im.size) and mode in ("border", "center_crop"):
        # beyond the family's crops and pads; the target's centre-square and white-square
        # renderings are references of their own (index.core.images.RENDERINGS)
        mode = "keep_ratio_largest" if mode == "border" else "keep_ratio"
    resizer = Resizer(image_size=int(rng.choice(I2D_SIZES)), resize_mode=mode,
                      resize_only_if_bigger=bool(rng.random() < 0.5), encode_quality=int(rng.integers(80, 96)))
    data, *_, err = resizer(buf)
    if data is None:
        raise ValueError(f"img2dataset's resizer refused a copy: {err}")
    return load_image_bytes(data, "an img2dataset copy")


COPY_KINDS: dict[str, CopyFn] = {
    "jpeg": jpeg, "resize": resize, "crop": crop, "colour": colour, "flip": flip,
    "format": format_change, "pad": pad, "resize_jpeg": resize_jpeg, "img2dataset": img2dataset,
}


def make_copy(im: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """One near-copy of `im` of the given kind; unknown kinds raise with the valid names."""
    if kind not in COPY_KINDS:
        raise ValueError(f"unknown copy kind {kind!r}; valid: {', '.join(COPY_KINDS)}")
    return COPY_KINDS[kind](im, rng)


def copy_rng(seed: int, image_index: int, kind: str) -> np.random.Generator:
    """The generator for one (image, kind) copy: independent of the order copies are made in."""
    return np.random.default_rng([seed, image_index, list(COPY_KINDS).index(kind)])
