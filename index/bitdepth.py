"""Images of any bit depth to 8-bit RGB, scaled, not clipped.

PIL's ``convert("RGB")`` clips 16-bit greyscale (modes ``I;16``, ``I;16B``, ...) and 32-bit
(``I``, ``F``) images at 255, so a full-range 16-bit gradient becomes almost all white. `to_rgb8`
maps them linearly onto 0..255 instead:

    I;16, I;16L, I;16B, I;16N   value / 257 (65535 -> 255), rounded
    I, F                        by the smallest nominal range holding every value: [0, 1] (F only),
                                [0, 255], [0, 65535]; anything else (negative values, larger ones) is
                                stretched from its min to its max. NaN and infinities become 0.

Every other mode goes through ``convert("RGB")`` (PIL already reads 16-bit RGB(A) and grey+alpha
PNGs as 8 bits per channel, by the high byte). Alpha is dropped, as before.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
WIDE = frozenset({"I", "F"})


def _scaled(values: np.ndarray, is_float: bool) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(a)
    a = np.where(finite, a, 0.0)
    lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 0.0)
    if lo >= 0 and hi <= 1 and is_float:
        out = a * 255
    elif lo >= 0 and hi <= 255:
        out = a
    elif lo >= 0 and hi <= 65535:
        out = a / 257
    else:
        out = (a - lo) * (255 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_rgb8(im: Image.Image) -> Image.Image:
    """An RGB image with 8 bits per channel (see the module docstring for the scaling)."""
    if im.mode in SIXTEEN_BIT:
        a = np.asarray(im).astype(np.uint32)
        grey = ((a + 128) // 257).astype(np.uint8)
    elif im.mode in WIDE:
        grey = _scaled(np.asarray(im), im.mode == "F")
    else:
        return im.convert("RGB")
    return Image.fromarray(grey, "L").convert("RGB")
