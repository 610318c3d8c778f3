"""A pixel key: an encoder-independent second way to retrieve copy candidates.

An embedding retrieves look-alikes by what they show; how far a copy's embedding moves from its
source's depends on the encoder (a random-init encoder scatters crops and flips of one image
among its neighbours). Verification (`curation.verify`) only sees the pairs retrieval hands it,
so a copy the embedding does not retrieve is lost whatever verification could do. The pixel key
retrieves the same copies for any encoder, from the pixels the copy family (`curation.copies`)
keeps:

    grey levels, box-reduced to SIDE x SIDE (any aspect), Gaussian low-pass (sigma BLUR pixels),
    zero mean, unit norm (a flat image: the zero vector, similar to nothing)

computed twice: on the whole image, and on the image with its flat border bands trimmed (rows or
columns whose grey levels span at most TRIM_RANGE, peeled from every side in turn, as a letterbox
adds them). ``key(im)`` is the two, concatenated; the similarity of two images is the best of
whole-to-whole and trimmed-to-trimmed, either image mirrored or not: a JPEG, WebP, GIF, resized
or recoloured copy keeps the whole-image key (>= 0.95 on the planted sets), a letterbox keeps the
trimmed one exactly, a flip the mirrored one, and a crop of 85% most of it (0.5..0.9). Measured on
the planted sets (`tests/test_copy_detection.py`), the source is the nearest reference by this
key for every copy but crops (at most the 10th).

``Keys.of(images)`` holds the keys of a reference set and answers ``nearest`` (exact FAISS
inner-product search over the four rows each reference contributes: whole, trimmed, and their
mirrors, each padded with zeros in the other half, so the inner product with a query key is one
of the four similarities), ``similarity`` (all pairs, for calibration) and ``similar_pairs``
(candidate duplicates within one set).
"""
from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

SIDE = 16           # key side in pixels (each of the two halves is SIDE * SIDE)
BLUR = 0.7          # sigma of the low-pass, in key pixels
TRIM_RANGE = 4      # grey-level span of a border row or column that counts as a flat band
DIM = 2 * SIDE * SIDE
KEY_VERSION = 1


def _trimmed(g: np.ndarray) -> np.ndarray:
    """``g`` without its flat border bands (at least 2 x 2 remains)."""
    t, b, l, r = 0, g.shape[0], 0, g.shape[1]

    def flat(a: np.ndarray) -> bool:
        return float(a.max()) - float(a.min()) <= TRIM_RANGE

    peeled = True
    while peeled and b - t > 2 and r - l > 2:
        peeled = False
        if flat(g[t, l:r]):
            t, peeled = t + 1, True
        if b - t > 2 and flat(g[b - 1, l:r]):
            b, peeled = b - 1, True
        if flat(g[t:b, l]):
            l, peeled = l + 1, True
        if r - l > 2 and flat(g[t:b, r - 1]):
            r, peeled = r - 1, True
    return g[t:b, l:r]


def _half(g: np.ndarray) -> np.ndarray:
    t = np.asarray(Image.fromarray(g).resize((SIDE, SIDE), Image.Resampling.BOX), np.float32)
    t = gaussian_filter(t, BLUR)
    t -= t.mean()
    n = float(np.linalg.norm(t))
    return (t / n if n > 1e-3 else np.zeros_like(t)).reshape(-1)


def key(im: Image.Image) -> np.ndarray:
    """[DIM] float32: the whole-image half, then the trimmed half (each unit norm, or zero if flat)."""
    g = np.asarray(im.convert("L"), np.float32)
    return np.concatenate([_half(g), _half(_trimmed(g))]).astype(np.float32)


def keys(images: Sequence[Image.Image]) -> np.ndarray:
    """[n, DIM] float32, one key per image."""
    return np.stack([key(im) for im in images]).astype(np.float32) if len(images) else np.zeros((0, DIM), np.float32)


def _mirrored(k: np.ndarray) -> np.ndarray:
    return k.reshape(len(k), 2, SIDE, SIDE)[..., ::-1].reshape(len(k), DIM)


def _rows(k: np.ndarray) -> np.ndarray:
    """[4n, DIM]: per key, whole / trimmed / mirrored whole / mirrored trimmed, the other half zero."""
    half = SIDE * SIDE
    out = np.zeros((len(k), 4, DIM), np.float32)
    for v, src in enumerate((k, _mirrored(k))):
        out[:, 2 * v, :half] = src[:, :half]
        out[:, 2 * v + 1, half:] = src[:, half:]
    return out.reshape(-1, DIM)


def similarity(a: np.ndarray, b: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """[len(a), len(b)] the key similarity of every pair (best of the four alignments)."""
    out = np.zeros((len(a), len(b)), np.float32)
    for s in range(0, len(b), batch_size):
        part = b[s:s + batch_size]
        out[:, s:s + len(part)] = (a @ _rows(part).T).reshape(len(a), len(part), 4).max(axis=2)
    return out


class Keys:
    """The keys of a reference set, searchable."""

    def __init__(self, k: np.ndarray):
        k = np.asarray(k, np.float32)
        if k.ndim != 2 or k.shape[1] != DIM:
            raise ValueError(f"pixel keys must be [n, {DIM}]; got shape {k.shape}")
        self.keys = k
        self.index = faiss.IndexFlatIP(DIM)
        if len(k):
            self.index.add(_rows(k))

    @classmethod
    def of(cls, images: Sequence[Image.Image]) -> "Keys":
        return cls(keys(images))

    def __len__(self) -> int:
        return len(self.keys)

    def nearest(self, q: np.ndarray, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """(similarity [nq, k], reference row [nq, k]) of the k nearest references, best first;
        -1 rows (similarity -inf) where fewer than k references exist."""
        nq, k = len(q), int(k)
        sims, rows = np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
        if nq == 0 or len(self) == 0 or k < 1:
            return sims, rows
        for a in range(0, nq, batch_size):
            s, i = self.index.search(np.ascontiguousarray(q[a:a + batch_size], np.float32), min(4 * k, 4 * len(self)))
            for r, (si, ii) in enumerate(zip(s, i)):
                ref = ii // 4
                _, first = np.unique(ref, return_index=True)   # each reference's best row
                first = np.sort(first)[:k]
                sims[a + r, :len(first)], rows[a + r, :len(first)] = si[first], ref[first]
        return sims, rows


def similar_pairs(k: np.ndarray, threshold: float, per_image: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of rows of ``k`` whose key similarity exceeds ``threshold``, each among the
    `per_image` nearest of i or of j; two int64 arrays sorted by (i, j)."""
    n = len(k)
    if n < 2 or per_image < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sims, rows = Keys(k).nearest(k, min(n, per_image + 1))
    i = np.repeat(np.arange(n), rows.shape[1])
    j, s = rows.reshape(-1), sims.reshape(-1)
    ok = (j >= 0) & (j != i) & (s > threshold)
    if not ok.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.stack([np.minimum(i[ok], j[ok]), np.maximum(i[ok], j[ok])], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]
