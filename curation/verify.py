"""Verification of copy candidates: is image A an edited copy of image B, or only a look-alike?

An embedding says two images show the same kind of thing; it cannot tell a re-encoded copy from
another photo of the same class (with ImageNet EfficientNet-Lite0, copies of Fashion-MNIST images
fall to cosine 0.79 while distinct images of one class reach it). Verification is a second,
independent signal computed on pixels, run only on the candidate pairs the embedding threshold
lets through; it replaces the paper's human inspection for the decision.

`copy_match` aligns the two grayscale images and measures how well they agree there. The
alignment search takes one image as a part of the other at its own pixel scale (a crop, or a
letterboxed copy that was not resized), as the whole of it resized to its exact size (a
thumbnail; the reference is reduced with each of the box, bilinear, bicubic and Lanczos kernels
and the best kept, so a resized copy is compared at the detail it still has, with the kernel
that made it), and as a crop of 88..100% of it at that scale, mirrored and not, slid over it
(OpenCV ``matchTemplate``), both ways round. The placement is the one where the raw pixels
correlate best; there, both aligned images are low-passed (a Gaussian of sigma = 1/48 of the
compared side, 2 px at 96 px) and two numbers are reported:

    score     zero-normalised cross-correlation, in [-1, 1]: the structure agrees;
    residual  the RMS grey-level difference left after the best brightness/contrast fit
              (sigma * sqrt(1 - score**2)): how large the disagreement is, in absolute terms.

The low-pass keeps what every edit of the copy family keeps and drops what they destroy: JPEG,
WebP, GIF quantisation and resampling remove fine detail (sensor noise, grain), so a JPEG copy of
a grass tile correlates 0.83 with its source on raw pixels and 0.98 after the low-pass, while two
distinct images differ in their coarse structure, which the low-pass keeps.

A copy needs both (`VerifyRule`): correlation alone rates a JPEG copy of a low-contrast image
below two distinct high-contrast silhouettes of one class; the residual alone would confirm any
two low-texture images. Calibration (`curation.calibrate`) sets both limits for the data at hand.
A flat image (grey-level std < 1) cannot be scored: NaN, and never confirmed. A placement that
covers less than MIN_COVER of the other image is a copy only where the rest of it is flat (the
bands of a letterbox): the family's crops keep 85% of the area, so a glyph inside a larger glyph
(an 'N' inside an 'Ñ' stamp) or an object inside a scene is not a copy of it.

Chosen by measurement (the planted-copy tests, ``tests/test_copy_detection.py``: limits calibrated
on one half of each pool, measured on the other; ``bench/copydetect.py`` reports the same). Against
each held-out image's nearest distinct images of its class, raw-pixel correlation and residual
confirmed 0 / 2 / 4 of 100 / 60 / 60 Fashion-MNIST / Tux Paint stamp / scikit-image tile images as
copies of a look-alike; after the low-pass and the cover check, 0 / 0 / 0, and every held-out copy
that reached verification was confirmed. pHash (imagehash) does not separate crops and letterboxes
from look-alikes at all (first percentile of crop copies 0.25 against look-alikes' 99th
percentile 0.81 on Fashion-MNIST). Local features (ORB + RANSAC, opencv) were not used: a 28x28
image offers a handful of keypoints at best, and the alignment search covers the geometric edits
of the copy family (`curation.copies`) exactly. A pair costs ~2 ms at 28 px and ~5-6 ms at
96-128 px on one core; `curation.verify_batch.match_pairs` gives the same matches for many pairs at
once (slides grouped by thumbnail sizes, each thumbnail's variants made once).

Why one module: the placement search (the slides, in their order), the cover check and the
low-pass score are one decision, `copy_match`, and `curation.verify_batch` reproduces it step by
step; about 50 of its lines are this docstring's account of what was measured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import cv2
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

WORK = 160                                    # longest side compared; thumbnails are kept this size
SCALES = (1.0, 0.97, 0.94, 0.91, 0.88)        # template side as a fraction of the reference's
TEXTURE = 1.0                                 # grey-level std below which an image is flat
MIN_COVER = 0.8                               # least area a crop copy keeps (the family: 85%)
GUARD = 2                                     # pixels around a placement not counted as its remainder
LOW_BLUR = 0.7                                # sigma (pixels) when aligning at a reduced size
BLUR = 1 / 48                                 # sigma of the low-pass the match is measured on, per side
INNER = 0.08                                  # margin cut from each side of a resampled template
ASPECT = 0.05                                 # aspect difference a whole-image resize may show
KERNELS = (Image.Resampling.BOX, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC,
           Image.Resampling.LANCZOS)          # how a thumbnailer may have reduced the source


class Match(NamedTuple):
    """The agreement of two images at their best alignment (NaN, NaN: not scorable)."""
    score: float       # zero-normalised cross-correlation
    residual: float    # RMS grey-level difference after the best brightness/contrast fit


NO_MATCH = Match(float("nan"), float("nan"))


@dataclass(frozen=True)
class VerifyRule:
    """Confirms a candidate as a copy when score > min_score and residual <= max_residual."""
    min_score: float
    max_residual: float = math.inf

    @classmethod
    def of(cls, min_score: float, max_residual: float | None) -> "VerifyRule":
        """From stored limits, where a residual limit of None means none (inf)."""
        return cls(float(min_score), math.inf if max_residual is None else float(max_residual))

    def accepts(self, score, residual):
        """Elementwise over arrays (or scalars) of scores and residuals; NaN never passes."""
        return (np.asarray(score) > self.min_score) & (np.asarray(residual) <= self.max_residual)

    def passes(self, m: Match) -> bool:
        return bool(self.accepts(m.score, m.residual))

    def to_dict(self) -> dict[str, Any]:
        return {"min_score": self.min_score,
                "max_residual": None if math.isinf(self.max_residual) else self.max_residual}


@dataclass(frozen=True)
class Thumb:
    """A grayscale image kept at most `WORK` pixels a side, for repeated comparisons."""
    pixels: Image.Image            # mode L

    @classmethod
    def of(cls, im: Image.Image, max_side: int = WORK) -> "Thumb":
        g = im.convert("L")
        if max(g.size) > max_side:
            g.thumbnail((max_side, max_side), Image.Resampling.BOX)
        return cls(g)

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.size

    @cached_property
    def flat(self) -> bool:   # a thumbnail is compared with many others: computed once
        return float(np.asarray(self.pixels, np.float32).std()) < TEXTURE


def _resized(g: Image.Image, w: int, h: int, kernel=None) -> np.ndarray:
    if (w, h) == g.size:
        return np.asarray(g, np.float32)
    down = w <= g.size[0] and h <= g.size[1]
    if kernel is None:
        kernel = Image.Resampling.BOX if down else Image.Resampling.BILINEAR
    return np.asarray(g.resize((w, h), kernel), np.float32)


class _Placement(NamedTuple):
    fit: float       # correlation of the raw pixels there: what the alignment search maximises
    match: Match     # what is reported there (after the BLUR low-pass)
    pair: tuple[np.ndarray, np.ndarray] | None = None   # (reference window, template) compared there


_NONE = _Placement(-math.inf, NO_MATCH)


def _agreement(p: np.ndarray, q: np.ndarray) -> Match:
    """Correlation and residual (after the best brightness/contrast fit) of two aligned arrays."""
    p, q = p - p.mean(), q - q.mean()
    sp, sq = math.sqrt(float((p * p).mean())), math.sqrt(float((q * q).mean()))
    if sp < 1e-3 or sq < 1e-3:
        return NO_MATCH
    v = float((p * q).mean()) / (sp * sq)
    return Match(v, math.sqrt(sp * sq) * math.sqrt(max(0.0, 1.0 - v * v)))


def _rest_is_flat(ref: np.ndarray, y0: int, x0: int, y1: int, x1: int) -> bool:
    """Whether `ref` outside the box [y0:y1, x0:x1] (widened by GUARD) is flat: letterbox bands."""
    keep = np.ones(ref.shape, bool)
    keep[max(0, y0 - GUARD):y1 + GUARD, max(0, x0 - GUARD):x1 + GUARD] = False
    return not keep.any() or float(ref[keep].std()) < TEXTURE


def _best(ref: np.ndarray, t: np.ndarray, best: _Placement, margin: tuple[int, int] = (0, 0)) -> _Placement:
    """`best`, or the best placement of `t` (mirrored or not) inside `ref` where that fits better.

    ``margin``: the rows and columns cut from each side of `t` (it stands for a box that much
    larger). A box covering less than MIN_COVER of `ref` is a copy only as a letterbox, where the
    rest of `ref` is flat bands; otherwise it is a part of `ref` (a glyph of a word, an object in
    a scene), which no edit of the copy family produces.
    """
    if min(t.shape) < 3 or t.std() < 1e-3 or ref.std() < 1e-3:
        return best
    (mh, mw), (th, tw) = margin, t.shape
    partial = (th + 2 * mh) * (tw + 2 * mw) < MIN_COVER * ref.size
    for tt in (t, t[:, ::-1]):
        tt = np.ascontiguousarray(tt)
        r = cv2.matchTemplate(ref, tt, cv2.TM_CCOEFF_NORMED)   # flat windows score 0
        y, x = np.unravel_index(int(r.argmax()), r.shape)
        if not float(r[y, x]) > best.fit:
            continue
        if partial and not _rest_is_flat(ref, y - mh, x - mw, y + th + mh, x + tw + mw):
            continue
        p = ref[y:y + th, x:x + tw].astype(np.float64)
        q = tt.astype(np.float64)
        fit = _agreement(p, q).score                        # exactly, in float64
        if fit > best.fit:
            s = BLUR * max(q.shape)
            best = _Placement(fit, _agreement(gaussian_filter(p, s), gaussian_filter(q, s)), (p, q))
    return best


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


class Slide(NamedTuple):
    """One template slide of the alignment search: `ref` is the other image resized to (rw, rh),
    the template this image resized to (tw, th), both low-passed by LOW_BLUR where `blur`, the
    template cut by (mh, mw) from each side; `kernel` None: BOX down, BILINEAR up."""
    rw: int
    rh: int
    tw: int
    th: int
    blur: bool
    mh: int
    mw: int
    kernel: Any = None


def one_way_slides(a: tuple[int, int], b: tuple[int, int]) -> list[Slide]:
    """The slides of `_one_way(a, b)` for images of sizes a and b, in the order they are tried."""
    k = min(1.0, max(WORK / max(a), 8 / min(a)))  # thin images keep 8 px across
    aw, ah = round(a[0] * k), round(a[1] * k)
    out = []
    for tw, th in _template_sizes(a, b, k):
        up = max(1.0, tw / b[0], th / b[1])
        rw, rh = round(aw / up), round(ah / up)
        tw, th = min(rw, round(tw / up)), min(rh, round(th / up))
        if (rw, rh) != a or (tw, th) != b:
            # resampled: compare what both kernels keep, and not the template's edge pixels,
            # which blend with what lay beyond a crop or band boundary falling between pixels
            out.append(Slide(rw, rh, tw, th, up > 1.05, round(INNER * th), round(INNER * tw)))  # > 1.05: two kernels
        else:
            out.append(Slide(rw, rh, tw, th, False, 0, 0))
    return out


def whole_slides(a: tuple[int, int], b: tuple[int, int]) -> list[Slide]:
    """The slides of `_whole_resized(a, b)`: `a` reduced to b's exact size by each kernel."""
    (aw, ah), (bw, bh) = a, b
    if (bw, bh) == (aw, ah) or bw > aw or bh > ah or abs(math.log((aw / ah) / (bw / bh))) > ASPECT:
        return []
    return [Slide(bw, bh, bw, bh, False, 0, 0, kernel) for kernel in KERNELS]


def _slide_arrays(a: Thumb, b: Thumb, sl: Slide) -> tuple[np.ndarray, np.ndarray]:
    """(ref, template) float32 arrays of one slide: `a` resized, `b` resized and cut."""
    ref = _resized(a.pixels, sl.rw, sl.rh, sl.kernel)
    t = _resized(b.pixels, sl.tw, sl.th)
    if sl.blur:
        ref, t = gaussian_filter(ref, LOW_BLUR), gaussian_filter(t, LOW_BLUR)
    return ref, t[sl.mh:sl.th - sl.mh, sl.mw:sl.tw - sl.mw]


def _one_way(a: Thumb, b: Thumb) -> _Placement:
    """Best match of `b`, taken as a part of `a` (each size, mirrored or not), slid over `a`.

    `a` is compared at WORK pixels at most, and never enlarged `b`: where `b` would have to be
    enlarged, `a` is reduced instead, so a downscaled copy is compared at the detail it has.
    """
    best = _NONE
    for sl in one_way_slides(a.size, b.size):
        ref, t = _slide_arrays(a, b, sl)
        best = _best(ref, t, best, (sl.mh, sl.mw))
    return best


def _whole_resized(a: Thumb, b: Thumb) -> _Placement:
    """`b` as the whole of `a` reduced to b's exact size, by whichever kernel matches best."""
    best = _NONE
    for sl in whole_slides(a.size, b.size):
        best = _best(*_slide_arrays(a, b, sl), best)
    return best


def _winner(a: Thumb, b: Thumb) -> tuple[_Placement, bool]:
    """The best placement of the four searches, and whether `a` is its template (else its reference)."""
    found = ((_one_way(a, b), False), (_one_way(b, a), True), (_whole_resized(a, b), False),
             (_whole_resized(b, a), True))
    return max(found, key=lambda f: f[0].fit)


def aligned_pair(a: Thumb | Image.Image, b: Thumb | Image.Image) -> tuple[np.ndarray, np.ndarray] | None:
    """The two grey-level arrays `copy_match` compares at its winning placement, in (a, b) order and
    at one size (the part of one image matched, the other resized and mirrored as found), or None
    where it finds none: the evidence behind a score, for a person to look at."""
    a = a if isinstance(a, Thumb) else Thumb.of(a)
    b = b if isinstance(b, Thumb) else Thumb.of(b)
    if a.flat or b.flat:
        return None
    best, a_is_template = _winner(a, b)
    if best.pair is None:
        return None
    ref, template = best.pair
    return (template, ref) if a_is_template else (ref, template)


def copy_match(a: Thumb | Image.Image, b: Thumb | Image.Image) -> Match:
    """The best alignment of the two images, either way round; symmetric.

    NO_MATCH (NaN) where either image has no texture to align (a flat image): pixels cannot tell
    a copy from a look-alike there, and no `VerifyRule` confirms it; likewise where no placement
    the copy family allows exists (one image a small part of the other, the rest not flat).
    """
    a = a if isinstance(a, Thumb) else Thumb.of(a)
    b = b if isinstance(b, Thumb) else Thumb.of(b)
    if a.flat or b.flat:
        return NO_MATCH
    return _winner(a, b)[0].match


VERIFIERS = ("align", "none")
