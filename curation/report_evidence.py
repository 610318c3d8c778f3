"""The verification evidence the report shows for a leak: the two images as `curation.verify`
aligned them, and what still differs there.

`copy_match` reports a score and a residual; a person judges faster from the pictures behind them:
the matched part of each image at one size (mirrored, cropped or resized as the search found), and
the absolute difference after both are low-passed as the score is (`verify.BLUR`) and the gallery
side is fitted to the reference in brightness and contrast, shown four times brighter.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from curation.verify import BLUR, aligned_pair

GAIN = 4.0   # the difference image's grey levels are this many times the residual's


def _grey(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def aligned_evidence(gallery: Image.Image, reference: Image.Image) -> tuple[Image.Image, Image.Image, Image.Image] | None:
    """(gallery part, reference part, difference) as grey images of one size, or None where
    verification finds no placement (a flat image, or none the copy family allows)."""
    pair = aligned_pair(gallery, reference)
    if pair is None:
        return None
    g, r = (np.asarray(x, np.float64) for x in pair)
    s = BLUR * max(g.shape)
    gl, rl = gaussian_filter(g, s), gaussian_filter(r, s)
    gc = gl - gl.mean()
    var = float((gc * gc).mean())
    gain = float((gc * (rl - rl.mean())).mean()) / var if var > 1e-9 else 0.0
    diff = np.abs(gain * gc + rl.mean() - rl)
    return _grey(g), _grey(r), _grey(GAIN * diff)
