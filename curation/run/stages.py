"""The stages of a curation run, in order, and the thin orchestrator that runs them.

    open            index, encoders (specs), query set, strategy            (not recorded)
    embed_queries   -> query vectors and ids
    retrieve        -> the first selection of N gallery crops
    references      -> thresholds in force (reference features, pixel keys, calibration)
    filter          -> final selection after decontamination / dedup / backfill rounds
    write           -> transfer-*.tar, queries-*.tar, queries.json, .curate/report-thumbs.tar
    report          -> report.html
    manifest        -> manifest.json, written last                          (not recorded)

Each recorded stage declares the config fields and upstream stages its result depends on;
its fingerprint covers those, the index manifest, the query set draw, the code version and, for the
write stage, the curated set's format (contract.CURATED_FORMAT: a set of an older one is rewritten). The
orchestrator loads a stage's record when the fingerprint matches (`curation.run.records`), else
computes it and commits the record; either way the stage's ``apply`` puts the record into the run
state, so a resumed run continues from exactly what an uninterrupted one had.

Why one module: the stage table is one ordered list, and each stage's compute and apply functions
sit beside the config fields and upstream stages it declares, so what a stage's fingerprint covers
can be checked against what it reads in one place; one module per stage would scatter that.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from curation import pixelkey, report_data as rpt
from curation.calibrate import Calibration
from curation.changed import changed_since_indexing
from curation.copydetect import CopyDetector
from curation.decontam import LeakReport, clear_reviewed, read_review
from curation.dedup import keep_one_per_cluster
from curation.features import embed_labeled
from curation.querysets import get_query_set
from curation.run.records import Record, StageStore
from curation.run.report_items import report_items
from curation.run.report_stage import query_classes, write_report_html
from curation.run.state import Filtered, RunState, selection_from_record, selection_to_record
from curation.run.workers import crops_worker, embed_original_images, originals_worker, write_transfer
from curation.selection import SELECTORS, Selection, class_prompts, class_text_queries, select_with_search
from curation.shards import read_originals, write_query_shards
from curation.thresholds import Thresholds, resolve_thresholds
from index.core import contract
from index.core.atomic import CODE_VERSION, canonical_json, file_digest, fingerprint, write_json
from index.core.errors import ConfigError, InputError
from index.core.executor import Executor, LocalExecutor
from index.gallery_index import GalleryIndex
from index.knn import combine_features
from index.recall import estimate_run, point_for

log = logging.getLogger(__name__)

KILL_ENV = "VFM_CURATE_KILL_AFTER"   # a stage name: the process exits right after committing it (tests)
KILL_EXIT_CODE = 86


@dataclass(frozen=True)
class Stage:
    name: str
    config_fields: tuple[str, ...]                 # CurateConfig fields the result depends on
    upstream: tuple[str, ...]                      # stages whose results it reads
    outputs: tuple[str, ...]                       # RunState fields it sets (and files it writes)
    compute: Callable[[RunState], Record]
    apply: Callable[[RunState, Record], None]
    outputs_intact: Callable[[RunState, Record], bool] = lambda st, rec: True
    output_format: int | None = None   # the format of the files it writes: another format recomputes it


# ---------------------------------------------------------------- open

def open_run(cfg, executor: Executor | None) -> RunState:
    if executor is None:
        if cfg.executor != "local":
            raise ConfigError(f"executor {cfg.executor!r} needs an executor passed in: "
                             f"curate(cfg, executor=jobs.executors.make_executor({cfg.executor!r}, ...)); "
                             "the curate CLI builds it")
        executor = LocalExecutor()
    out = Path(cfg.out)
    # the search runs as tasks over index groups on the executor (in-process too), so this process
    # opens no group and local and Ray runs merge the same per-task lists
    # a moved gallery (cfg.gallery_root) changes where its bytes are read, not what they must be (every
    # image is checked against its indexed content hash), so no stage fingerprint covers it
    gindex = GalleryIndex(cfg.index, executor=executor, gallery_root=cfg.gallery_root)
    specs = gindex.local_specs()          # refuses encoders whose weights differ from the index's
    qs = get_query_set(cfg.queries, cfg.data_root, cfg.seed)
    selector = SELECTORS.get(cfg.strategy)
    if selector.queries == "text":
        missing = [s.name for s in specs if not s.has_text_tower]
        if missing:
            raise ConfigError(f"strategy 'text' needs encoders with a text tower; {missing} have none. "
                             "Index with a CLIP encoder (open_clip ARCH.TAG) to use text queries.")
    base = {"code_version": CODE_VERSION, "index": fingerprint(gindex.manifest), "draw": qs.to_draw_dict(),
            "encoders": [s.identity() for s in specs]}
    out.mkdir(parents=True, exist_ok=True)
    st = RunState(cfg=cfg, out=out, executor=executor, gindex=gindex, specs=specs, qs=qs, selector=selector,
                  base_fingerprint=base)
    # by content: a reference changed under the same name makes every stage after it recompute
    base["references"] = fingerprint(list(zip(st.ref_ids, st.ref_hashes)))
    return st


# ---------------------------------------------------------------- embed queries

def _embed_queries(st: RunState) -> Record:
    if not st.selector.needs_search:
        return Record({"query_ids": []}, {"qfeat": np.zeros((0, sum(s.embed_dim for s in st.specs)), np.float32)})
    if st.selector.queries == "text":
        prompts = class_prompts(st.qs.classes)
        flat = [p for ps in prompts for p in ps]
        per_enc = []
        for m in st.models:
            f = m.encode_text(flat).float().cpu().numpy().reshape(len(prompts), len(prompts[0]), -1)
            per_enc.append(class_text_queries(f))
        return Record({"query_ids": [f"text:{c}" for c in st.qs.classes]}, {"qfeat": combine_features(per_enc)})
    feats = embed_labeled(st.models, st.qs.queries, st.cfg.batch_size)
    return Record({"query_ids": [q.id for q in st.qs.queries]}, {"qfeat": combine_features(feats)})


def _apply_queries(st: RunState, rec: Record) -> None:
    st.qfeat, st.query_ids = np.ascontiguousarray(rec.arrays["qfeat"], np.float32), list(rec.data["query_ids"])
    st.k0 = st.cfg.k0 or max(8, int(np.ceil(2 * st.cfg.size / max(1, len(st.query_ids)))))


# ---------------------------------------------------------------- retrieve

def _search(st: RunState, k: int):
    t = time.perf_counter()
    r = st.gindex.search(st.qfeat, k, st.point["nprobe"], rerank=st.point["rerank"])
    st.timings["search"] = st.timings.get("search", 0.0) + time.perf_counter() - t
    if st.deepest is None or k > st.deepest[2]:
        st.deepest = (r[0], r[1], k)
    return r


def _select(st: RunState, removed: np.ndarray) -> Selection:
    return select_with_search(functools.partial(_search, st), st.cfg.size, st.cfg.seed, st.selector, k0=st.k0,
                              num_gallery=st.gindex.num_vectors, removed=removed, max_k=st.cfg.max_k)


def _operating_point(st: RunState) -> dict[str, Any]:
    """The index's operating point for this run's first depth k0 (index.recall.point_for)."""
    cfg = st.cfg
    return point_for(st.gindex.manifest, st.k0, cfg.nprobe, cfg.rerank, cfg.recall_target)


def _retrieve(st: RunState) -> Record:
    st.point = _operating_point(st)
    flags, arrays = selection_to_record(_select(st, np.zeros(0, np.int64)), "")
    return Record({"selection": flags, "search": {"operating_point": st.point, "recall": _recall(st)}}, arrays)


def _recall(st: RunState) -> dict[str, Any] | None:
    """This run's search recall at its deepest k, estimated by exact search over a sample of index
    groups (index.recall.estimate_run); None when the strategy searched nothing."""
    if st.deepest is None:
        return None
    t = time.perf_counter()
    scores, ids, k = st.deepest
    est = estimate_run(st.gindex, st.qfeat, scores, ids, k, st.cfg.recall_sample_vectors, st.cfg.seed,
                       rerank=st.point["rerank"], target=st.point["target"])
    st.timings["estimate_recall"] = time.perf_counter() - t
    if est.get("below_target"):
        log.warning("this run's search recall@%d is about %.3f, below the target %.3f: pass --nprobe or --rerank "
                    "higher, or rebuild the index with more memory (faiss.memory_budget_gb)",
                    k, est["recall"], est["target"])
    return est


def _apply_retrieve(st: RunState, rec: Record) -> None:
    st.first = selection_from_record(rec.data["selection"], rec.arrays, "")
    search = rec.data.get("search") or {}
    st.point = search.get("operating_point") or _operating_point(st)
    st.recall = search.get("recall")


# ---------------------------------------------------------------- references

def _references(st: RunState) -> Record:
    t = time.perf_counter()
    _ = st.ref_feats, st.ref_keys   # computed here, or read from the feature cache
    st.timings["embed_references"] = time.perf_counter() - t
    t = time.perf_counter()
    th, cal = resolve_thresholds(st.cfg, st.models if _needs_models(st) else None, st.qs, st.ref_feats,
                                 st.ref_keys, st.cache.root)
    st.timings["calibrate"] = time.perf_counter() - t
    # the calibration as its cache stores it (keys sorted), whether computed now or read back
    return Record({"thresholds": th.to_dict(), "calibration": json.loads(canonical_json(cal.to_dict())) if cal else None})


def _needs_models(st: RunState) -> bool:
    cfg = st.cfg
    return "auto" in (cfg.dedup_threshold, cfg.leak_threshold, cfg.verify_threshold, cfg.verify_max_residual,
                      cfg.key_threshold) and bool(st.qs.references)


def _apply_references(st: RunState, rec: Record) -> None:
    st.th = Thresholds.from_dict(rec.data["thresholds"])
    st.calibration = Calibration.from_dict(rec.data["calibration"]) if rec.data["calibration"] else None


# ---------------------------------------------------------------- filter and backfill

def _stacked(keys: dict[str, np.ndarray], ids) -> np.ndarray:
    return np.stack([keys[str(i)] for i in ids]) if len(ids) else np.zeros((0, pixelkey.DIM), np.float32)


def _filter(st: RunState) -> Record:
    cfg, th, gindex = st.cfg, st.th, st.gindex
    refs = {r.id: r for r in st.qs.references}
    detector = CopyDetector(th, st.ref_ids, st.ref_feats, st.ref_keys if th.key is not None else None,
                            load_references=lambda ids: {i: refs[i].load() for i in ids},
                            load_gallery=lambda ids: read_originals(gindex, ids),
                            executor=st.executor, device=cfg.device)
    make_worker = functools.partial(originals_worker, str(gindex.root), gindex.gallery_root, st.specs, cfg.device,
                                    cfg.batch_size, cfg.verify != "none")
    review = set(read_review(cfg.leak_review)) if cfg.leak_review else set()
    sel, filtered = st.first, Filtered()
    orig: dict[str, list[np.ndarray]] = {}     # gallery image id -> per-encoder feature rows
    keys: dict[str, np.ndarray] = {}           # gallery image id -> pixel key
    unreadable_imgs: dict[str, str] = {}
    changed_imgs: set[str] = set()              # unreadable because the gallery changed since indexing
    leak_report, rounds, t_embed = None, 0, 0.0
    while True:
        rounds += 1
        img_of = np.array([r.id for r in gindex.rows(sel.ids)])
        new = sorted(set(img_of.tolist()) - set(orig) - set(unreadable_imgs))
        t = time.perf_counter()
        found = embed_original_images(st.executor, make_worker, gindex, new, orig,
                                      keys if cfg.verify != "none" else None)
        changed_imgs |= changed_since_indexing(found, cfg.changed_images, str(gindex.root))   # refuse: raises
        unreadable_imgs.update(found)
        t_embed += time.perf_counter() - t
        changed = {int(g) for g, i in zip(sel.ids, img_of) if i in changed_imgs}
        unreadable = {int(g) for g, i in zip(sel.ids, img_of) if i in unreadable_imgs} - changed
        ok = np.array([i not in unreadable_imgs and i in orig for i in img_of], dtype=bool)
        # decontamination over every original image seen so far (stable across rounds)
        seen = sorted(orig)
        per_enc = [np.stack([orig[i][e] for i in seen]) if seen else np.zeros((0, s.embed_dim), np.float32)
                   for e, s in enumerate(st.specs)]
        leak_report = detector.leaks(seen, per_enc, _stacked(keys, seen) if th.key is not None else None)
        if review:  # un-flag reviewed images among those seen so far; unknown ids are checked below
            leak_report = clear_reviewed(leak_report, review)
        leaked_imgs = {x.image_id for x in leak_report.leaks}
        leaks = {int(g) for g, i in zip(sel.ids, img_of) if i in leaked_imgs}
        # dedup among the surviving selected items (original-image level)
        alive = np.flatnonzero(ok & ~np.isin(img_of, list(leaked_imgs)))
        dups: set[int] = set()
        if alive.size:
            uniq, inv = np.unique(img_of[alive], return_inverse=True)
            labels = detector.duplicates(uniq, [np.stack([orig[i][e] for i in uniq]) for e in range(len(st.specs))],
                                         _stacked(keys, uniq) if th.key is not None else None)[inv]
            keep = keep_one_per_cluster(labels, alive)   # selection order = curated rank
            dups = {int(g) for g in sel.ids[alive[~keep]]}
            for lab in np.unique(labels[~keep]):
                filtered.link(sorted({str(img_of[alive[m]]) for m in np.flatnonzero(labels == lab)}))
        if not (unreadable | changed | leaks | dups):
            break
        filtered.unreadable |= unreadable
        filtered.changed |= changed
        filtered.leaks |= leaks
        for i in img_of:
            if i in leaked_imgs:
                filtered.leak_items[str(i)] = filtered.leak_items.get(str(i), 0) + 1
        filtered.duplicates |= dups
        sel = _select(st, filtered.all())
    st.timings["embed_originals"] = t_embed
    if review:
        unknown = sorted(review - {x.image_id for x in leak_report.cleared})
        if unknown:
            flagged = sorted(x.image_id for x in leak_report.leaks)
            raise InputError(
                f"{cfg.leak_review}: {len(unknown)} reviewed id(s) were not flagged as leaks in this run "
                f"(e.g. {unknown[:5]}); flagged ids: {flagged[:20]}{' ...' if len(flagged) > 20 else ''}")
    flags, arrays = selection_to_record(sel, "")
    return Record({"selection": flags, "filtered": filtered.to_dict(), "leaks": leak_report.to_dict(),
                   "rounds": rounds, "originals": sorted(set(orig) | set(unreadable_imgs)),   # images read
                   "verified_pairs": detector.pairs_verified,
                   "verify_seconds": detector.seconds}, arrays)


def _apply_filter(st: RunState, rec: Record) -> None:
    st.sel = selection_from_record(rec.data["selection"], rec.arrays, "")
    st.filtered = Filtered.from_dict(rec.data["filtered"])
    st.leak_report = LeakReport.from_dict(rec.data["leaks"])
    st.rounds, st.verified_pairs = rec.data["rounds"], rec.data["verified_pairs"]
    st.verify_seconds = rec.data["verify_seconds"]


# ---------------------------------------------------------------- write

def transfer_records(sel: Selection, rows, query_ids: list[str]) -> list[contract.TransferRecord]:
    out = []
    for i, (gid, row) in enumerate(zip(sel.ids, rows)):
        hits = [contract.QueryHit(query=query_ids[q], similarity=round(s, 6), rank=r) for q, r, s in sel.hits(i)]
        out.append(contract.TransferRecord(
            key=contract.transfer_key(row.id, row.crop), source_id=row.id, crop=row.crop, recipe=row.recipe,
            queries=hits, similarity=round(float(sel.scores[i]), 6) if np.isfinite(sel.scores[i]) else 0.0,
            rank=i))
    return out


def _output_files(st: RunState) -> list[str]:
    return sorted(p.name for p in st.out.glob("*-*.tar")) + [contract.QUERIES_DRAW_FILE, contract.REPORT_THUMBS_FILE]


def _write(st: RunState) -> Record:
    records = transfer_records(st.sel, st.gindex.rows(st.sel.ids), st.query_ids)
    limits = rpt.ReportLimits()
    shown = report_items(records, st.leak_report, st.filtered, query_classes(st), limits)
    written = write_transfer(st.out, st.gindex, records, st.cfg.shard_size, st.executor,
                             functools.partial(crops_worker, str(st.gindex.root), st.gindex.gallery_root,
                                               st.cfg.jpeg_quality, limits.thumb_size),
                             thumb_keys=shown.crop_keys(),
                             thumb_originals=shown.original_ids() & {r.source_id for r in records},
                             on_unreadable=lambda found: changed_since_indexing(
                                 found, st.cfg.changed_images, str(st.gindex.root)))
    written["query_shardlist"] = write_query_shards(st.out, st.qs)
    write_json(st.out / contract.QUERIES_DRAW_FILE, st.qs.to_draw_dict())
    return Record({"written": written, "digests": {f: file_digest(st.out / f) for f in _output_files(st)}})


def _digests_match(st: RunState, rec: Record, key: str = "digests") -> bool:
    want = rec.data[key]
    return all((st.out / f).is_file() and file_digest(st.out / f) == d for f, d in want.items())


def _write_intact(st: RunState, rec: Record) -> bool:
    return _digests_match(st, rec) and set(_output_files(st)) == set(rec.data["digests"])


def _apply_write(st: RunState, rec: Record) -> None:
    st.records = transfer_records(st.sel, st.gindex.rows(st.sel.ids), st.query_ids)
    st.written = rec.data["written"]


# ---------------------------------------------------------------- report

def counts(st: RunState) -> dict[str, Any]:
    first_ids = set(st.first.ids.tolist())
    f, w = st.filtered, st.written
    c = {"requested": st.cfg.size, "retrieved": len(st.first),
         "removed_duplicate": len(f.duplicates & first_ids), "removed_leak": len(f.leaks & first_ids),
         "removed_unreadable": len(f.unreadable & first_ids), "removed_changed": len(f.changed & first_ids),
         "backfilled": len(set(st.sel.ids.tolist()) - first_ids),
         "written": w["written"], "unreadable_at_write": w["unreadable"], "rounds": st.rounds,
         "exhausted": bool(st.sel.exhausted), "depth_k": int(st.sel.k)}
    assert c["retrieved"] - c["removed_duplicate"] - c["removed_leak"] - c["removed_unreadable"] \
        - c["removed_changed"] + c["backfilled"] - c["unreadable_at_write"] == c["written"]
    return c


def time_parts(st: RunState) -> dict[str, float]:
    """Where this run's time went, finer than its stages (only the stages it computed): reference
    embedding and calibration within references, original embedding and verification within filter."""
    status = st.stage_status
    ran = {k: v["seconds"] for k, v in status.items() if v["status"] != "reused"}
    parts: dict[str, float] = {}
    if "references" in ran:
        parts["embed references"] = st.timings.get("embed_references", 0.0)
        parts["calibrate"] = st.timings.get("calibrate", 0.0)
        parts["references (other)"] = ran.pop("references") - parts["embed references"] - parts["calibrate"]
    if "filter" in ran:
        parts["embed originals"] = st.timings.get("embed_originals", 0.0)
        parts["verify pairs"] = st.verify_seconds
        parts["filter (search, decontamination, dedup)"] = ran.pop("filter") - parts["embed originals"] \
            - parts["verify pairs"]
    parts.update({k.replace("_", " "): v for k, v in ran.items()})
    return {k: max(0.0, v) for k, v in parts.items()}


def _report(st: RunState) -> Record:
    write_report_html(st, counts(st), time_parts(st))
    return Record({"digests": {contract.REPORT_FILE: file_digest(st.out / contract.REPORT_FILE)}})


# ---------------------------------------------------------------- the run

_THRESHOLD_FIELDS = ("dedup_threshold", "leak_threshold", "verify", "verify_threshold", "verify_max_residual",
                     "key_threshold", "copy_recall", "calibration_images", "leak_neighbours")

STAGES: tuple[Stage, ...] = (
    Stage("embed_queries", ("strategy", "batch_size", "device"), (), ("qfeat", "query_ids", "k0"),
          _embed_queries, _apply_queries),
    Stage("retrieve", ("size", "strategy", "seed", "k0", "max_k", "nprobe", "rerank", "recall_target",
                       "recall_sample_vectors"), ("embed_queries",), ("first", "point", "recall"),
          _retrieve, _apply_retrieve),
    Stage("references", _THRESHOLD_FIELDS + ("batch_size", "device"), (), ("th", "calibration"),
          _references, _apply_references),
    Stage("filter", ("leak_review", "batch_size", "device", "size", "seed", "max_k", "nprobe", "rerank",
                     "recall_target", "changed_images"),
          ("retrieve", "references"),
          ("sel", "filtered", "leak_report", "rounds", "verified_pairs", "verify_seconds"), _filter, _apply_filter),
    Stage("write", ("shard_size", "jpeg_quality", "changed_images"), ("filter",),
          ("records", "written", "transfer-*.tar", "queries-*.tar", contract.QUERIES_DRAW_FILE,
           contract.REPORT_THUMBS_FILE),
          _write, _apply_write, _write_intact, output_format=contract.CURATED_FORMAT),
    Stage("report", (), ("write",), (contract.REPORT_FILE,), _report, lambda st, rec: None, _digests_match),
)


def describe() -> str:
    """Each stage's contract, one line each (config fields, upstream stages, outputs)."""
    return "\n".join(f"{s.name}: config {list(s.config_fields)}, after {list(s.upstream)}, -> {list(s.outputs)}"
                     for s in STAGES)
STAGE_NAMES = ("open",) + tuple(s.name for s in STAGES) + ("manifest",)


def stage_fingerprint(st: RunState, stage: Stage) -> str:
    cfg = st.cfg
    inputs: dict[str, Any] = {"stage": stage.name, "base": st.base_fingerprint,
                              "config": {f: getattr(cfg, f) for f in stage.config_fields},
                              "upstream": {u: st.stage_fingerprints[u] for u in stage.upstream}}
    if "leak_review" in stage.config_fields and cfg.leak_review:
        inputs["review"] = sorted(read_review(cfg.leak_review))   # the file's content, not its name
    if stage.output_format is not None:
        inputs["format"] = stage.output_format
    return fingerprint(inputs)


def after_stage(name: str) -> None:
    """Called after each stage is committed; ``VFM_CURATE_KILL_AFTER=<stage>`` exits the process
    there, as a crash would (tests of resume)."""
    if os.environ.get(KILL_ENV) == name:
        os._exit(KILL_EXIT_CODE)


def run_stages(cfg, executor: Executor | None = None) -> RunState:
    """Open the run, then every recorded stage in order (reused, computed or recomputed)."""
    t = time.perf_counter()
    st = open_run(cfg, executor)
    st.stage_status["open"] = {"seconds": time.perf_counter() - t, "status": "computed"}
    after_stage("open")
    store = StageStore(st.out)
    for stage in STAGES:
        t = time.perf_counter()
        fp = stage_fingerprint(st, stage)
        rec, found = store.load(stage.name, fp)
        if rec is not None and not stage.outputs_intact(st, rec):
            rec, found = None, "outputs changed"
        if rec is None:
            store.save(stage.name, fp, stage.compute(st))
            rec, _ = store.load(stage.name, fp)   # go on from what a resumed run would read
            status = "computed" if found == "absent" else f"recomputed ({found} record)"
        else:
            status = "reused"
        stage.apply(st, rec)
        st.stage_fingerprints[stage.name] = fp
        st.stage_status[stage.name] = {"seconds": time.perf_counter() - t, "status": status}
        after_stage(stage.name)
    return st


def pairs_per_second(pairs: int, seconds: float) -> float | None:
    return None if not pairs or seconds <= 0 or not math.isfinite(seconds) else pairs / seconds
