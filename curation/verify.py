"""Verification of copy candidates: is image A an edited copy of image B, or only a look-alike?

An embedding says two images show the same kind of thing; it cannot tell a re-encoded copy from
another photo of the same class (with ImageNet EfficientNet-Lite0, copies of Fashion-MNIST images
fall to cosine 0.79 while distinct images of one class reach it). Verification is a second,
independent signal computed on pixels, run only on the candidate pairs the embedding threshold
lets through; it replaces the paper's human inspection for the decision.

The score (`copy_score`) is an alignment search on grayscale images: one image is taken as a
part of the other at its own pixel scale (a crop or a letterboxed copy that was not resized) and
at a grid of scales (crops keeping 85..100% of the area), mirrored and not, and slid over it; the
score is the best zero-normalised cross-correlation (scikit-image ``match_template``), taken both
ways round. Where one image is smaller, the other is reduced to its size first, so a downscaled
copy is compared at the detail it still has. Normalised correlation ignores brightness and
contrast changes, grayscale ignores small saturation changes, and exact-scale alignment makes
crops, letterboxes and flips score 1.0 on Fashion-MNIST. A flat image (grey-level std < 4) cannot
be scored: NaN, and never confirmed.

Chosen by measurement (``bench/copydetect.py``, ``verifiers``): on 200 Fashion-MNIST test images,
first percentile of copy scores per kind against the 99th percentile of each image's nearest
same-class look-alike (by pixels, the hardest case for a pixel verifier):

    alignment NCC  copies: jpeg 0.97, resize 0.94, crop 1.0, colour 1.0, flip 1.0, format 0.99,
                   pad 1.0, resize+jpeg 0.93;   look-alikes 0.98;  ~7-13 ms a pair on one core
    pHash          copies: jpeg 0.75, resize 0.81, crop 0.25, colour 0.88, flip 1.0, format 0.81,
                   pad 0.13, resize+jpeg 0.75;  look-alikes 0.81;  ~0.4 ms a pair

pHash (imagehash) does not separate crops and letterboxes from look-alikes at all; the alignment
score separates every kind but the half-size ones, and even those only overlap with the closest
look-alikes. Local features (ORB + RANSAC, opencv) were not measured: a 28x28 image offers a
handful of keypoints at best, and the alignment search already covers the geometric edits of the
copy family (`curation.copies`). The limit that remains: Fashion-MNIST items of one class (plain
trousers, bags) correlate as strongly as a half-size q40 JPEG copy does with its source, so at
recall 0.99 for every kind some nearest look-alikes pass (the measured false-positive rates are in
tests/test_copy_detection.py and the bench).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage.feature import match_template

WORK = 64                                     # longest side the reference is compared at
SCALES = (1.0, 0.97, 0.94, 0.91, 0.88)        # template side as a fraction of the reference's
TEXTURE = 4.0                                 # grey-level std below which an image is flat
LOW_BLUR = 0.7                                # sigma (pixels) when comparing at a reduced size
INNER = 0.08                                  # margin cut from each side of a resampled template


@dataclass(frozen=True)
class Thumb:
    """A grayscale image kept at most `2 * WORK` pixels a side, for repeated comparisons."""
    pixels: Image.Image            # mode L

    @classmethod
    def of(cls, im: Image.Image, max_side: int = 2 * WORK) -> "Thumb":
        g = im.convert("L")
        if max(g.size) > max_side:
            g.thumbnail((max_side, max_side), Image.Resampling.BOX)
        return cls(g)

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.size


def _resized(g: Image.Image, w: int, h: int) -> np.ndarray:
    if (w, h) == g.size:
        return np.asarray(g, np.float32)
    down = w <= g.size[0] and h <= g.size[1]
    return np.asarray(g.resize((w, h), Image.Resampling.BOX if down else Image.Resampling.BILINEAR),
                      np.float32)


def _template_sizes(a: tuple[int, int], b: tuple[int, int], k: float) -> list[tuple[int, int]]:
    """Sizes at which `b` may appear inside `a` (a resized by k): at b's own pixel scale (a crop
    or a letterboxed copy that was not resized), and as a crop of each fraction in SCALES."""
    (aw, ah), (bw, bh) = (round(a[0] * k), round(a[1] * k)), b
    out = [(round(bw * k), round(bh * k))]
    for s in SCALES:
        # a crop of fractions (fw, fh) of `a` has aspect (fw / fh) * aspect(a)
        fh = min(1.0, s * (aw / ah) / (bw / bh))
        fw = min(1.0, fh * (bw / bh) / (aw / ah))
        out.append((round(fw * aw), round(fh * ah)))
    return [t for t in dict.fromkeys(out) if 4 <= t[0] <= aw and 4 <= t[1] <= ah]


def _one_way(a: Thumb, b: Thumb) -> float:
    """Best NCC of `b`, taken as a part of `a` (each size, mirrored or not), slid over `a`.

    `a` is compared at WORK pixels at most, and never enlarged `b`: where `b` would have to be
    enlarged, `a` is reduced instead, so a downscaled copy is compared at the detail it has.
    """
    k = min(1.0, max(WORK / max(a.size), 8 / min(a.size)))  # thin images keep 8 px across
    aw, ah = round(a.size[0] * k), round(a.size[1] * k)
    best = -1.0
    for tw, th in _template_sizes(a.size, b.size, k):
        up = max(1.0, tw / b.size[0], th / b.size[1])
        rw, rh = round(aw / up), round(ah / up)
        tw, th = min(rw, round(tw / up)), min(rh, round(th / up))
        ref = _resized(a.pixels, rw, rh)
        t = _resized(b.pixels, tw, th)
        if (rw, rh) != a.size or (tw, th) != b.size:
            # resampled: compare what both kernels keep, and not the template's edge pixels,
            # which blend with what lay beyond a crop or band boundary falling between pixels
            if up > 1.05:  # two different downscaling kernels
                ref, t = gaussian_filter(ref, LOW_BLUR), gaussian_filter(t, LOW_BLUR)
            mh, mw = round(INNER * th), round(INNER * tw)
            t = t[mh:th - mh, mw:tw - mw]
        if min(t.shape) < 3 or t.std() < 1e-3 or ref.std() < 1e-3:
            continue
        for tt in (t, t[:, ::-1]):
            best = max(best, float(match_template(ref, np.ascontiguousarray(tt)).max()))
    return best


def copy_score(a: Thumb | Image.Image, b: Thumb | Image.Image) -> float:
    """Zero-normalised cross-correlation after the best alignment, in [-1, 1]; symmetric.

    NaN where either image has no texture to align (a flat image): pixels cannot tell a copy from
    a look-alike there, and `passes` does not confirm it.
    """
    a = a if isinstance(a, Thumb) else Thumb.of(a)
    b = b if isinstance(b, Thumb) else Thumb.of(b)
    if min(np.asarray(a.pixels, np.float32).std(), np.asarray(b.pixels, np.float32).std()) < TEXTURE:
        return float("nan")
    return max(_one_way(a, b), _one_way(b, a))


def passes(score: float, threshold: float) -> bool:
    """A candidate is confirmed as a copy when its score exceeds the threshold (NaN never does)."""
    return bool(score > threshold)


VERIFIERS = ("align", "none")
