"""Quality ablation: does curated retrieval help distillation, and by how much?

On the demo gallery (Fashion-MNIST in-domain pool with hidden labels, planted test leaks, several
times as many out-of-domain photo and stamp crops; ``truth.json`` holds what the pipeline never sees):

- retrieval: precision of each curated set (share of in-domain items by truth.json) next to the
  gallery's base rate (share of in-domain gallery vectors), and the per-class counts of its in-domain
  items with two class-balance measures (normalised entropy, max/min ratio), for the strategies
  query_balanced, best_matches and random, at every transfer-set size and seed;
- distillation: student test accuracy for labels_only (the 10-shot labelled set only), KD on a random
  gallery subset, KD on the curated (query_balanced) set, AFT on the curated set, each at every size,
  and KD on the whole in-domain pool (every pool image, whole-image crop: the upper reference).
The random set is a seeded random subset of gallery crops with the planted leaks removed (what
decontamination does; no dedup), written in the same contract format as a curated set.

Every transfer run gets the same number of transfer steps whatever the set size, so the comparison
across sizes is about the data, not the compute (paper: Vemulapalli et al. 2024, Figure 5). Seeds
are training seeds and the random subsets' seeds; curate's own seed also draws the queries, so the
curated sets are made once at seed 0 (query_balanced's seed only breaks ties among equal ranks). The hyper-parameters are the demo's,
not tuned here. The teacher (a linear probe on the labelled set, deterministic) is evaluated on the
test split once; its transfer-set outputs are cached across runs and reruns.

Prints one JSON object (fractions; means over seeds at the largest size at top level, everything in
``details``) and writes a plot of test accuracy against transfer-set size.

    python bench/quality.py --quick      # demo-data/idx reused read-only if present; < 20 min on 2 cores
    python bench/quality.py              # a larger gallery (--pool 5000), sizes 500..4000, full test split
    python bench/quality.py --smoke      # seconds: the tests' tiny fixture gallery and task, tiny models, a temp dir
                                         # (checks the script runs; its figures mean nothing)
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index.core.allocator import tune_allocator
from curation.pipeline import CurateConfig, curate
from curation.querysets import get_query_set
from curation.shards import write_query_shards, write_transfer_shards
from distill.adaptation import prepare_teacher
from distill.caching import CACHES_FILE, prepare_caches
from distill.config import DistillConfig
from distill.data import ShardSet, load_labelled, test_batches, transfer_shards
from distill.evaluate import evaluate
from distill.methods import phases
from distill.students import build_student, student_resolution
from distill.training import train_student
from index.core import contract
from index.core.atomic import read_json, write_json
from index.core.config import from_mapping
from index.device import pick_device
from index.gallery_index import GalleryIndex

ROOT = Path(__file__).resolve().parent.parent
QUERIES = "fashion_mnist_10shot"
STRATEGIES = ("query_balanced", "best_matches", "random")
# the paper's fixed copy thresholds: the benchmark compares selection strategies, and the calibrated
# default with verification (as in `make demo`) would add minutes to each of its many curate runs
PAPER_RULE = dict(dedup_threshold=0.99, leak_threshold=0.95, verify="none")
TEACHER, TEACHER_SIZE, STUDENT, RESOLUTION = "efficientnet_lite0", 96, "mobilenetv3_small_050", 64


# ------------------------------------------------------------------ gallery and truth

def prepare_gallery(data: Path, index: Path | None, pool: int) -> tuple[Path, dict[str, dict]]:
    """(index dir, truth by gallery image id): an existing index read-only, or a gallery built here."""
    if index is not None:
        truth = index.parent / "truth.json"
        if not truth.is_file():
            raise FileNotFoundError(f"{truth} not found next to the index {index}")
        src, dst = index.parent / "feature-cache", data / "feature-cache"   # a copy: the source is left untouched
        if src.is_dir() and not dst.exists():
            shutil.copytree(src, dst)
        return index, read_json(truth)
    from index.build import build_gallery_index
    from index.config import load_index_config
    from jobs.demo_gallery import build_demo_gallery

    build_demo_gallery(data, pool=pool)
    idx = data / "idx"
    if not (idx / contract.MANIFEST_FILE).is_file():
        build_gallery_index(load_index_config(ROOT / "jobs" / "demo.yaml", gallery=str(data / "gallery" / "*.tar")),
                            idx)
    return idx, read_json(data / "truth.json")


def prepare_smoke_gallery(data: Path) -> tuple[Path, dict[str, dict], str]:
    """(index dir, truth, query set name) for --smoke: the tests' tiny fixture (tests/fixtures_gallery.py,
    three pattern classes, planted duplicates and leaks, distractors) indexed with `test-tiny-timm`.
    Fashion-MNIST and the demo gallery are not needed."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_gallery import CLASSES, build_fixture, write_index_config
    from index.build import build_gallery_index
    from index.config import load_index_config

    fx = build_fixture(data / "fixture")
    idx = data / "idx"
    cfg = write_index_config(data / "idx.yaml", str(fx.gallery / "*.tar"), ["test-tiny-timm"], crop_size=64,
                             crops_per_image=2)
    with contextlib.redirect_stdout(sys.stderr):
        build_gallery_index(load_index_config(cfg), idx)
    truth: dict[str, dict] = {}
    for iid in fx.leaks:
        truth[iid] = {"domain": "leak", "label": -1}
    for iid in fx.distractors:
        truth[iid] = {"domain": "out", "label": -1}
    gindex = GalleryIndex(idx)
    for r in gindex.rows(np.arange(gindex.num_vectors)):
        if r.id in truth:
            continue
        key = r.id.split("/", 1)[1]
        label = next((c for c, name in enumerate(CLASSES) if key.startswith(f"pool_{name}_")), 0)
        truth[r.id] = {"domain": "in", "label": label}   # pool members, the duplicates (class 0), the look-alike
    return idx, truth, fx.query_set


def curated_sources(transfer_dir: Path) -> list[str]:
    """Gallery image ids of a transfer set's items, read from its shards' json records."""
    out = []
    for shard in transfer_shards(transfer_dir):
        with tarfile.open(shard) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    out.append(json.load(tf.extractfile(m))["source_id"])
    return out


def class_balance(counts: list[int]) -> dict[str, Any]:
    c = np.asarray(counts, dtype=np.float64)
    p = c[c > 0] / c.sum() if c.sum() else np.zeros(0)
    entropy = float(-(p * np.log(p)).sum() / math.log(len(c))) if p.size else 0.0
    return {"per_class": [int(x) for x in c], "normalised_entropy": round(entropy, 4),
            "max_min_ratio": round(float(c.max() / c.min()), 3) if c.min() > 0 else None,
            "empty_classes": int((c == 0).sum())}


def retrieval_stats(transfer_dir: Path, truth: dict[str, dict], num_classes: int) -> dict[str, Any]:
    src = curated_sources(transfer_dir)
    missing = sum(1 for s in src if s not in truth)
    if missing:
        raise KeyError(f"{missing} items of {transfer_dir} have no entry in truth.json")
    dom = [truth[s]["domain"] for s in src]
    per_class = [0] * num_classes
    for s in src:
        if truth[s]["domain"] == "in":
            per_class[truth[s]["label"]] += 1
    return {"items": len(src), "precision": round(dom.count("in") / max(1, len(src)), 4),
            "leaks": dom.count("leak"), "balance": class_balance(per_class)}


def write_pool_transfer(out: Path, gindex: GalleryIndex, truth: dict[str, dict], qs) -> int:
    """Every in-domain pool image (crop 0, the whole image) as a transfer set in the contract format."""
    if (out / contract.MANIFEST_FILE).is_file():
        return read_json(out / contract.MANIFEST_FILE)["counts"]["written"]
    rows = gindex.rows(np.arange(gindex.num_vectors))
    recs = [contract.TransferRecord(key=contract.transfer_key(r.id, r.crop), source_id=r.id, crop=r.crop,
                                    recipe=r.recipe, rank=i)
            for i, r in enumerate(r for r in rows if r.crop == 0 and truth[r.id]["domain"] == "in")]
    out.mkdir(parents=True, exist_ok=True)
    res = write_transfer_shards(out, gindex, recs, shard_size=1000)
    write_query_shards(out, qs)
    write_json(out / contract.QUERIES_DRAW_FILE, qs.to_draw_dict())
    write_json(out / contract.MANIFEST_FILE, {"kind": "whole in-domain pool", "counts": {
        "pool_images": len(recs), "written": res.written, "unreadable": res.unreadable}})
    return res.written


def memoise_curation_features() -> None:
    """Within this process, keep the encoders and the features of queries and gallery originals across
    the many curate() calls (they are deterministic per model and image); curate's outputs are unchanged."""
    import curation.features as features
    import curation.run.stages as stages
    import curation.run.state as state
    import curation.run.workers as workers
    import index.encoders as encoders

    users = (state, stages, workers)   # the modules that call these three by name
    build, embed_labeled, embed_originals = encoders.build_encoder, features.embed_labeled, features.embed_originals
    models: dict[tuple[str, str], Any] = {}
    labeled: dict[tuple, list[np.ndarray]] = {}
    originals: dict[str, list[np.ndarray]] = {}
    pixel_keys: dict[str, np.ndarray] = {}
    seen_ctx: dict[str, tuple] = {}   # one index and one encoder list per process
    unreadable: dict[str, str] = {}

    def build_memo(spec, device="cpu"):
        key = (spec.name, str(device))
        if key not in models:
            models[key] = build(spec, device)
        return models[key]

    def labeled_memo(ms, items, *args, **kwargs):
        key = (tuple(m.spec.name for m in ms), tuple(it.id for it in items))
        if key not in labeled:
            labeled[key] = embed_labeled(ms, items, *args, **kwargs)
        return labeled[key]

    sig = inspect.signature(embed_originals)

    def originals_memo(*args, **kwargs):
        # embed_originals' own signature binds the call, so every argument it has (and any it gains)
        # is forwarded as given; only the images and their outputs (`into`, `keys_into`) are memoised
        call = sig.bind(*args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        ctx = (str(a["gindex"].root), tuple(m.spec.name for m in a["models"]))
        if seen_ctx.setdefault("ctx", ctx) != ctx:
            raise RuntimeError(f"memoised originals belong to {seen_ctx['ctx']}; asked for {ctx}")
        image_ids, into, keys_into = list(a["image_ids"]), a["into"], a.get("keys_into")
        want_keys = keys_into is not None
        new = [i for i in image_ids if i not in unreadable
               and (i not in originals or (want_keys and i not in pixel_keys))]
        if new:
            a["image_ids"], a["into"] = new, {}
            if want_keys:
                a["keys_into"] = {}
            unreadable.update(embed_originals(*call.args, **call.kwargs))
            originals.update(a["into"])
            if want_keys:
                pixel_keys.update(a["keys_into"])
        for i in image_ids:
            if i in originals:
                into[i] = originals[i]
            if want_keys and i in pixel_keys:
                keys_into[i] = pixel_keys[i]
        return {i: unreadable[i] for i in image_ids if i in unreadable}

    memo = {"build_encoder": build_memo, "embed_labeled": labeled_memo, "embed_originals": originals_memo}
    for module in users:
        for name, fn in memo.items():
            if hasattr(module, name):
                setattr(module, name, fn)


def write_random_transfer(out: Path, gindex: GalleryIndex, truth: dict[str, dict], qs, size: int, seed: int) -> int:
    """A seeded random subset of gallery crops (curation.selection.random_select), planted leaks removed
    as decontamination would; no dedup. Written in the contract format like a curated set."""
    from curation.selection import random_select

    if (out / contract.MANIFEST_FILE).is_file():
        return read_json(out / contract.MANIFEST_FILE)["counts"]["written"]
    rows = gindex.rows(np.arange(gindex.num_vectors))
    leaks = np.array([g for g, r in enumerate(rows) if truth[r.id]["domain"] == "leak"], dtype=np.int64)
    ids = np.sort(random_select(gindex.num_vectors, size, seed, leaks))
    recs = [contract.TransferRecord(key=contract.transfer_key(rows[g].id, rows[g].crop), source_id=rows[g].id,
                                    crop=rows[g].crop, recipe=rows[g].recipe, rank=i) for i, g in enumerate(ids)]
    out.mkdir(parents=True, exist_ok=True)
    res = write_transfer_shards(out, gindex, recs, shard_size=1000)
    write_query_shards(out, qs)
    write_json(out / contract.QUERIES_DRAW_FILE, qs.to_draw_dict())
    write_json(out / contract.MANIFEST_FILE, {"kind": "random gallery subset", "seed": seed, "counts": {
        "requested": size, "leaks_excluded": int(leaks.size), "written": res.written,
        "unreadable": res.unreadable}})
    return res.written


# ------------------------------------------------------------------ distillation

def distill(cfg: DistillConfig, test: list, eval_teacher: bool) -> dict[str, Any]:
    """run_distill's steps, with the teacher's test evaluation only where asked (it is the same
    deterministic probe in every run). Reuses OUT/metrics.json when its config matches."""
    out = Path(cfg.out)
    done = out / "metrics.json"
    if done.is_file():
        m = read_json(done)
        same = from_mapping(DistillConfig, m["config"]).training_fingerprint() == cfg.training_fingerprint()
        if same and (m.get("teacher_accuracy") is not None or not eval_teacher):
            return m
        raise ValueError(f"{done} was written with a different config; remove {out} to rerun")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    device = torch.device(pick_device(cfg.device))
    ls = load_labelled(cfg.transfer)
    shards = transfer_shards(cfg.transfer)
    shardset = ShardSet.scan(shards) if "transfer" in phases(cfg.method, cfg, bool(shards)) else None
    m: dict[str, Any] = {"method": cfg.method, "teacher_accuracy": None, "teacher_weights_hash": None}
    teacher = None
    if cfg.method != "labels_only":
        teacher, info = prepare_teacher(cfg, ls, device)
        m["teacher_weights_hash"] = info["weights_hash"]
        if eval_teacher:
            ev = evaluate(teacher, test_batches(test, teacher.spec.image_size, cfg.eval_batch_size), ls.classes,
                          device)
            m["teacher_accuracy"] = ev["accuracy"]
    write_json(out / CACHES_FILE, prepare_caches(cfg, ls, shardset, teacher, device))
    del teacher
    train = train_student(cfg)
    resolution = student_resolution(cfg.student, cfg.resolution)
    student = build_student(cfg.student, len(ls.classes), resolution=resolution)
    student.load_state_dict(torch.load(out / "student.pt", map_location="cpu", weights_only=True))
    ev = evaluate(student.to(device), test_batches(test, resolution, cfg.eval_batch_size), ls.classes, device)
    m.update(test_accuracy=ev["accuracy"], num_test=ev["num_test"], num_transfer=shardset.count if shardset else 0,
             skipped=train["skipped"], seconds=round(time.perf_counter() - t0, 1), config=cfg.to_dict())
    write_json(done, m)
    return m


def stratified_test(qs, limit: int | None) -> list:
    """The test split, or its first limit/num_classes items of every class (a fixed subset, no tuning)."""
    if limit is None or limit >= len(qs.test):
        return list(qs.test)
    per = limit // len(qs.classes)
    taken: dict[int, int] = {}
    out = []
    for it in qs.test:
        if taken.get(it.label, 0) < per:
            taken[it.label] = taken.get(it.label, 0) + 1
            out.append(it)
    return out


# ------------------------------------------------------------------ report

def mean_std(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {"mean": round(float(a.mean()), 4), "std": round(float(a.std(ddof=1)) if a.size > 1 else 0.0, 4),
            "n": int(a.size)}


def plot(path: Path, sizes: list[int], acc: dict[str, dict[int, list[float]]], refs: dict[str, list[float]],
         teacher: float | None, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, by_size in acc.items():
        xs = [s for s in sizes if by_size.get(s)]
        if xs:
            ax.errorbar(xs, [100 * np.mean(by_size[s]) for s in xs],
                        yerr=[100 * np.std(by_size[s], ddof=1) if len(by_size[s]) > 1 else 0 for s in xs],
                        marker="o", capsize=3, label=name)
    styles = iter(["--", ":", "-."])
    for name, vals in refs.items():
        ax.axhline(100 * np.mean(vals), ls=next(styles), color="grey" if "labels" in name else "black",
                   label=f"{name} ({100 * np.mean(vals):.1f}%)")
    if teacher is not None:
        ax.axhline(100 * teacher, ls="-", color="tab:red", alpha=0.5, label=f"teacher ({100 * teacher:.1f}%)")
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.set_xlabel("transfer-set size N")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="demo index reused, sizes 250/1000, short schedule")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds: tiny fixture gallery and models in a temp dir (a run check, not figures)")
    ap.add_argument("--data", default=None, help="working directory (default /tmp/quality-data[-quick])")
    ap.add_argument("--index", default=None, help="existing index (read-only; truth.json next to it)")
    ap.add_argument("--pool", type=int, default=None, help="in-domain pool of a gallery built here")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--transfer-steps", type=int, default=None, help="transfer steps of every KD/AFT run")
    ap.add_argument("--finetune-epochs", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None, help="evaluate on a stratified test subset")
    ap.add_argument("--aft-all-sizes", action="store_true", help="AFT at every size (default: full mode only)")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine more threads oversubscribe and "
                         "run several times slower; 0 leaves torch's default)")
    a = ap.parse_args(argv)
    q = a.quick or a.smoke
    smoke = a.smoke
    data = Path(a.data or (tempfile.mkdtemp(prefix="bench-quality-smoke-") if smoke
                           else "/tmp/quality-data-quick" if q else "/tmp/quality-data"))
    queries = QUERIES
    teacher, teacher_size, student, resolution = TEACHER, TEACHER_SIZE, STUDENT, RESOLUTION
    if smoke:
        teacher, teacher_size, student, resolution = "test-tiny-timm", None, "test-tiny-student", 32
    demo_idx = ROOT / "demo-data" / "idx"
    index = Path(a.index) if a.index else (demo_idx if q and (demo_idx / contract.MANIFEST_FILE).is_file() else None)
    sizes = sorted(a.sizes or ([8, 16] if smoke else [250, 1000] if q else [500, 1000, 2000, 4000]))
    seeds = list(range(1 if smoke and a.seeds == 3 else a.seeds))
    steps = a.transfer_steps or (2 if smoke else 250 if q else 1250)
    ft_epochs = a.finetune_epochs or (1 if smoke else 10 if q else 20)
    test_limit = a.test_limit if a.test_limit is not None else (None if smoke else 2000 if q else None)
    aft_sizes = sizes if (a.aft_all_sizes or not q) else sizes[-1:]
    plot_path = Path(a.plot) if a.plot else (data / "quality_smoke.png" if smoke else
                                             ROOT / "bench" / "results" / f"quality{'_quick' if q else ''}.png")
    if a.threads:
        torch.set_num_threads(a.threads)
    data.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    if smoke and a.index is None:
        idx, truth, queries = prepare_smoke_gallery(data)
    else:
        idx, truth = prepare_gallery(data, index, a.pool or 5000)
    timings["gallery"] = time.perf_counter() - t
    gindex = GalleryIndex(idx)
    qs = get_query_set(queries, seed=0)
    ncls = len(qs.classes)
    test = stratified_test(qs, test_limit)
    vec_dom = [truth[r.id]["domain"] for r in gindex.rows(np.arange(gindex.num_vectors))]
    base_rate = vec_dom.count("in") / len(vec_dom)
    pool_images = sum(1 for v in truth.values() if v["domain"] == "in")
    if sizes[-1] > pool_images:
        print(f"note: largest size {sizes[-1]} exceeds the in-domain pool ({pool_images} images)", file=sys.stderr)

    # curation
    t = time.perf_counter()
    memoise_curation_features()
    retrieval: dict[str, dict[int, dict[int, dict]]] = {s: {} for s in STRATEGIES}
    cache_dir = str(data / "feature-cache")
    for size in sizes:
        for strategy in STRATEGIES:
            # curate's seed also draws the queries (kept at 0); random subsets vary with the seed
            for seed in seeds if strategy == "random" else [0]:
                out = data / "curated" / f"{strategy}-n{size}-s{seed}"
                if strategy == "random":
                    write_random_transfer(out, gindex, truth, qs, size, seed)
                elif not (out / contract.MANIFEST_FILE).is_file():
                    with contextlib.redirect_stdout(sys.stderr):   # stdout is the JSON result alone
                        curate(CurateConfig(queries=queries, index=str(idx), size=size, out=str(out), strategy=strategy,
                                            seed=seed, cache_dir=cache_dir, **PAPER_RULE))
                st = retrieval_stats(out, truth, ncls)
                st["written"] = read_json(out / contract.MANIFEST_FILE)["counts"]["written"]
                retrieval[strategy].setdefault(size, {})[seed] = st
    pool_dir = data / "curated" / "pool"
    pool_written = write_pool_transfer(pool_dir, gindex, truth, qs)
    timings["curate"] = time.perf_counter() - t

    # distillation
    base = dict(queries=queries, teacher=teacher, teacher_image_size=teacher_size, student=student,
                resolution=resolution, transfer_steps=steps, finetune_epochs=ft_epochs,
                progress=False)
    runs: dict[str, dict[int, dict[int, dict]]] = {}
    teacher_acc: dict[int, float] = {}          # per seed (the probe and its cache are keyed by the seed)
    hashes: dict[int, set[str]] = {}

    def run(name: str, method: str, transfer: Path, size: int, seed: int) -> None:
        cfg = DistillConfig(method=method, transfer=str(transfer.resolve()), seed=seed,
                            out=str((data / "runs" / f"{name}-n{size}-s{seed}").resolve()),
                            cache_dir=str(data / "teacher-cache" / f"seed{seed}"), **base)
        ts = time.perf_counter()
        m = distill(cfg, test, eval_teacher=seed not in teacher_acc and method != "labels_only")
        if m.get("teacher_accuracy") is not None:
            teacher_acc.setdefault(seed, m["teacher_accuracy"])
        if m.get("teacher_weights_hash"):
            hashes.setdefault(seed, set()).add(m["teacher_weights_hash"])
        runs.setdefault(name, {}).setdefault(size, {})[seed] = {
            "test_accuracy": m["test_accuracy"], "num_transfer": m["num_transfer"], "seconds": m["seconds"]}
        print(f"  {name:<14} N={size:<5} seed={seed}: {100 * m['test_accuracy']:.2f}% "
              f"({time.perf_counter() - ts:.0f} s)", file=sys.stderr, flush=True)

    t = time.perf_counter()
    for seed in seeds:
        cur = lambda size: data / "curated" / f"query_balanced-n{size}-s0"  # noqa: E731
        run("labels_only", "labels_only", cur(sizes[0]), 0, seed)
        for size in sizes:
            run("kd_curated", "kd", cur(size), size, seed)
            run("kd_random", "kd", data / "curated" / f"random-n{size}-s{seed}", size, seed)
            if size in aft_sizes:
                run("aft_curated", "aft", cur(size), size, seed)
        run("kd_full_pool", "kd", pool_dir, pool_written, seed)
    timings["distill"] = time.perf_counter() - t
    if any(len(h) > 1 for h in hashes.values()):
        raise RuntimeError(f"the teacher probe differed between runs of one seed ({hashes}): teacher_accuracy "
                           "would not describe every run")

    # summary
    def accs(name: str, size: int | None = None) -> list[float]:
        by = runs[name]
        size = size if size is not None else (max(by) if name in ("labels_only", "kd_full_pool") else sizes[-1])
        return [by[size][s]["test_accuracy"] for s in seeds]

    largest = sizes[-1]
    prec = {s: {n: mean_std([retrieval[s][n][sd]["precision"] for sd in retrieval[s][n]]) for n in sizes}
            for s in STRATEGIES}
    balance = {s: {n: {"normalised_entropy": mean_std([retrieval[s][n][sd]["balance"]["normalised_entropy"]
                                                       for sd in retrieval[s][n]]),
                       "per_class_seed0": retrieval[s][n][0]["balance"]["per_class"],
                       "max_min_ratio_seed0": retrieval[s][n][0]["balance"]["max_min_ratio"]}
                   for n in sizes} for s in STRATEGIES}
    acc = {name: {str(n): mean_std([runs[name][n][sd]["test_accuracy"] for sd in seeds]) for n in runs[name]}
           for name in runs}
    m_lab, m_rand, m_cur = (float(np.mean(accs(k))) for k in ("labels_only", "kd_random", "kd_curated"))
    ent = {s: balance[s][largest]["normalised_entropy"]["mean"] for s in STRATEGIES}
    targets = {
        "precision_3x_base_rate": prec["query_balanced"][largest]["mean"] >= 3 * base_rate,
        "kd_curated_beats_kd_random_by_3_points": m_cur - m_rand >= 0.03,
        "kd_curated_beats_labels_only_by_more": (m_cur - m_lab) > (m_cur - m_rand),
        "query_balanced_at_least_as_balanced_as_best_matches": all(
            balance["query_balanced"][n]["normalised_entropy"]["mean"]
            >= balance["best_matches"][n]["normalised_entropy"]["mean"] for n in sizes),
    }
    qb_ent = min(balance["query_balanced"][n]["normalised_entropy"]["mean"]
                 - balance["best_matches"][n]["normalised_entropy"]["mean"] for n in sizes)
    goals = {   # per target: value, goal, met (the same tests as targets_met, as numbers)
        "precision_over_base_rate": (prec["query_balanced"][largest]["mean"] / base_rate if base_rate else None,
                                     ">= 3", targets["precision_3x_base_rate"]),
        "kd_curated_minus_kd_random": (m_cur - m_rand, ">= 0.03", targets["kd_curated_beats_kd_random_by_3_points"]),
        "kd_curated_gain_over_labels_only_minus_over_random": (
            (m_cur - m_lab) - (m_cur - m_rand), "> 0", targets["kd_curated_beats_labels_only_by_more"]),
        "query_balanced_minus_best_matches_entropy_min_over_sizes": (
            qb_ent, ">= 0", targets["query_balanced_at_least_as_balanced_as_best_matches"]),
    }
    timings["total"] = time.perf_counter() - t_all
    result = {
        "targets": {k: {"value": None if v is None else round(float(v), 4), "goal": g, "met": bool(m)}
                    for k, (v, g, m) in goals.items()},
        "base_rate": round(base_rate, 4),
        "precision_curated": prec["query_balanced"][largest]["mean"],
        "acc_labels_only": round(m_lab, 4),
        "acc_kd_random": round(m_rand, 4),
        "acc_kd_curated": round(m_cur, 4),
        "acc_kd_full_pool": round(float(np.mean(accs("kd_full_pool"))), 4),
        "acc_aft": round(float(np.mean(accs("aft_curated"))), 4),
        "seeds": len(seeds),
        "details": {
            "mode": "smoke" if smoke else "quick" if q else "full",
            "largest_size": largest,
            "sizes": sizes,
            "teacher_accuracy": mean_std([teacher_acc[s] for s in seeds]),
            "teacher_accuracy_per_seed": {str(s): teacher_acc[s] for s in seeds},
            "num_test": len(test),
            "gallery": {"index": str(idx), "vectors": gindex.num_vectors, "images": len(truth),
                        "by_domain": {d: sum(1 for v in truth.values() if v["domain"] == d)
                                      for d in ("in", "out", "leak")},
                        "in_domain_pool_written": pool_written},
            "schedule": {"transfer_steps": steps, "finetune_epochs": ft_epochs, "batch_size": 32,
                         "teacher": f"{teacher}@{teacher_size} linear probe", "student": f"{student}@{resolution}",
                         "aft_sizes": aft_sizes},
            "precision": prec,
            "class_balance": balance,
            "normalised_entropy_at_largest": ent,
            "accuracy": acc,
            "per_seed": {name: {str(n): {str(sd): v["test_accuracy"] for sd, v in by.items()}
                                for n, by in runs[name].items()} for name in runs},
            "retrieval_per_seed": {s: {str(n): {str(sd): {k: v for k, v in st.items() if k != "balance"}
                                                for sd, st in by.items()} for n, by in retrieval[s].items()}
                                   for s in STRATEGIES},
            "ratios": {"precision_over_base_rate": round(prec["query_balanced"][largest]["mean"] / base_rate, 2),
                       "kd_curated_minus_kd_random": round(m_cur - m_rand, 4),
                       "kd_curated_minus_labels_only": round(m_cur - m_lab, 4)},
            "targets_met": targets,
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "plot": str(plot_path),
        },
    }
    plot(plot_path, sizes,
         {f"KD {k.split('_', 1)[1].replace('_', ' ')}" if k.startswith("kd") else "AFT curated":
          {n: [runs[k][n][sd]["test_accuracy"] for sd in seeds] for n in runs[k]}
          for k in ("kd_curated", "kd_random", "aft_curated")},
         {"labels only": accs("labels_only"), f"KD whole pool (N={pool_written})": accs("kd_full_pool")},
         float(np.mean([teacher_acc[s] for s in seeds])), f"{qs.name}, {student}, mean ± std over {len(seeds)} seeds")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    tune_allocator()  # index.core.allocator: as every command runs
    main()
