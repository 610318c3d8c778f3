"""Task similarity of a source representation to a labelled probe set, and the source weights it gives.

Pure numpy/scipy functions of (features [N, D], labels [N]) -> float; higher means more similar.

- `parc`  Bolya et al. 2021, as used by Borup et al. 2023 (sec. 4.1): features reduced to `dim`
          principal components (PCA, 32 by default as in the PARC reference implementation) and
          standardised per component; two distance matrices 1 - Pearson correlation between every
          pair of examples, one of the features and one of the one-hot labels; PARC is the Spearman
          correlation of their lower triangles (reported in [-1, 1], not scaled by 100).
- `rsa`   representational similarity analysis (Dwivedi & Roig 2019): the same comparison of
          Pearson-distance matrices, on the raw features (no PCA, no standardisation).
- `cka`   linear CKA (Kornblith et al. 2019) between the features and the one-hot labels:
          ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc.

`similarity_weights(s, p)` is Borup et al.'s eq. (5): w = softmax(p * s). p = 0 gives equal weights
(DistillEqual); p -> infinity puts all weight on the most similar source (DistillNearest); p = inf
gives that limit exactly (ties share it equally).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy.stats import spearmanr

from index.core.registry import Registry

PARC_DIM = 32


def one_hot(labels: Sequence[int] | np.ndarray, num_classes: int | None = None) -> np.ndarray:
    y = np.asarray(labels, dtype=np.int64)
    if y.ndim != 1:
        raise ValueError(f"labels must be a vector, got shape {y.shape}")
    c = int(num_classes if num_classes is not None else y.max() + 1)
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}), got [{y.min()}, {y.max()}]")
    return np.eye(c, dtype=np.float64)[y]


def _check(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features {x.shape} and labels {y.shape} do not match: need [N, D] and [N]")
    if x.shape[0] < 3:
        raise ValueError(f"task similarity needs at least 3 probe examples, got {x.shape[0]}")
    if len(np.unique(y)) < 2:
        raise ValueError("task similarity needs at least 2 classes in the probe set")
    return x, y


def pca_reduce(x: np.ndarray, dim: int) -> np.ndarray:
    """Coordinates of the centred rows on the top-`dim` principal axes (all of them if fewer).

    Signs are fixed (the largest-magnitude coordinate of each component is positive), so the result
    is deterministic.
    """
    xc = x - x.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    k = min(dim, len(s))
    u, s = u[:, :k], s[:k]
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(k)])
    signs[signs == 0] = 1.0
    return u * s * signs


def standardize(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per column; constant columns become 0."""
    sd = x.std(axis=0, keepdims=True)
    return (x - x.mean(axis=0, keepdims=True)) / np.where(sd > 0, sd, 1.0)


def pearson_distances(x: np.ndarray) -> np.ndarray:
    """1 - Pearson correlation between every pair of rows; a constant row correlates 0 with all.

    Rounded to 12 decimals, so that rounding noise does not break ties in the Spearman ranks
    (one-hot rows have exactly two distances: 0 and 1 + 1 / (C - 1)).
    """
    xc = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(xc, axis=1, keepdims=True)
    xn = xc / np.where(norm > 0, norm, 1.0)
    return np.round(1.0 - np.clip(xn @ xn.T, -1.0, 1.0), 12)


def lower_triangle(m: np.ndarray) -> np.ndarray:
    """Entries strictly below the diagonal, row by row."""
    i, j = np.tril_indices(m.shape[0], k=-1)
    return m[i, j]


def _rdm_spearman(x: np.ndarray, y_onehot: np.ndarray) -> float:
    a = lower_triangle(pearson_distances(x))
    b = lower_triangle(pearson_distances(y_onehot))
    if np.ptp(a) == 0:   # no pairwise structure at all: no similarity
        return 0.0
    return float(spearmanr(a, b).statistic)


def parc(features: np.ndarray, labels: np.ndarray, dim: int = PARC_DIM) -> float:
    x, y = _check(features, labels)
    if x.shape[1] > dim:
        x = pca_reduce(x, dim)
    return _rdm_spearman(standardize(x), one_hot(y))


def rsa(features: np.ndarray, labels: np.ndarray) -> float:
    x, y = _check(features, labels)
    return _rdm_spearman(x, one_hot(y))


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA between two representations of the same N examples ([N, D1], [N, D2])."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(axis=0, keepdims=True)
    b = b - b.mean(axis=0, keepdims=True)
    denom = np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)
    if denom == 0:
        return 0.0
    return float(np.linalg.norm(b.T @ a) ** 2 / denom)


def cka(features: np.ndarray, labels: np.ndarray) -> float:
    x, y = _check(features, labels)
    return linear_cka(x, one_hot(y))


SIMILARITIES: Registry[Callable[[np.ndarray, np.ndarray], float]] = Registry("task similarity")
SIMILARITIES.register("parc", parc)
SIMILARITIES.register("cka", cka)
SIMILARITIES.register("rsa", rsa)


def similarity_weights(similarities: Sequence[float], p: float) -> np.ndarray:
    """w_i = exp(p s_i) / sum_j exp(p s_j) (Borup et al. eq. 5); p = 0: equal, p = inf: the nearest."""
    s = np.asarray(similarities, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"need a non-empty vector of similarities, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"similarities must be finite, got {s.tolist()}")
    if math.isnan(p) or p < 0:
        raise ValueError(f"the weight temperature p must be >= 0 (0: equal weights, inf: nearest), got {p}")
    if math.isinf(p):
        top = s == s.max()
        return top / top.sum()
    z = p * s
    e = np.exp(z - z.max())
    return e / e.sum()
