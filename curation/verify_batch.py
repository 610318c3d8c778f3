"""Batched copy verification: `copy_match` over many pairs at once, with the same placements and scores.

``match_pairs(pairs)`` runs the alignment search of `curation.verify` (its slides, in its order, its
strict "better than the best so far" rule, its cover check, the low-pass match at the winning
placement) for every pair, but batched: pairs are grouped by their two thumbnail sizes, since the
sizes alone fix the slides (`one_way_slides`, `whole_slides`); within a group, slide by slide:

- each thumbnail's resized / low-passed / cut variant is made once per chunk of pairs and shared
  by all its pairs and by every slide that uses it (a gallery image is verified against up to 32
  references; the unresized reference serves every crop size);
- the correlation maps (TM_CCOEFF_NORMED) are OpenCV's own on the CPU, so each pair's argmax is
  exactly `copy_match`'s, and a batched float32 FFT cross-correlation in torch on CUDA (zero-mean
  template against each window's mean and norm, flat windows 0, as OpenCV), where only a near tie
  (~1e-6) between two placements can resolve differently; a slide with one placement (template as
  large as its reference) is a direct correlation, vectorised;
- the comparison with the best so far is by the exact float64 fit at the placement, vectorised, as
  `_best` does, and the cover check (`_rest_is_flat`) is answered from integral images;
- only the winning placement of each pair is low-passed and scored, stacked by slide, with the
  same scipy filter and float64 arithmetic as `copy_match`.

Measured (`tests/test_verify_batch.py`, `bench/verify.py`): scores equal `copy_match`'s to 1e-15
on the planted-copy sets and on random pairs of varied sizes, flat, mirrored and letterboxed images;
flat images give NO_MATCH, as there. There is no cascade: every pair gets the full search, so any
`VerifyRule` decides as it would on `copy_match`'s matches. Groups of fewer than SMALL_GROUP pairs
(every pair of a distinct size pair shares nothing) go to `copy_match` itself. What bounds the
rate on the CPU: the OpenCV map calls (about 14 a pair at 28 px, 20 at 96 px; see `_argmax_cv2`
for the alternatives measured), and, where thumbnail shapes vary (web images, the Tux Paint
stamps), that a pair of sizes seen once has no work to share.

Why one module: each part (the plan by thumbnail sizes, the shared variants, the correlation maps
on CPU and GPU, the exact fit, the cover check, the scoring of winners) mirrors one step of
`curation.verify.copy_match` and must stay in step with it for the scores to be equal; read apart,
that correspondence is lost.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, NamedTuple, Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

from curation.verify import (BLUR, GUARD, LOW_BLUR, MIN_COVER, NO_MATCH, TEXTURE, Match, Slide, Thumb, _resized,
                             copy_match, one_way_slides, whole_slides)
from index.device import pick_device

FLAT_WINDOW = 1e-3        # window std below which a placement cannot be scored (as `_agreement`)
CPU_MAPS = "opencv"       # correlation maps on the CPU: "opencv" (fastest there) or "torch"
SMALL_GROUP = 3           # pairs of one size pair below which batching costs more than it shares
CHUNK_ELEMENTS = {"cpu": 8_000_000, "cuda": 64_000_000}   # pairs x reference pixels per batch


class _Job(NamedTuple):
    ref_side: int          # 0: the pair's first image is the reference, the second the template
    slide: Slide
    cut: tuple[int, int]   # template shape after its margins are cut
    partial: bool          # the placed box covers less than MIN_COVER of the reference


def plan(a: tuple[int, int], b: tuple[int, int]) -> list[_Job]:
    """Every slide `copy_match` tries for images of sizes a and b, in its order."""
    jobs = []
    for side, slides in ((0, one_way_slides(a, b)), (1, one_way_slides(b, a)),
                         (0, whole_slides(a, b)), (1, whole_slides(b, a))):
        for sl in slides:
            ch, cw = len(range(sl.mh, sl.th - sl.mh)), len(range(sl.mw, sl.tw - sl.mw))
            partial = (ch + 2 * sl.mh) * (cw + 2 * sl.mw) < MIN_COVER * sl.rw * sl.rh
            jobs.append(_Job(side, sl, (ch, cw), partial))
    return jobs


def match_pairs(pairs: Sequence[tuple[Thumb, Thumb]], *, device: str | None = None,
                progress: bool | str = False) -> list[Match]:
    """`copy_match(a, b)` for every (a, b) in `pairs` (Thumbs, or images made into Thumbs), batched.

    ``device``: a torch device for the correlation maps (None: CUDA when available, else CPU).
    ``progress``: a tqdm bar over pairs when truthy, its value the description where a string.
    """
    dev = torch.device(pick_device(device))
    made: dict[int, Thumb] = {}          # an image given in several pairs is made a Thumb once
    thumbs = [(_thumb(a, made), _thumb(b, made)) for a, b in pairs]
    out: list[Match] = [NO_MATCH] * len(thumbs)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (a, b) in enumerate(thumbs):
        if not (a.flat or b.flat):
            groups[a.size, b.size].append(i)
    budget = CHUNK_ELEMENTS["cuda" if dev.type == "cuda" else "cpu"]
    desc = progress if isinstance(progress, str) else "verify"
    with tqdm(total=len(thumbs), desc=desc, unit="pair", disable=not progress) as bar:
        bar.update(len(thumbs) - sum(len(v) for v in groups.values()))
        for (sa, sb), idx in groups.items():
            if len(idx) < SMALL_GROUP:     # too few to share the work: one at a time, the same search
                for i in idx:
                    out[i] = copy_match(*thumbs[i])
                bar.update(len(idx))
                continue
            jobs = plan(sa, sb)
            area = max((j.slide.rw * j.slide.rh for j in jobs), default=1)
            step = max(1, budget // area)
            for c in range(0, len(idx), step):
                part = idx[c:c + step]
                for i, m in zip(part, _match_chunk([thumbs[i] for i in part], jobs, dev)):
                    out[i] = m
                bar.update(len(part))
    return out


def _thumb(x, made: dict[int, Thumb]) -> Thumb:
    if isinstance(x, Thumb):
        return x
    if isinstance(x, Image.Image):
        if id(x) not in made:
            made[id(x)] = Thumb.of(x)
        return made[id(x)]
    raise TypeError(f"match_pairs takes pairs of Thumb or PIL images; got {type(x).__name__}")


class _Variants:
    """Per-thumbnail arrays of one slide side (all of one shape), each made once per chunk of pairs:
    `memo` holds them across the slides that share them (the unresized reference of every crop
    size)."""

    def __init__(self, thumbs: Iterable[Thumb], make, key: tuple, memo: dict):
        self.index: dict[int, int] = {}
        arrays = []
        for t in thumbs:
            if id(t) not in self.index:
                self.index[id(t)] = len(arrays)
                k = (id(t), *key)
                if k not in memo:
                    memo[k] = make(t)
                arrays.append(memo[k])
        self.arrays = arrays
        flat = np.stack(arrays).reshape(len(arrays), -1).astype(np.float64)
        self.ok = flat.std(axis=1) >= 1e-3          # as `_best`: a flat side has no placement
        self._ii: tuple[np.ndarray, np.ndarray] | None = None

    def rows(self, thumbs: Iterable[Thumb]) -> np.ndarray:
        return np.array([self.index[id(t)] for t in thumbs], np.int64)

    @property
    def integrals(self) -> tuple[np.ndarray, np.ndarray]:
        """[n, h + 1, w + 1] zero-padded 2-D cumulative sums of the arrays and of their squares."""
        if self._ii is None:
            x = np.stack(self.arrays).astype(np.float64)
            pad = ((0, 0), (1, 0), (1, 0))
            self._ii = (np.pad(x.cumsum(1).cumsum(2), pad), np.pad((x * x).cumsum(1).cumsum(2), pad))
        return self._ii


def _ref_array(t: Thumb, sl: Slide) -> np.ndarray:
    ref = _resized(t.pixels, sl.rw, sl.rh, sl.kernel)
    return gaussian_filter(ref, LOW_BLUR) if sl.blur else ref


def _template_array(t: Thumb, sl: Slide) -> np.ndarray:
    x = _resized(t.pixels, sl.tw, sl.th)
    if sl.blur:
        x = gaussian_filter(x, LOW_BLUR)
    return np.ascontiguousarray(x[sl.mh:sl.th - sl.mh, sl.mw:sl.tw - sl.mw])


class _Winner(NamedTuple):
    job: np.ndarray      # [P] index into the jobs, -1: no placement
    mirror: np.ndarray
    y: np.ndarray
    x: np.ndarray


def _match_chunk(pairs: list[tuple[Thumb, Thumb]], jobs: list[_Job], dev: torch.device) -> list[Match]:
    n = len(pairs)
    best = np.full(n, -np.inf)
    win = _Winner(np.full(n, -1), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64))
    kept, memo = [], {}
    for j, job in enumerate(jobs):
        sl, (ch, cw) = job.slide, job.cut
        refs_t = [p[job.ref_side] for p in pairs]
        tmpl_t = [p[1 - job.ref_side] for p in pairs]
        refs = _Variants(refs_t, lambda t: _ref_array(t, sl), ("ref", sl.rw, sl.rh, sl.kernel, sl.blur), memo)
        tmpl = _Variants(tmpl_t, lambda t: _template_array(t, sl), ("template", *sl), memo)
        ri, ti = refs.rows(refs_t), tmpl.rows(tmpl_t)
        kept.append((refs, tmpl, ri, ti))
        if min(ch, cw) < 3:
            continue
        live = np.nonzero(refs.ok[ri] & tmpl.ok[ti])[0]
        if not live.size:
            continue
        positions = (sl.rh - ch + 1) * (sl.rw - cw + 1)
        if positions == 1:
            maps = _argmax_direct             # one placement: the correlation itself
        elif dev.type != "cpu" or CPU_MAPS == "torch":
            maps = _argmax_torch
        else:
            maps = _argmax_cv2
        for m, (val, y, x) in enumerate(maps(refs.arrays, tmpl.arrays, ri[live], ti[live], dev)):
            # as `_best`: the map's best placement, if it beats the best so far, counts where
            # the box covers enough of the reference (or the rest is flat), by its exact fit
            cand = val > best[live]
            if job.partial and cand.any():
                cand &= _rest_is_flat(refs, ri[live], y, x, job)
            k = live[cand]
            if not k.size:
                continue
            fit = _exact_fit(refs.arrays, tmpl.arrays, ri[k], ti[k], y[cand], x[cand], (ch, cw), m)
            up = fit > best[k]
            k = k[up]
            best[k] = fit[up]
            win.job[k], win.mirror[k], win.y[k], win.x[k] = j, m, y[cand][up], x[cand][up]
    return _score_winners(pairs, jobs, kept, win)


def _argmax_cv2(refs: list[np.ndarray], tmpl: list[np.ndarray], ri: np.ndarray, ti: np.ndarray, dev):
    """Per mirror: (best value, y, x) of OpenCV's map for each pair: the very maps `copy_match` uses
    (on the CPU the fastest correlation measured that holds up on a loaded machine: a float32 GEMM
    per reference was slower, batched torch FFT 1.1-1.4x faster at 28 px with one thread but up
    to 10x slower with two threads on a busy machine, and slower at 96 px)."""
    flipped = [np.ascontiguousarray(t[:, ::-1]) for t in tmpl]
    n = len(ri)
    val, y, x = np.empty((2, n)), np.empty((2, n), np.int64), np.empty((2, n), np.int64)
    for k in range(n):
        ref = refs[ri[k]]
        for m, ts in enumerate((tmpl, flipped)):
            r = cv2.matchTemplate(ref, ts[ti[k]], cv2.TM_CCOEFF_NORMED)
            pos = int(r.argmax())
            val[m, k] = r.flat[pos]
            y[m, k], x[m, k] = divmod(pos, r.shape[1])
    return [(val[m], y[m], x[m]) for m in (0, 1)]


def _argmax_torch(refs: list[np.ndarray], tmpl: list[np.ndarray], ri: np.ndarray, ti: np.ndarray,
                  dev: torch.device):
    """The same from one batched FFT cross-correlation in float32 (TM_CCOEFF_NORMED: the zero-mean
    template against each window's mean and norm, flat windows 0), on `dev`."""
    R = torch.from_numpy(np.stack(refs)).to(dev, torch.float32)
    T = torch.from_numpy(np.stack(tmpl)).to(dev, torch.float32)
    (rh, rw), (ch, cw) = R.shape[1:], T.shape[1:]
    oh, ow, area = rh - ch + 1, rw - cw + 1, ch * cw
    T = T - T.mean(dim=(1, 2), keepdim=True)
    tnorm = T.double().square().sum(dim=(1, 2)).sqrt()
    Rd = R.double()
    ii1, ii2 = _integral(Rd), _integral(Rd.square())
    s1 = ii1[:, ch:, cw:] - ii1[:, :oh, cw:] - ii1[:, ch:, :ow] + ii1[:, :oh, :ow]
    s2 = ii2[:, ch:, cw:] - ii2[:, :oh, cw:] - ii2[:, ch:, :ow] + ii2[:, :oh, :ow]
    wvar = (s2 - s1.square() / area).clamp_min(0)                  # area x window variance
    flat = (wvar / area).sqrt() < FLAT_WINDOW
    rows_r, rows_t = torch.from_numpy(ri).to(dev), torch.from_numpy(ti).to(dev)
    denom = (wvar.sqrt()[rows_r] * tnorm[rows_t][:, None, None]).clamp_min(1e-30).float()
    flat_p = flat[rows_r]
    FR = torch.fft.rfft2(R)
    out = []
    for mirrored in (False, True):
        FT = torch.fft.rfft2(T.flip(-1) if mirrored else T, s=(rh, rw))
        c = torch.fft.irfft2(FR[rows_r] * FT[rows_t].conj(), s=(rh, rw))[:, :oh, :ow]
        r = torch.where(flat_p, torch.zeros((), device=dev), (c / denom).clamp(-1, 1)).reshape(len(ri), -1)
        val = r.max(dim=1).values
        first = (r == val[:, None]).to(torch.uint8).argmax(dim=1)    # the first maximum, as OpenCV's argmax
        out.append((val.double().cpu().numpy(), (first // ow).cpu().numpy(), (first % ow).cpu().numpy()))
    return out


def _integral(x: torch.Tensor) -> torch.Tensor:
    """[n, h + 1, w + 1] zero-padded 2-D cumulative sums."""
    return torch.nn.functional.pad(x.cumsum(1).cumsum(2), (1, 0, 1, 0))


def _rest_is_flat(refs: _Variants, ri: np.ndarray, y: np.ndarray, x: np.ndarray, job: _Job) -> np.ndarray:
    """`verify._rest_is_flat` for each pair's placement (the box widened by GUARD), from integral images."""
    (ch, cw), mh, mw = job.cut, job.slide.mh, job.slide.mw
    ii1, ii2 = refs.integrals
    rh, rw = ii1.shape[1] - 1, ii1.shape[2] - 1
    y0, x0 = np.clip(y - mh - GUARD, 0, rh), np.clip(x - mw - GUARD, 0, rw)
    y1, x1 = np.clip(y + ch + mh + GUARD, 0, rh), np.clip(x + cw + mw + GUARD, 0, rw)

    def box(ii):
        return ii[ri, y1, x1] - ii[ri, y0, x1] - ii[ri, y1, x0] + ii[ri, y0, x0]

    rest = rh * rw - (y1 - y0) * (x1 - x0)
    m = np.maximum(rest, 1)
    s1, s2 = ii1[ri, rh, rw] - box(ii1), ii2[ri, rh, rw] - box(ii2)
    std = np.sqrt(np.maximum(s2 / m - (s1 / m) ** 2, 0.0))
    return (rest == 0) | (std < TEXTURE)


def _argmax_direct(refs: list[np.ndarray], tmpl: list[np.ndarray], ri: np.ndarray, ti: np.ndarray, dev):
    """Per mirror: the correlation of a template as large as its reference (one placement, (0, 0))."""
    p = np.stack(refs)[ri].astype(np.float64)
    q = np.stack(tmpl)[ti].astype(np.float64)
    zero = np.zeros(len(ri), np.int64)
    return [(np.nan_to_num(_agreement(p, q)[0], nan=0.0), zero, zero),
            (np.nan_to_num(_agreement(p, q[:, :, ::-1])[0], nan=0.0), zero, zero)]


def _exact_fit(refs, tmpl, ri, ti, y, x, cut: tuple[int, int], mirrored: int) -> np.ndarray:
    """The raw correlation at each placement in float64, as `_best` recomputes it (NaN: flat)."""
    ch, cw = cut
    p = np.stack([refs[a][yy:yy + ch, xx:xx + cw] for a, yy, xx in zip(ri, y, x)]).astype(np.float64)
    q = np.stack([tmpl[b] for b in ti]).astype(np.float64)
    if mirrored:
        q = q[:, :, ::-1]
    return _agreement(p, q)[0]


def _score_winners(pairs, jobs: list[_Job], kept, win: _Winner) -> list[Match]:
    """The low-pass match (`verify._agreement` after the BLUR filter) at each pair's winning placement."""
    out: list[Match] = [NO_MATCH] * len(pairs)
    for j, m in sorted({(int(j), int(m)) for j, m in zip(win.job, win.mirror) if j >= 0}):
        sel = np.nonzero((win.job == j) & (win.mirror == m))[0]
        refs, tmpl, ri, ti = kept[j]
        ch, cw = jobs[j].cut
        p = np.stack([refs.arrays[ri[k]][win.y[k]:win.y[k] + ch, win.x[k]:win.x[k] + cw] for k in sel])
        q = np.stack([tmpl.arrays[ti[k]] for k in sel])
        if m:
            q = q[:, :, ::-1]
        s = BLUR * max(ch, cw)
        score, residual = _agreement(gaussian_filter(p.astype(np.float64), (0, s, s)),
                                     gaussian_filter(q.astype(np.float64), (0, s, s)))
        for k, v, r in zip(sel, score, residual):
            out[k] = Match(float(v), float(r))
    return out


def _agreement(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`verify._agreement` over a stack of aligned [n, h, w] arrays."""
    p = p - p.mean(axis=(1, 2), keepdims=True)
    q = q - q.mean(axis=(1, 2), keepdims=True)
    sp, sq = np.sqrt((p * p).mean(axis=(1, 2))), np.sqrt((q * q).mean(axis=(1, 2)))
    scorable = (sp >= 1e-3) & (sq >= 1e-3)
    with np.errstate(invalid="ignore", divide="ignore"):
        v = (p * q).mean(axis=(1, 2)) / (sp * sq)
        r = np.sqrt(sp * sq) * np.sqrt(np.maximum(0.0, 1.0 - v * v))
    return np.where(scorable, v, np.nan), np.where(scorable, r, np.nan)

