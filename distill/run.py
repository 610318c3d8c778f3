"""run_distill(cfg) -> metrics: adapt the teacher, cache its outputs, train the student, evaluate.

    OUT/config.json          the fully resolved configuration (written first)
    OUT/teacher/, teachers/  adapted teachers (adaptation.py)
    OUT/cache/ (--cache-dir) teacher outputs per model and split, fingerprinted (caching.py, cache.py)
    OUT/checkpoints/<phase>/ last.pt (periodic), final.pt + done.json (phase finished)
    OUT/student.pt           final student weights (training.py)
    OUT/metrics.json         test accuracy, per-class accuracy, confusion matrix, teacher and baseline accuracy,
                             timings
    OUT/report.html          learning curves, per-class accuracy against the teacher's, confusion matrix,
                             AFT's feature weights (distill/report.py)

Every step is resumable: a rerun with the same configuration reuses what is done and continues
from the last checkpoint. Student training runs in-process, or with `workers > 1` through the
`launcher` the caller passes (the `distill` command passes Ray Train's, jobs/train_ray.py).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from curation.querysets import get_query_set
from curation.timing import Clock, most_time
from distill.adaptation import TEACHERS_FILE, prepare_teacher, prepare_teachers
from distill.caching import CACHES_FILE, prepare_caches
from distill.config import DistillConfig
from distill.data import LabelledSet, ShardSet, load_labelled, test_batches, transfer_shards
from distill.evaluate import evaluate
from distill.methods import METHODS, MULTI_TEACHER, phases
from distill.plots import bar_plot
from distill.report import REPORT_FILE, write_run_report
from distill.students import build_student, resolve_student, student_resolution
from distill.teachers import Teacher
from distill.training import TRAIN_RESULT, Launcher, train_student
from index.core.atomic import read_json, write_json
from index.core.contract import QUERIES_DRAW_FILE
from index.core.errors import ConfigError, InputError, MissingInputError
from index.core.outdir import Owner, owned_dir, owning_also
from index.device import pick_device
from index.encoders import resolve_encoder

OWNER = Owner("distill", tuple(re.escape(n) for n in (
    "config.json", "teacher", "teachers", "cache", "checkpoints", "student.pt", "metrics.json", CACHES_FILE,
    TEACHERS_FILE, TRAIN_RESULT, "aft_source_weights.png", "baseline")), done_record="metrics.json")


def check_query_set(cfg: DistillConfig, query_set: Any) -> None:
    """The curated set must have been drawn from the query set `cfg.queries` names (its queries.json)."""
    draw_path = Path(cfg.transfer) / QUERIES_DRAW_FILE
    if not draw_path.is_file():
        raise MissingInputError(f"{draw_path} is missing: is {cfg.transfer} a curated directory (curate --out)?")
    try:
        draw = read_json(draw_path)
    except ValueError as e:
        raise InputError(f"{draw_path} is not a readable query draw ({e})") from None
    if draw.get("name") != cfg.queries:
        raise InputError(f"--queries {cfg.queries!r} differs from the query set the curated set {cfg.transfer} "
                         f"was drawn from ({draw.get('name')!r}, {draw_path}); pass --queries {draw.get('name')}")
    drawn = getattr(query_set, "queries", None)
    if drawn is not None and [q.id for q in drawn] != [q["id"] for q in draw.get("queries", [])]:
        raise InputError(f"the query images of {cfg.queries!r} drawn with --query-seed {cfg.query_seed} differ from "
                         f"those in {draw_path} (drawn with seed {draw.get('seed')}); pass --query-seed {draw.get('seed')}")


def check_names(cfg: DistillConfig, launcher: Launcher | None) -> None:
    """Refuse an unknown student, teacher or feature encoder, a device this machine lacks, or several
    workers without a launcher, before work."""
    if cfg.workers > 1 and launcher is None:
        raise ConfigError(f"workers={cfg.workers} needs a launcher for the training workers "
                          "(run_distill(cfg, launcher=jobs.train_ray.train_with_ray), as the distill command does)")
    pick_device(cfg.device)
    resolve_student(cfg.student)
    if cfg.method != "labels_only":
        for name in dict.fromkeys(cfg.teacher_sources + cfg.feature_sources):
            resolve_encoder(name, cfg.teacher_weights if name == cfg.teacher else None, cfg.teacher_image_size)


def run_distill(cfg: DistillConfig, *, query_set: Any = None, launcher: Launcher | None = None) -> dict[str, Any]:
    """Run (or resume) a distillation; returns the metrics also written to OUT/metrics.json.

    `query_set`: an object with .classes and .test (items with .label, .loader()); by default the
    named query set `cfg.queries` from curation.querysets. The run directory is owned
    (`index.core.outdir.owned_dir`): it may not be or lie inside the curated set.
    `launcher`: starts `cfg.workers` training workers (needed when workers > 1), e.g.
    jobs.train_ray.train_with_ray.
    """
    cfg = cfg.replace(out=str(Path(cfg.out).resolve()), transfer=str(Path(cfg.transfer).resolve()))
    t_start = time.perf_counter()
    check_names(cfg, launcher)
    if query_set is None:
        query_set = get_query_set(cfg.queries, data_root=cfg.data_root, seed=cfg.query_seed)
    check_query_set(cfg, query_set)
    inputs = {"--transfer": [cfg.transfer], "--data-root": [cfg.data_root] if cfg.data_root else []}
    with owned_dir(cfg.out, owning_also(OWNER, cfg.out, [cfg.cache_dir]), inputs):
        return _run_distill(cfg, query_set, launcher, t_start)


def _run_distill(cfg: DistillConfig, query_set: Any, launcher: Launcher | None, t_start: float) -> dict[str, Any]:
    out = Path(cfg.out)
    ls = load_labelled(cfg.transfer)
    if list(query_set.classes) != list(ls.classes):
        raise InputError(f"query set {cfg.queries!r} has classes {list(query_set.classes)} but the curated set "
                         f"{cfg.transfer} was drawn with {ls.classes}")
    shards = transfer_shards(cfg.transfer)
    plan = phases(cfg.method, cfg, bool(shards))
    shardset = ShardSet.scan(shards) if "transfer" in plan else None
    resolution = student_resolution(cfg.student, cfg.resolution)
    device = torch.device(pick_device(cfg.device))
    method = METHODS.get(cfg.method)
    write_json(out / "config.json", {
        "config": cfg.to_dict(), "resolved": {
            "resolution": resolution, "device": str(device), "phases": plan, "classes": ls.classes,
            "num_labelled": len(ls), "num_transfer": shardset.count if shardset else 0,
            "feature_sources": list(cfg.feature_sources) if method.transfer_needs == "features" or
            method.labelled_needs == "features" else [],
            "training_fingerprint": cfg.training_fingerprint()}})

    metrics: dict[str, Any] = {"method": cfg.method, "student": cfg.student, "teacher": None}
    clock = Clock()
    teachers = _teachers(cfg, ls, query_set, device, metrics)
    clock.lap("teacher")
    caches = prepare_caches(cfg, ls, shardset, teachers, device)
    write_json(out / CACHES_FILE, caches)
    clock.lap("teacher outputs (cache)")
    del teachers
    metrics["caches"] = caches

    train = launcher(cfg.to_dict(), cfg.workers) if cfg.workers > 1 and launcher else train_student(cfg)
    metrics["training"] = train
    clock.lap("training")
    if not train["completed"]:
        metrics["completed"] = False
        return metrics

    student = build_student(cfg.student, len(ls.classes), resolution=resolution)
    student.load_state_dict(torch.load(out / "student.pt", map_location="cpu", weights_only=True))
    ev = evaluate(student.to(device), test_batches(query_set.test, resolution, cfg.eval_batch_size), ls.classes, device,
                  progress=cfg.progress)
    clock.lap("evaluation")
    metrics.update(completed=True, test_accuracy=ev["accuracy"], per_class_accuracy=ev["per_class_accuracy"],
                   num_test=ev["num_test"], confusion=ev["confusion"], classes=list(ls.classes),
                   epoch_seconds={p["name"]: [e["seconds"] for e in p["epochs"]] for p in train["phases"]})
    if cfg.baseline and cfg.method != "labels_only":
        base = run_distill(cfg.replace(method="labels_only", out=str(out / "baseline"), baseline=False,
                                       teacher_head="probe"),
                           query_set=query_set, launcher=launcher)
        metrics["baseline_accuracy"] = base.get("test_accuracy")
    elif cfg.method == "labels_only":
        metrics["baseline_accuracy"] = ev["accuracy"]
    if train.get("aft_mu", {}).get("per_source"):
        metrics["aft_source_weights"] = _plot_source_weights(out, train["aft_mu"]["per_source"])
    clock.lap("baseline and figures")
    metrics["timings"] = clock.parts
    metrics["seconds"] = time.perf_counter() - t_start
    metrics["config"] = cfg.to_dict()
    write_json(out / "metrics.json", metrics)
    write_run_report(out, metrics)
    return metrics


def _teachers(cfg: DistillConfig, ls: LabelledSet, query_set: Any, device: torch.device,
              metrics: dict[str, Any]) -> list[Teacher]:
    """The adapted teacher(s) the method distils from (none for labels_only), evaluated into `metrics`."""
    if cfg.method in MULTI_TEACHER:
        return prepare_teachers(cfg, ls, query_set, device, metrics)
    if cfg.method == "labels_only":
        return []
    teacher, info = prepare_teacher(cfg, ls, device)
    ev = evaluate(teacher, test_batches(query_set.test, teacher.spec.image_size, cfg.eval_batch_size),
                  ls.classes, device, progress=cfg.progress)
    metrics.update(teacher=cfg.teacher, teacher_adapt=cfg.teacher_adapt, teacher_accuracy=ev["accuracy"],
                   teacher_per_class_accuracy=ev["per_class_accuracy"], teacher_adaptation=info)
    return [teacher]


def _plot_source_weights(out: Path, blocks: list[dict[str, Any]]) -> dict[str, float]:
    """AFT's learned weight per pretrained model: OUT/aft_source_weights.png, and {name: mean weight}."""
    bar_plot(out / "aft_source_weights.png", [b["name"] for b in blocks], [b["mean"] for b in blocks],
             title="AFT: learned feature weights per model", ylabel="mean sigmoid(s)")
    return {b["name"]: b["mean"] for b in blocks}


def summary_line(metrics: dict[str, Any]) -> str:
    if not metrics.get("completed"):
        done = sum(p["steps"] for p in metrics["training"]["phases"])
        return f"distill {metrics['method']}: stopped after {done} steps; rerun the same command to resume"

    def pct(v: Any) -> str:
        return f"{100 * v:.2f}%" if isinstance(v, float) else "n/a"

    skipped = metrics["training"].get("skipped") or {}
    return (f"distill {metrics['method']} student={metrics['student']}: test accuracy {pct(metrics['test_accuracy'])}"
            f" | teacher {pct(metrics.get('teacher_accuracy'))} | labels-only baseline "
            f"{pct(metrics.get('baseline_accuracy'))} | skipped {json.dumps(skipped)} | {metrics['seconds']:.1f}s"
            f"{most_time(metrics.get('timings') or {})} | report {Path(metrics['config']['out']) / REPORT_FILE}")
