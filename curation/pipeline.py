"""`curate`: named query set + built index -> curated transfer set (WebDataset shards, manifest, report).

Steps (Vemulapalli et al. 2024, sec. 3.4 and Appendix B):
  1. embed the query images with the index's own encoders (resize + centre crop);
  2. select N gallery crops with a strategy (query-balanced by default), deepening the search as needed;
  3. embed the *original images* of the selected crops; decontaminate (max similarity to any image of
     the target dataset > leak threshold removes every crop of that image) and dedup (original images
     with mean similarity > dedup threshold form a cluster; one item per cluster survives); images that
     cannot be read are removed too;
  4. backfill: rerun the same strategy on the gallery minus the removed items, until stable, so the set
     holds exactly N (or says why not);
  5. re-materialise the crops from the gallery (each gallery shard read once) and write
     ``transfer-*.tar`` + ``queries-*.tar`` atomically, then ``queries.json``, ``report.html`` and
     ``manifest.json`` (last).
"""
from __future__ import annotations

import dataclasses
import io
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from curation import pixelkey
from curation import report as rpt
from curation.calibrate import Calibration, cached_calibration
from curation.decontam import clear_reviewed, find_leaks, read_review, verify_leaks
from curation.dedup import duplicate_clusters, keep_one_per_cluster
from curation.features import FeatureCache, embed_labeled, embed_originals, labeled_keys
from curation.pixelkey import Keys
from curation.querysets import QuerySet, get_query_set
from curation.selection import (SELECTORS, Selection, class_prompts, class_text_queries,
                                select_with_search)
from curation.shards import read_originals, write_query_shards, write_transfer_shards
from curation.verify import NO_MATCH, VERIFIERS, Match, Thumb, VerifyRule, copy_match
from index import contract
from index.atomic import CODE_VERSION, write_json
from index.encoders import build_encoder
from index.embed import pick_device
from index.gallery_index import GalleryIndex
from index.knn import combine_features


def parse_threshold(value: float | str, name: str = "threshold", low: float = -1.0, high: float = 1.0,
                    what: str = "a number in [-1, 1]") -> float | str:
    """"auto", or a number in [low, high] (strings from a CLI or a config file are converted)."""
    if isinstance(value, str):
        if value == "auto":
            return value
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name} must be 'auto' or {what}; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be 'auto' or {what}; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CurateConfig:
    queries: str
    index: str
    size: int
    out: str
    strategy: str = "query_balanced"
    seed: int = 0
    data_root: str | None = None
    dedup_threshold: float | str = "auto"     # "auto" (calibrated) or a mean cosine
    leak_threshold: float | str = "auto"      # "auto" (calibrated) or a max cosine
    verify: str = "align"                     # second signal on candidates: align | none
    verify_threshold: float | str = "auto"    # "auto" (calibrated) or a verify.Match.score limit
    verify_max_residual: float | str = "auto"  # "auto" (calibrated) or grey levels (verify.Match.residual)
    key_threshold: float | str = "auto"       # "auto" (calibrated) or a pixel key similarity (1: off)
    copy_recall: float = 0.99                 # calibration target: recall of every copy kind
    calibration_images: int = 300             # references sampled for calibration
    leak_neighbours: int = 5
    leak_review: str | None = None
    k0: int | None = None              # first search depth (default: from N and the query count)
    max_k: int | None = None           # cap on the search depth
    nprobe: int | None = None
    shard_size: int = 1000             # transfer samples per output shard
    jpeg_quality: int = 95
    batch_size: int = 64
    device: str | None = None
    cache_dir: str | None = None       # reference-feature cache (default ~/.cache/vfm-curate/features)
    executor: str = "local"
    num_workers: int | None = None

    def __post_init__(self):
        SELECTORS.get(self.strategy)  # raises with the valid names
        if self.size < 1:
            raise ValueError(f"size must be >= 1; got {self.size}")
        for name in ("dedup_threshold", "leak_threshold", "verify_threshold", "key_threshold"):
            object.__setattr__(self, name, parse_threshold(getattr(self, name), name))
        object.__setattr__(self, "verify_max_residual", parse_threshold(
            self.verify_max_residual, "verify_max_residual", 0.0, math.inf,
            "a number of grey levels >= 0 (inf: no limit)"))
        if self.verify not in VERIFIERS:
            raise ValueError(f"verify must be one of {', '.join(VERIFIERS)}; got {self.verify!r}")
        if not 0.0 < self.copy_recall < 1.0:
            raise ValueError(f"copy_recall must be in (0, 1); got {self.copy_recall}")
        if self.calibration_images < 2:
            raise ValueError(f"calibration_images must be >= 2; got {self.calibration_images}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Filtered:
    """What the filters removed, by global vector id, and why."""
    duplicates: set[int] = dataclasses.field(default_factory=set)
    dup_parent: dict[str, str] = dataclasses.field(default_factory=dict)  # union-find over duplicate images
    leak_items: dict[str, int] = dataclasses.field(default_factory=dict)  # leaked image id -> crops removed
    leaks: set[int] = dataclasses.field(default_factory=set)
    unreadable: set[int] = dataclasses.field(default_factory=set)

    def all(self) -> np.ndarray:
        return np.array(sorted(self.duplicates | self.leaks | self.unreadable), dtype=np.int64)

    def _root(self, i: str) -> str:
        while self.dup_parent.setdefault(i, i) != i:
            i = self.dup_parent[i]
        return i

    def link(self, images: list[str]) -> None:
        """Record that these original images are duplicates of each other (across rounds too)."""
        for other in images[1:]:
            a, b = self._root(images[0]), self._root(other)
            if a != b:
                self.dup_parent[max(a, b)] = min(a, b)

    def clusters(self, final_images: set[str]) -> list[list[tuple[str, bool]]]:
        """Duplicate clusters of two or more distinct images: (image id, kept in the final set).

        Two crops of one image are duplicates too (one crop per image survives) and are counted in
        removed_duplicate, but a cluster of one image is not listed.
        """
        groups: dict[str, list[str]] = defaultdict(list)
        for i in sorted(self.dup_parent):
            groups[self._root(i)].append(i)
        return [[(i, i in final_images) for i in g] for g in groups.values() if len(g) > 1]


def _queries_features(cfg: CurateConfig, qs: QuerySet, models, selector) -> tuple[np.ndarray, list[str]]:
    """Combined query vectors and their ids: images, or class-name prompts for `text`."""
    if selector.queries == "text":
        missing = [m.spec.name for m in models if not m.spec.has_text_tower]
        if missing:
            raise ValueError(f"strategy 'text' needs encoders with a text tower; {missing} have none. "
                             "Index with a CLIP encoder (open_clip ARCH.TAG) to use text queries.")
        prompts = class_prompts(qs.classes)
        flat = [p for ps in prompts for p in ps]
        per_enc = []
        for m in models:
            f = m.encode_text(flat).float().cpu().numpy().reshape(len(prompts), len(prompts[0]), -1)
            per_enc.append(class_text_queries(f))
        return combine_features(per_enc), [f"text:{c}" for c in qs.classes]
    feats = embed_labeled(models, qs.queries, cfg.batch_size)
    return combine_features(feats), [q.id for q in qs.queries]


def curate(cfg: CurateConfig, executor=None) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    gindex = GalleryIndex(cfg.index)
    specs = gindex.local_specs()          # refuses encoders whose weights differ from the index's
    device = pick_device(cfg.device)
    models = [build_encoder(s, device) for s in specs]
    qs = get_query_set(cfg.queries, cfg.data_root, cfg.seed)
    selector = SELECTORS.get(cfg.strategy)
    timings: dict[str, float] = {}

    tq = time.perf_counter()
    if selector.needs_search:
        qfeat, query_ids = _queries_features(cfg, qs, models, selector)
    else:
        qfeat, query_ids = np.zeros((0, sum(s.embed_dim for s in specs)), np.float32), []
    timings["embed_queries"] = time.perf_counter() - tq

    search_time = [0.0]

    def search(k: int):
        ts = time.perf_counter()
        r = gindex.search(qfeat, k, cfg.nprobe)
        search_time[0] += time.perf_counter() - ts
        return r

    k0 = cfg.k0 or max(8, int(np.ceil(2 * cfg.size / max(1, len(query_ids)))))

    def select(removed: np.ndarray) -> Selection:
        return select_with_search(search, cfg.size, cfg.seed, selector, k0=k0, num_gallery=gindex.num_vectors,
                                  removed=removed, max_k=cfg.max_k)

    # references: every image of the target dataset (cached by query set + encoders)
    tr = time.perf_counter()
    cache = FeatureCache(cfg.cache_dir)
    ref_feats = cache.get_or_compute(
        {"kind": "references", "query_set": qs.name, "ids": [r.id for r in qs.references],
         "encoders": [s.identity() for s in specs]},
        lambda: embed_labeled(models, qs.references, cfg.batch_size, desc="embed references"))
    ref_ids = [r.id for r in qs.references]
    timings["embed_references"] = time.perf_counter() - tr

    tc = time.perf_counter()
    ref_keys = None if cfg.verify == "none" else Keys(cache.get_or_compute(   # they serve verification only
        {"kind": "pixel-keys", "query_set": qs.name, "ids": ref_ids, "version": pixelkey.KEY_VERSION},
        lambda: [labeled_keys(qs.references)])[0])
    th, calibration = resolve_thresholds(cfg, models, qs, ref_feats, ref_keys, cache.root)
    timings["calibrate"] = time.perf_counter() - tc
    verifier = _Verifier(gindex, {r.id: r for r in qs.references})

    sel = select(np.zeros(0, np.int64))
    first = sel
    filtered = Filtered()
    orig: dict[str, list[np.ndarray]] = {}     # gallery image id -> per-encoder feature rows
    keys: dict[str, np.ndarray] = {}           # gallery image id -> pixel key
    review = set(read_review(cfg.leak_review)) if cfg.leak_review else set()
    leak_report = None
    rounds = 0
    tf = time.perf_counter()
    while True:
        rounds += 1
        rows = gindex.rows(sel.ids)
        img_of = np.array([r.id for r in rows])
        new = sorted(set(img_of) - set(orig))
        unreadable_imgs = embed_originals(gindex, models, new, orig, cfg.batch_size,
                                          keys_into=None if ref_keys is None else keys)
        unreadable = {int(g) for g, i in zip(sel.ids, img_of) if i in unreadable_imgs}
        ok = np.array([i not in unreadable_imgs and i in orig for i in img_of], dtype=bool)
        # decontamination over every original image seen so far (stable across rounds)
        seen = sorted(orig)
        per_enc = [np.stack([orig[i][e] for i in seen]) for e in range(len(specs))] if seen else \
            [np.zeros((0, s.embed_dim), np.float32) for s in specs]
        leak_report = find_leaks(per_enc, ref_feats, th["leak"], th["neighbours"],
                                 reference_ids=ref_ids, image_ids=seen,
                                 key_threshold=th["key"], key_k=th["key_neighbours"],
                                 image_keys=_stacked(keys, seen) if th["key"] is not None else None,
                                 reference_keys=ref_keys)
        if th["verify"] is not None:
            verifier.prefetch(x.image_id for x in leak_report.leaks)
            leak_report = verify_leaks(leak_report, verifier.match, th["rule"])
        if review:  # un-flag reviewed images among those seen so far; unknown ids are checked below
            leak_report = clear_reviewed(leak_report, review)
        leaked_imgs = {x.image_id for x in leak_report.leaks}
        leaks = {int(g) for g, i in zip(sel.ids, img_of) if i in leaked_imgs}
        # dedup among the surviving selected items (original-image level)
        alive = np.flatnonzero(ok & ~np.isin(img_of, list(leaked_imgs)))
        dups: set[int] = set()
        if alive.size:
            uniq, inv = np.unique(img_of[alive], return_inverse=True)
            f = combine_features([np.stack([orig[i][e] for i in uniq]) for e in range(len(specs))])
            def keep_pair(i: np.ndarray, j: np.ndarray) -> np.ndarray:
                verifier.prefetch(uniq[np.r_[i, j]])
                return np.array([th["rule"].passes(verifier.match(str(uniq[a]), str(uniq[b]), gallery=True))
                                 for a, b in zip(i, j)], bool)
            labels = duplicate_clusters(f, th["dedup"], keep_pair=None if th["verify"] is None else keep_pair,
                                        per_image=None if th["verify"] is None else th["neighbours"],
                                        keys=_stacked(keys, uniq) if th["key"] is not None else None,
                                        key_threshold=th["key"],
                                        key_per_image=th["key_neighbours"])[inv]
            keep = keep_one_per_cluster(labels, alive)   # selection order = curated rank
            dups = {int(g) for g in sel.ids[alive[~keep]]}
            for lab in np.unique(labels[~keep]):
                filtered.link(sorted({str(img_of[alive[m]]) for m in np.flatnonzero(labels == lab)}))
        if not (unreadable | leaks | dups):
            break
        filtered.unreadable |= unreadable
        filtered.leaks |= leaks
        for i in img_of:
            if i in leaked_imgs:
                filtered.leak_items[str(i)] = filtered.leak_items.get(str(i), 0) + 1
        filtered.duplicates |= dups
        sel = select(filtered.all())
    timings["filters"] = time.perf_counter() - tf
    timings["verify"] = verifier.seconds
    if review:
        unknown = sorted(review - {x.image_id for x in leak_report.cleared})
        if unknown:
            flagged = sorted(x.image_id for x in leak_report.leaks)
            raise ValueError(
                f"{cfg.leak_review}: {len(unknown)} reviewed id(s) were not flagged as leaks in this run "
                f"(e.g. {unknown[:5]}); flagged ids: {flagged[:20]}{' ...' if len(flagged) > 20 else ''}")

    # materialise and write
    tw = time.perf_counter()
    rows = gindex.rows(sel.ids)
    records = _records(sel, rows, query_ids)
    written = write_transfer_shards(out, gindex, records, cfg.shard_size, cfg.jpeg_quality)
    write_query_shards(out, qs)
    write_json(out / contract.QUERIES_DRAW_FILE, qs.to_draw_dict())
    timings["write"] = time.perf_counter() - tw
    timings["search"] = search_time[0]

    first_ids = set(first.ids.tolist())
    counts = {
        "requested": cfg.size,
        "retrieved": len(first),
        "removed_duplicate": len(filtered.duplicates & first_ids),
        "removed_leak": len(filtered.leaks & first_ids),
        "removed_unreadable": len(filtered.unreadable & first_ids),
        "backfilled": len(set(sel.ids.tolist()) - first_ids),
        "written": written.written,
        "unreadable_at_write": written.unreadable,
        "rounds": rounds,
        "exhausted": bool(sel.exhausted),
        "depth_k": int(sel.k),
    }
    assert counts["retrieved"] - counts["removed_duplicate"] - counts["removed_leak"] \
        - counts["removed_unreadable"] + counts["backfilled"] - counts["unreadable_at_write"] == counts["written"]
    manifest = {
        "config": cfg.to_dict(),
        "query_set": {"name": qs.name, "seed": qs.seed, "classes": qs.classes, "num_queries": len(qs.queries),
                      "num_references": len(qs.references)},
        "index": {"path": str(gindex.root), "num_vectors": gindex.num_vectors,
                  "index_factory": gindex.manifest["index_factory"]},
        "encoders": [s.to_dict() for s in specs],
        "seed": cfg.seed,
        "strategy": cfg.strategy,
        "thresholds": {k: v for k, v in th.items() if k != "rule"},
        "calibration": calibration.to_dict() if calibration else None,
        "verified_pairs": verifier.count,
        "counts": counts,
        "message": sel.message,
        "leaks": leak_report.to_dict() if leak_report else None,
        "shards": written.files,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "code_version": CODE_VERSION,
    }
    _write_report(out, cfg, qs, gindex, sel, records, filtered, leak_report, counts, specs, query_ids, th,
                  calibration)
    write_json(out / contract.MANIFEST_FILE, manifest)
    seconds = time.perf_counter() - t0
    print(summary_line(manifest, seconds), flush=True)
    return manifest


def summary_line(manifest: dict[str, Any], seconds: float) -> str:
    c = manifest["counts"]
    th = manifest["thresholds"]
    return (f"curate: {c['written']}/{c['requested']} written ({manifest['strategy']}, k={c['depth_k']}), "
            f"retrieved {c['retrieved']}, removed {c['removed_duplicate']} duplicate / {c['removed_leak']} leak / "
            f"{c['removed_unreadable']} unreadable, backfilled {c['backfilled']}, "
            f"thresholds ({th.get('source', 'given')}) dedup {_fmt(th['dedup'])} leak {_fmt(th['leak'])} "
            f"verify {th.get('verifier', 'none')} {_fmt(th.get('verify'))}"
            + (f" residual<={_fmt(th['max_residual'])}" if th.get("max_residual") is not None else "")
            + (f" key {_fmt(th['key'])}" if th.get("key") is not None else "")
            + f", {seconds:.1f} s"
            + (f" -- {manifest['message']}" if manifest.get("message") else ""))


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def resolve_thresholds(cfg: CurateConfig, models, qs: QuerySet, ref_feats: list[np.ndarray], ref_keys: Keys | None,
                       cache_dir) -> tuple[dict[str, Any], Calibration | None]:
    """The thresholds in force: given numbers as they are, "auto" ones from a calibration on the
    query set's references (cached by encoders + sampled reference ids; see curation.calibrate).
    Retrieval by pixel key (``th["key"]``) serves verification only: None without it."""
    verifying = cfg.verify != "none"
    auto = [cfg.dedup_threshold == "auto", cfg.leak_threshold == "auto",
            verifying and "auto" in (cfg.verify_threshold, cfg.verify_max_residual, cfg.key_threshold)]
    cal = None
    if any(auto) and qs.references:
        cal, reused = cached_calibration(models, qs.references, ref_feats, cache_dir, size=cfg.calibration_images,
                                         recall=cfg.copy_recall, verify=cfg.verify,
                                         min_neighbours=cfg.leak_neighbours, batch_size=cfg.batch_size,
                                         ref_keys=None if ref_keys is None else ref_keys.keys)
        print(f"curate: calibration {'reused' if reused else 'computed'}: leak {cal.leak_threshold:.4g} "
              f"dedup {cal.dedup_threshold:.4g} verify {_fmt(cal.verify_threshold)} "
              f"residual<={_fmt(cal.verify_max_residual)} key {_fmt(cal.pixel_threshold)}, "
              f"estimated false-positive rate {cal.false_positive_rate:.3g}", flush=True)

    def pick(value, calibrated, paper):
        if value != "auto":
            return value
        return calibrated if cal is not None else paper   # no references: nothing to calibrate on

    th = {"dedup": pick(cfg.dedup_threshold, cal and cal.dedup_threshold, 0.99),
          "leak": pick(cfg.leak_threshold, cal and cal.leak_threshold, 0.95),
          "verify": pick(cfg.verify_threshold, cal and cal.verify_threshold, 0.9) if verifying else None,
          "max_residual": pick(cfg.verify_max_residual, cal and cal.verify_max_residual, None) if verifying else None,
          "key": pick(cfg.key_threshold, cal and cal.pixel_threshold, None) if verifying else None,
          "verifier": cfg.verify,
          "neighbours": max(cfg.leak_neighbours, cal.neighbours if cal and verifying else 0),
          "key_neighbours": max(cfg.leak_neighbours, (cal.pixel_neighbours or 0) if cal and verifying else 0),
          "source": "calibrated" if all(auto[:2]) and cal else "given" if not any(auto) else "mixed"}
    th["rule"] = VerifyRule.of(th["verify"], th["max_residual"]) if verifying else None
    if th["rule"] is not None:   # stored as the rule stores it (no limit: None)
        th["max_residual"] = th["rule"].to_dict()["max_residual"]
    return th, cal


def _stacked(keys: dict[str, np.ndarray], ids) -> np.ndarray:
    """[len(ids), pixelkey.DIM] the pixel keys of these gallery images."""
    return np.stack([keys[str(i)] for i in ids]) if len(ids) else np.zeros((0, pixelkey.DIM), np.float32)


class _Verifier:
    """Verification matches of (gallery image, reference or gallery image) pairs, memoised across
    rounds; gallery images are read once each (as thumbnails), by shard."""

    def __init__(self, gindex, references: dict):
        self.gindex, self.references = gindex, references
        self.thumbs: dict[str, Thumb | None] = {}
        self.memo: dict[tuple[str, str], Match] = {}
        self.seconds = 0.0

    @property
    def count(self) -> int:
        return len(self.memo)

    def _thumb(self, iid: str, gallery: bool) -> Thumb | None:
        if iid not in self.thumbs:
            if gallery:
                self.prefetch([iid])
            else:
                self.thumbs[iid] = Thumb.of(self.references[iid].load())
        return self.thumbs[iid]

    def prefetch(self, gallery_ids) -> None:
        """Read these gallery images (by shard) before scoring them; unreadable ones score NaN."""
        missing = {str(i) for i in gallery_ids} - set(self.thumbs)
        if missing:
            t = time.perf_counter()
            found = read_originals(self.gindex, missing)
            for i in missing:
                self.thumbs[i] = Thumb.of(found[i]) if i in found else None
            self.seconds += time.perf_counter() - t

    def match(self, image_id: str, other_id: str, gallery: bool = False) -> Match:
        key = (image_id, other_id)
        if key not in self.memo:
            t = time.perf_counter()
            a, b = self._thumb(image_id, True), self._thumb(other_id, gallery)
            self.memo[key] = NO_MATCH if a is None or b is None else copy_match(a, b)
            self.seconds += time.perf_counter() - t
        return self.memo[key]


def _records(sel: Selection, rows, query_ids: list[str]) -> list[contract.TransferRecord]:
    out = []
    for i, (gid, row) in enumerate(zip(sel.ids, rows)):
        hits = [contract.QueryHit(query=query_ids[q], similarity=round(s, 6), rank=r) for q, r, s in sel.hits(i)]
        out.append(contract.TransferRecord(
            key=contract.transfer_key(row.id, row.crop), source_id=row.id, crop=row.crop, recipe=row.recipe,
            queries=hits, similarity=round(float(sel.scores[i]), 6) if np.isfinite(sel.scores[i]) else 0.0,
            rank=i))
    return out


def _write_report(out, cfg, qs, gindex, sel, records, filtered, leak_report, counts, specs, query_ids, th,
                  calibration):
    from curation.shards import load_thumbs

    by_query: dict[str, list[contract.TransferRecord]] = defaultdict(list)
    for rec in records:
        for h in rec.queries:
            by_query[h.query].append(rec)
    shown = rpt.ReportLimits()
    panels_q = list(by_query)[: shown.max_queries * 4]
    wanted = {(r.source_id, r.crop): r.recipe for q in panels_q
              for r in sorted(by_query[q], key=lambda r: r.rank)[:shown.max_per_query]}
    rejected = sorted(leak_report.rejected, key=lambda x: -np.nan_to_num(x.verify_score or 0.0))[
        :shown.max_rejected] if leak_report else []
    leak_imgs = [x.image_id for x in (leak_report.leaks + leak_report.cleared + tuple(rejected))] \
        if leak_report else []
    clusters = sorted(filtered.clusters({r.source_id for r in records}), key=len,
                      reverse=True)[:shown.max_clusters]
    cluster_imgs = {i for c in clusters for i, _ in c[:shown.max_cluster_members]}
    thumbs = load_thumbs(gindex, wanted, set(leak_imgs) | cluster_imgs)
    qimg = {q.id: q for q in qs.queries}
    label = {q.id: qs.classes[q.label] for q in qs.queries}
    panels = []
    for qid in panels_q:
        recs = sorted(by_query[qid], key=lambda r: next(h.rank for h in r.queries if h.query == qid))
        panels.append(rpt.QueryPanel(
            id=qid, class_name=label.get(qid, qid.removeprefix("text:")),
            image=qimg[qid].load() if qid in qimg else None,
            retrieved=[rpt.RetrievedItem(source_id=r.source_id, crop=r.crop,
                                         similarity=next(h.similarity for h in r.queries if h.query == qid),
                                         rank=next(h.rank for h in r.queries if h.query == qid),
                                         crop_image=thumbs["crops"].get((r.source_id, r.crop)),
                                         original_image=thumbs["originals"].get(r.source_id))
                       for r in recs[:shown.max_per_query]]))
    refs = {r.id: r for r in qs.references}
    leak_panels = []
    if leak_report:
        for leak, state in ([(x, "removed") for x in leak_report.leaks] + [(x, "cleared") for x in leak_report.cleared]
                            + [(x, "rejected") for x in rejected]):
            nbrs = list(zip(leak.neighbor_ids, leak.neighbor_similarity))[:shown.max_neighbours]
            if leak.verified_reference and leak.verified_reference not in dict(nbrs):
                k = leak.neighbor_ids.index(leak.verified_reference)   # the best-verifying one is always shown
                nbrs = nbrs[:-1] + [(leak.verified_reference, leak.neighbor_similarity[k])]
            leak_panels.append(rpt.LeakPanel(
                source_id=leak.image_id, image=thumbs["originals"].get(leak.image_id),
                max_similarity=leak.max_similarity,
                neighbours=[rpt.ReferenceMatch(id=i, similarity=s, image=refs[i].load() if i in refs else None,
                                               verified=i == leak.verified_reference)
                            for i, s in nbrs],
                crops_removed=filtered.leak_items.get(leak.image_id, 0) if state == "removed" else 0,
                unflagged=state == "cleared", review_note="marked not a leak on review" if state == "cleared" else "",
                verify_score=leak.verify_score, verify_residual=leak.verify_residual,
                key_similarity=leak.key_similarity, rejected=state == "rejected"))
    per_query, per_class = rpt.count_per_query_and_class(records, {q: label.get(q, q) for q in query_ids})
    data = rpt.ReportData(
        title=f"Curated transfer set: {qs.name}", query_set=qs.name, requested=cfg.size,
        retrieved=counts["retrieved"], removed_duplicates=counts["removed_duplicate"],
        removed_leaks=counts["removed_leak"], backfilled=counts["backfilled"], written=counts["written"],
        unreadable=counts["removed_unreadable"] + counts["unreadable_at_write"],
        thresholds={k: th[k] for k in ("dedup", "leak", "verify", "max_residual") if th[k] is not None},
        calibration=calibration.to_dict() if calibration else None,
        rejected_total=len(leak_report.rejected) if leak_report else 0,
        encoders=[s.name for s in specs],
        extra={"strategy": cfg.strategy, "depth k": counts["depth_k"], "verifier": th["verifier"],
               "thresholds from": th["source"], "references verified per candidate": th["neighbours"]},
        queries=panels, leaks=leak_panels,
        dedup_clusters=[rpt.DedupCluster([rpt.DedupMember(id=i, image=thumbs["originals"].get(i), kept=k)
                                          for i, k in c]) for c in clusters],
        per_query_counts=per_query, per_class_counts=per_class)
    rpt.write_report(out / contract.REPORT_FILE, data)
