"""`curate`: named query set + built index -> curated transfer set (WebDataset shards, manifest, report).

Steps (Vemulapalli et al. 2024, sec. 3.4 and Appendix B), each a named, resumable stage of
`curation.run.stages`:
  1. embed the query images with the index's own encoders (resize + centre crop);
  2. select N gallery crops with a strategy (query-balanced by default), deepening the search as needed;
  3. embed the references and set the thresholds (calibrated on them where "auto");
  4. embed the *original images* of the selected crops; decontaminate (max similarity to any image of
     the target dataset > leak threshold removes every crop of that image) and dedup (original images
     with mean similarity > dedup threshold form a cluster; one item per cluster survives); images that
     cannot be read are removed too; backfill: rerun the same strategy on the gallery minus the removed
     items, until stable, so the set holds exactly N (or says why not);
  5. re-materialise the crops from the gallery and write ``transfer-*.tar`` + ``queries-*.tar``
     atomically, then ``queries.json``, ``report.html`` and ``manifest.json`` (last).

A killed run rerun with the same config continues from its last finished stage (records under
``DIR/.curate/``) and writes the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from curation.changed import check_policy
from curation.decontam import read_review
from curation.querysets import query_set_dirs
from curation.run.stages import counts, pairs_per_second, run_stages, time_parts
from curation.selection import SELECTORS
from curation.thresholds import limit_text, limits_in_force
from curation.timing import most_time
from curation.verify import VERIFIERS
from index.core import contract
from index.core.atomic import CODE_VERSION, write_json
from index.core.config import check_fraction, check_integer
from index.core.errors import ConfigError, MissingInputError
from index.core.outdir import Owner, owned_dir, owning_also, pattern_dirs, pattern_regex
from index.gallery_index import check_gallery, read_index_manifest
from index.threads import HELP as THREADS_HELP

OWNER = Owner("curate", (pattern_regex(contract.TRANSFER_PATTERN), pattern_regex(contract.QUERIES_PATTERN),
                         re.escape(contract.QUERIES_DRAW_FILE), re.escape(contract.MANIFEST_FILE),
                         re.escape(contract.REPORT_FILE), re.escape(contract.STAGES_DIR)),
              done_record=contract.MANIFEST_FILE)


def parse_threshold(value: float | str, name: str = "threshold", low: float = -1.0, high: float = 1.0,
                    what: str = "a number in [-1, 1]") -> float | str:
    """"auto", or a number in [low, high] (strings from a CLI or a config file are converted)."""
    if isinstance(value, str):
        if value == "auto":
            return value
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be 'auto' or {what}; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{name} must be 'auto' or {what}; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CurateConfig:
    queries: str = field(metadata={"help": "named query set: eurosat_{5,10,25}shot, fashion_mnist_{5,10,25}shot, "
                                           "folder:PATH:Kshot (curation.querysets)"})
    index: str = field(metadata={"help": "index directory written by build-index"})
    size: int = field(metadata={"help": "N, the transfer-set size"})
    out: str = field(metadata={"help": "output directory"})
    strategy: str = field(default="query_balanced", metadata={
        "help": "selection strategy: query_balanced | best_matches | random | text (curation.selection)"})
    seed: int = field(default=0, metadata={"help": "query draw and random-drop seed"})
    data_root: str | None = field(default=None, metadata={"help": "where the query set's dataset lives"})
    dedup_threshold: float | str = field(default="auto", metadata={
        "help": "'auto' (calibrated for the index's encoders) or a mean cosine; the paper: 0.99 (1: off)"})
    leak_threshold: float | str = field(default="auto", metadata={
        "help": "'auto' (calibrated) or a max cosine over encoders; the paper: 0.95 (1: off, only pixel keys "
                "make candidates)"})
    verify: str = field(default="align", metadata={
        "help": "second signal that confirms copies among the candidates: align | none (threshold only)"})
    verify_threshold: float | str = field(default="auto", metadata={
        "help": "'auto' (calibrated) or a lower limit on the aligned correlation, in [-1, 1]"})
    verify_max_residual: float | str = field(default="auto", metadata={
        "help": "'auto' (calibrated) or an upper limit on the aligned grey-level residual (inf: none)"})
    key_threshold: float | str = field(default="auto", metadata={
        "help": "'auto' (calibrated) or a pixel key similarity above which an image is also a copy candidate, "
                "checked against its nearest references by pixel key (1: off)"})
    copy_recall: float = field(default=0.99, metadata={
        "help": "calibration target: recall of every kind of synthetic near-copy"})
    calibration_images: int = field(default=300, metadata={"help": "references sampled for calibration"})
    leak_neighbours: int = field(default=5, metadata={
        "help": "nearest references shown (and verified against) for each possible leak"})
    leak_review: str | None = field(default=None, metadata={
        "help": "JSON list of gallery image ids a person judged not to be leaks"})
    k0: int | None = field(default=None, metadata={
        "help": "first per-query search depth (default: from N and the query count)"})
    max_k: int | None = field(default=None, metadata={"help": "cap on the per-query search depth"})
    nprobe: int | None = field(default=None, metadata={
        "help": "IVF lists probed (default: the fastest operating point the index measured that reaches "
                "--recall-target at this run's depth)"})
    rerank: int | None = field(default=None, metadata={
        "help": "candidates re-scored exactly per result from the stored vectors, 0 for none (default: "
                "chosen with nprobe)"})
    recall_target: float | None = field(default=None, metadata={
        "help": "recall the operating point must reach at this run's depth (default: the index's "
                "faiss.recall_target)"})
    recall_sample_vectors: int = field(default=1_000_000, metadata={
        "help": "vectors in the sample of index groups searched exactly to estimate this run's recall"})
    shard_size: int = field(default=1000, metadata={"help": "samples per transfer shard"})
    jpeg_quality: int = field(default=95, metadata={"help": "JPEG quality of the written crops, 1-100"})
    batch_size: int = field(default=64, metadata={"help": "images per encoder forward"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda when present)"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "reference feature cache (default: ~/.cache/vfm-curate/features)"})
    executor: str = field(default="local", metadata={
        "help": "where original embedding, verification and crop materialisation run: local | ray"})
    num_workers: int | None = field(default=None, metadata={"help": "Ray actors (default: one per CPU)"})
    gallery_root: str | None = field(default=None, metadata={
        "help": "where the gallery is now, if it moved after indexing: the directory holding what the index's "
                "recorded gallery root held (each image is still checked against its indexed content hash)"})
    changed_images: str = field(default="refuse", metadata={
        "help": "a gallery image whose bytes changed since indexing: refuse (stop before writing, naming them) "
                "or skip (leave it out, counted in the manifest and summary) (curation.changed)"})
    threads: int | None = field(default=None, metadata={"help": THREADS_HELP})

    def __post_init__(self):
        SELECTORS.get(self.strategy)  # raises with the valid names
        check_policy(self.changed_images)
        for name in ("dedup_threshold", "leak_threshold", "verify_threshold", "key_threshold"):
            object.__setattr__(self, name, parse_threshold(getattr(self, name), name))
        object.__setattr__(self, "verify_max_residual", parse_threshold(
            self.verify_max_residual, "verify_max_residual", 0.0, math.inf,
            "a number of grey levels >= 0 (inf: no limit)"))
        if self.verify not in VERIFIERS:
            raise ConfigError(f"verify must be one of {', '.join(VERIFIERS)}; got {self.verify!r}")
        for name in ("size", "shard_size", "batch_size", "leak_neighbours", "calibration_images", "jpeg_quality"):
            check_integer(name, getattr(self, name), 1)
        check_integer("seed", self.seed, 0)
        for name in ("nprobe", "max_k", "k0", "num_workers", "threads"):
            check_integer(name, getattr(self, name), 1, optional=True)
        check_integer("rerank", self.rerank, 0, optional=True)
        check_integer("recall_sample_vectors", self.recall_sample_vectors, 1)
        check_fraction("recall_target", self.recall_target, optional=True)
        if not 0.0 < self.copy_recall < 1.0:
            raise ConfigError(f"copy_recall must be in (0, 1); got {self.copy_recall}")
        if self.calibration_images < 2:
            raise ConfigError(f"calibration_images must be >= 2; got {self.calibration_images}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must be in [1, 100]; got {self.jpeg_quality}")
        if self.executor not in ("local", "ray"):
            raise ConfigError(f"executor must be one of local, ray; got {self.executor!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def curate(cfg: CurateConfig, executor=None) -> dict[str, Any]:
    """Run (or resume) the curation stages into ``cfg.out``; returns the manifest.

    ``executor`` (`index.core.executor.Executor`) fans out original embedding, verification and crop
    materialisation; None runs them in this process (``cfg.executor`` must then be "local").
    The `curate` command prints ``summary_line(manifest, seconds)``.
    """
    inputs = check_inputs(cfg)
    # a feature cache kept inside the output is the run's own
    with owned_dir(cfg.out, owning_also(OWNER, cfg.out, [cfg.cache_dir]), inputs):
        return _curate(cfg, executor)


def check_inputs(cfg: CurateConfig) -> dict[str, list[str]]:
    """Refuse missing or malformed inputs before any work; returns what the run reads (the output
    may be neither equal to nor inside any of it)."""
    manifest = read_index_manifest(cfg.index)
    check_gallery(manifest, cfg.gallery_root)   # every shard where the index (or --gallery-root) says
    if cfg.leak_review:
        if not os.path.isfile(cfg.leak_review):
            raise MissingInputError(f"--leak-review file {cfg.leak_review} does not exist")
        read_review(cfg.leak_review)   # malformed: refused now, not after calibration
    if cfg.gallery_root:
        gallery = [cfg.gallery_root]
    else:
        gallery = pattern_dirs(manifest.get("config", {}).get("gallery")
                               or [s["source"]["path"] for s in manifest["shards"]])
    return {"--index": [cfg.index], "the gallery": gallery,
            "the query set's images": query_set_dirs(cfg.queries, cfg.data_root)}


def _curate(cfg: CurateConfig, executor) -> dict[str, Any]:
    st = run_stages(cfg, executor)
    t = time.perf_counter()
    timings = {k: round(v, 3) for k, v in st.timings.items()}
    timings["verify"] = round(st.verify_seconds, 3)
    rate = pairs_per_second(st.verified_pairs, st.verify_seconds)
    timings["verify_pairs_per_s"] = None if rate is None else round(rate, 1)
    # what this process and its workers read from gallery files (a resumed run: only what it redid)
    timings["gallery_reads"] = st.gindex.read_stats.to_dict()
    timings["stages"] = {k: {"seconds": round(v["seconds"], 3), "status": v["status"]}
                         for k, v in st.stage_status.items()}
    timings["parts"] = {k: round(v, 3) for k, v in time_parts(st).items()}
    gindex, qs, specs = st.gindex, st.qs, st.specs
    manifest = {
        "config": cfg.to_dict(),
        "query_set": {"name": qs.name, "seed": qs.seed, "classes": qs.classes, "num_queries": len(qs.queries),
                      "num_references": len(qs.references)},
        "index": {"path": str(gindex.root), "num_vectors": gindex.num_vectors,
                  "index_factory": gindex.manifest["index_factory"]},
        "search": {"operating_point": st.point, "recall": st.recall},
        "encoders": [s.to_dict() for s in specs],
        "seed": cfg.seed,
        "strategy": cfg.strategy,
        "thresholds": st.th.to_dict(),
        "calibration": st.calibration.to_dict() if st.calibration else None,
        "verified_pairs": st.verified_pairs,
        "counts": counts(st),
        "message": st.sel.message,
        "leaks": st.leak_report.to_dict() if st.leak_report else None,
        "shards": st.written["files"],
        "shardlist": {"transfer": st.written["shardlist"], "queries": st.written["query_shardlist"]},
        "format": contract.CURATED_FORMAT,
        "stages": dict(st.stage_fingerprints),
        "timings": timings,
        "code_version": CODE_VERSION,
    }
    timings["stages"]["manifest"] = {"seconds": round(time.perf_counter() - t, 3), "status": "computed"}
    write_json(st.out / contract.MANIFEST_FILE, manifest)
    return manifest


def summary_line(manifest: dict[str, Any], seconds: float) -> str:
    c = manifest["counts"]
    th = manifest["thresholds"]
    return (f"curate: {c['written']}/{c['requested']} written ({manifest['strategy']}, k={c['depth_k']}), "
            f"retrieved {c['retrieved']}, removed {c['removed_duplicate']} duplicate / {c['removed_leak']} leak / "
            f"{c['removed_unreadable']} unreadable"
            + (f" / {c['removed_changed']} changed since indexing" if c.get("removed_changed") else "")
            + f", backfilled {c['backfilled']}, "
            f"thresholds ({th.get('source', 'given')}) {_limits(th)}"
            + _recall(manifest) + _verified(manifest) + _reads(manifest)
            + f", {seconds:.1f} s" + most_time(manifest.get("timings", {}).get("parts") or {})
            + _stages(manifest)
            + (f" -- {manifest['message']}" if manifest.get("message") else ""))


def _recall(manifest: dict[str, Any]) -> str:
    """``, search recall@K 0.97 (estimated over G of H groups; nprobe P, rerank R)``, or nothing when
    nothing was searched; ``BELOW the target T`` where it is."""
    est = (manifest.get("search") or {}).get("recall")
    if not est:
        return ""
    point = manifest["search"]["operating_point"] or {}
    sample = est.get("sample")
    how = ("exact index" if sample is None else
           f"exact over all {sample['of_groups']} groups" if sample["groups"] == sample["of_groups"] else
           f"estimated over {sample['groups']} of {sample['of_groups']} groups")
    where = f"; nprobe {point['nprobe']}, rerank {point['rerank']}" if sample is not None else ""
    low = f", BELOW the target {est['target']}" if est.get("below_target") else ""
    return f", search recall@{est['k']} {est['recall']:.3f} ({how}{where}{low})"


def _limits(th: dict[str, Any]) -> str:
    """``dedup D leak L verify align V residual<=R key K``; a limit that is off says so: ``verify off``
    (and with it the residual and the pixel key, which serve verification), ``residual off``, ``key off``."""
    lim = limits_in_force(th)
    out = f"dedup {limit_text(lim['dedup'])} leak {limit_text(lim['leak'])} "
    if lim["verify"] is None:
        return out + "verify off"
    residual = "residual off" if lim["max_residual"] is None else f"residual<={limit_text(lim['max_residual'])}"
    return out + (f"verify {th.get('verifier', 'align')} {limit_text(lim['verify'])} {residual} "
                  f"key {limit_text(lim['key'])}")


def _verified(manifest: dict[str, Any]) -> str:
    n = manifest.get("verified_pairs")
    if not n:
        return ""
    rate = manifest.get("timings", {}).get("verify_pairs_per_s")
    return f", verified {n} pairs" + (f" ({rate:.0f}/s)" if rate else "")


def _reads(manifest: dict[str, Any]) -> str:
    r = manifest.get("timings", {}).get("gallery_reads")
    return f", read {r['bytes'] / 1e6:.1f} MB of {r['files']} gallery file(s)" if r and r.get("bytes") else ""


def _stages(manifest: dict[str, Any]) -> str:
    """Stage times; reused and recomputed stages say so."""
    st = manifest.get("timings", {}).get("stages")
    if not st:
        return ""
    parts = [f"{k} {v['seconds']:.1f}s" + ("" if v["status"] == "computed" else f" {v['status']}")
             for k, v in st.items()]
    return " [" + ", ".join(parts) + "]"

