"""run_distill(cfg) -> metrics: adapt the teacher, cache its outputs, train the student, evaluate.

    OUT/config.json          the fully resolved configuration (written first)
    OUT/teacher/             adapted teacher (head, or whole model after finetuning) + done.json
    OUT/cache/ (--cache-dir) teacher outputs per model and split, fingerprinted (cache.py)
    OUT/checkpoints/<phase>/ last.pt (periodic), final.pt + done.json (phase finished)
    OUT/student.pt           final student weights
    OUT/metrics.json         test accuracy, per-class accuracy, teacher and baseline accuracy, timings

Every step is resumable: a rerun with the same configuration reuses what is done and continues
from the last checkpoint. Student training runs in-process, or with `workers > 1` on Ray Train
(jobs/train_ray.py, imported only then).
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch

from distill.cache import CacheLookup, OutputCache, build_or_load_cache, cache_fingerprint_inputs, load_cache
from distill.config import DistillConfig
from distill.data import (EVAL_TRANSFORM_ID, LabelledSet, ShardSet, eval_transform, labelled_batches, load_labelled,
                          steps_per_epoch, test_batches, transfer_batches, transfer_shards)
from distill.evaluate import evaluate
from distill.methods import METHODS, build_task, phases
from distill.students import build_student, student_resolution
from distill.teachers import (Teacher, TeacherCETask, build_feature_model, build_teacher, linear_probe,
                              weights_hash)
from distill.trainer import PhasePlan, train_phase
from index.atomic import atomic_path, check_done, file_sha256, fingerprint, read_json, write_json
from index.contract import QUERIES_DRAW_FILE, encoder_slug

CACHES_FILE = "caches.json"
TRAIN_RESULT = "train_result.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available; use --device cpu or auto")
    return torch.device(name)


def labelled_manifest(cfg: DistillConfig, ls: LabelledSet) -> dict[str, Any]:
    return {"queries": file_sha256(Path(cfg.transfer) / QUERIES_DRAW_FILE), "keys": fingerprint(ls.keys),
            "count": len(ls)}


# ------------------------------------------------------------------ teacher

def prepare_teacher(cfg: DistillConfig, ls: LabelledSet, device: torch.device) -> tuple[Teacher, dict[str, Any]]:
    """Build and adapt the teacher on the labelled set, or load the adaptation a previous run saved."""
    teacher = build_teacher(cfg.teacher, len(ls.classes), weights=cfg.teacher_weights,
                            image_size=cfg.teacher_image_size, device=device)
    spec = teacher.spec
    inputs = {"spec": spec.identity(), "adapt": cfg.teacher_adapt, "labelled": labelled_manifest(cfg, ls),
              "seed": cfg.seed, "augment": cfg.augment,
              "params": ({"steps": cfg.probe_steps, "weight_decay": cfg.probe_weight_decay}
                         if cfg.teacher_adapt == "linear_probe" else
                         {"epochs": cfg.teacher_epochs, "lr": cfg.teacher_lr, "batch_size": cfg.teacher_batch_size,
                          "weight_decay": cfg.weight_decay, "warmup_frac": cfg.warmup_frac})}
    tdir = Path(cfg.out) / "teacher"
    fp = fingerprint(inputs)
    trained = teacher.head if cfg.teacher_adapt == "linear_probe" else teacher
    record = check_done(tdir / "done.json", fp)
    if record is not None:
        trained.load_state_dict(torch.load(tdir / "teacher.pt", map_location=device, weights_only=True))
        return teacher.eval(), record["info"]
    t0 = time.perf_counter()
    if cfg.teacher_adapt == "linear_probe":
        images = torch.stack([eval_transform(im, spec.image_size) for im in ls.images])
        info = linear_probe(teacher, images, torch.tensor(ls.labels), steps=cfg.probe_steps,
                            weight_decay=cfg.probe_weight_decay, batch_size=cfg.eval_batch_size)
    else:
        n = len(ls)
        spe = steps_per_epoch(n, min(cfg.teacher_batch_size, n))
        total = spe * cfg.teacher_epochs
        plan = PhasePlan("teacher-finetune", total, spe, cfg.teacher_lr, cfg.weight_decay,
                         int(cfg.warmup_frac * total))
        res = train_phase(
            TeacherCETask(teacher), plan,
            lambda e, skip: labelled_batches(ls, seed=cfg.seed, epoch=e, batch_size=min(cfg.teacher_batch_size, n),
                                             resolution=spec.image_size, augment=cfg.augment, skip=skip),
            ckpt_dir=tdir / "finetune", run_fingerprint=fp, seed=cfg.seed, device=device, amp=cfg.amp,
            checkpoint_every=cfg.checkpoint_every, progress=cfg.progress)
        info = {"steps": res.steps, "epochs": res.epochs}
    info["seconds"] = time.perf_counter() - t0
    info["weights_hash"] = weights_hash(trained)
    with atomic_path(tdir / "teacher.pt") as tmp:
        torch.save(trained.state_dict(), tmp)
    write_json(tdir / "done.json", {"fingerprint": fp, "inputs": inputs, "info": info})
    return teacher.eval(), info


# ------------------------------------------------------------------ caches

def cache_pass(fn: Any, batches: Iterator[dict[str, Any]], device: torch.device, with_logits: bool):
    """The `compute` of build_or_load_cache: fn(x) -> (logits, features) or features, over `batches`."""
    @torch.no_grad()
    def gen():
        for b in batches:
            x = b["image"].to(device)
            if with_logits:
                logits, feats = fn(x)
                yield b["key"], logits, feats
            else:
                yield b["key"], None, fn(x)
    return gen


def prepare_caches(cfg: DistillConfig, ls: LabelledSet, shardset: ShardSet | None, teacher: Teacher | None,
                   device: torch.device) -> dict[str, dict[str, Any]]:
    """Build (or reuse) the caches the method reads; returns {role: {dir, fingerprint, reused, count}}."""
    method = METHODS.get(cfg.method)
    plan = phases(cfg.method, cfg, shardset is not None)
    root = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out) / "cache"
    caches: dict[str, dict[str, Any]] = {}
    transfer_data = shardset.manifest() if shardset is not None else None

    def transfer_iter(resolution: int) -> Iterator[dict[str, Any]]:
        assert shardset is not None
        return transfer_batches(list(shardset.shards), shardset.count, seed=0, epoch=0,
                                batch_size=cfg.eval_batch_size, resolution=resolution, augment=False,
                                shuffle=False, decode_threads=cfg.decode_threads)

    def labelled_iter(resolution: int) -> Iterator[dict[str, Any]]:
        return labelled_batches(ls, seed=0, epoch=0, batch_size=cfg.eval_batch_size, resolution=resolution,
                                augment=False, shuffle=False)

    def record(role: str, cache: OutputCache, inputs: dict[str, Any]) -> None:
        caches[role] = {"dir": str(cache.directory), "fingerprint": fingerprint(inputs), "reused": cache.reused,
                        "count": len(cache.keys)}

    if method.transfer_needs == "logits" and "transfer" in plan:
        assert teacher is not None
        spec = teacher.spec
        hashed = teacher.head if cfg.teacher_adapt == "linear_probe" else teacher
        inputs = cache_fingerprint_inputs(
            model={"spec": spec.identity(), "adapt": cfg.teacher_adapt}, weights=weights_hash(hashed),
            data=transfer_data, transform={"id": EVAL_TRANSFORM_ID, "resolution": spec.image_size},
            outputs=["logits", "features"])
        d = root / f"{encoder_slug(spec.name)}-{cfg.teacher_adapt}" / data_dir_name("transfer", transfer_data)
        teacher.eval()
        record("transfer_logits:0", build_or_load_cache(
            d, inputs, cache_pass(teacher.forward_both, transfer_iter(spec.image_size), device, True)), inputs)

    splits = []
    if method.transfer_needs == "features" and "transfer" in plan:
        splits.append("transfer")
    if method.labelled_needs == "features":
        splits.append("labelled")
    for i, name in enumerate(cfg.feature_sources if splits else ()):
        if teacher is not None and name == cfg.teacher and cfg.teacher_adapt == "linear_probe":
            model, spec = teacher.features, teacher.spec   # the frozen encoder is the pretrained one
        else:
            fm = build_feature_model(name, image_size=cfg.teacher_image_size, device=device)
            model, spec = fm, fm.spec
        for split in splits:
            data = transfer_data if split == "transfer" else labelled_manifest(cfg, ls)
            inputs = cache_fingerprint_inputs(
                model={"spec": spec.identity(), "adapt": "pretrained"}, weights=spec.weights_digest or "seeded-init",
                data=data, transform={"id": EVAL_TRANSFORM_ID, "resolution": spec.image_size}, outputs=["features"])
            d = root / f"{encoder_slug(spec.name)}-pretrained" / data_dir_name(split, data)
            batches = transfer_iter(spec.image_size) if split == "transfer" else labelled_iter(spec.image_size)
            record(f"{split}_features:{i}", build_or_load_cache(d, inputs, cache_pass(model, batches, device, False)),
                   inputs)
    return caches


def data_dir_name(split: str, data: Any) -> str:
    """A cache location per data set, so one --cache-dir serves several transfer sets; at one location
    a different teacher (or head) is refused rather than silently recomputed."""
    return f"{split}-{fingerprint(data)[:12]}"


def _open(caches: dict[str, dict[str, Any]], prefix: str) -> list[OutputCache]:
    out = []
    for role in sorted((r for r in caches if r.startswith(prefix)), key=lambda r: int(r.rsplit(":", 1)[-1])):
        c = load_cache(caches[role]["dir"], caches[role]["fingerprint"])
        if c is None:
            raise FileNotFoundError(f"teacher cache {caches[role]['dir']} is missing")
        out.append(c)
    return out


# ------------------------------------------------------------------ student training (also a Ray worker's body)

def train_student(cfg: DistillConfig, *, rank: int = 0, world: int = 1, distributed: bool = False) -> dict[str, Any]:
    """Train the student through the method's phases; rank 0 writes OUT/student.pt and OUT/train_result.json.

    Reads only files (config, curated shards, caches), so it runs the same in a Ray Train worker.
    """
    out = Path(cfg.out)
    device = resolve_device(cfg.device) if not distributed else torch.device("cpu")
    ls = load_labelled(cfg.transfer)
    shards = transfer_shards(cfg.transfer)
    plan = phases(cfg.method, cfg, bool(shards))
    shardset = ShardSet.scan(shards) if "transfer" in plan else None
    caches = read_json(out / CACHES_FILE) if (out / CACHES_FILE).exists() else {}
    logits = _open(caches, "transfer_logits")
    transfer_lookup = CacheLookup(logits[0] if logits else None, _open(caches, "transfer_features"))
    labelled_lookup = CacheLookup(None, _open(caches, "labelled_features"))
    feature_dim = transfer_lookup.feature_dim or labelled_lookup.feature_dim
    resolution = student_resolution(cfg.student, cfg.resolution)
    student = build_student(cfg.student, len(ls.classes), weights=cfg.student_weights, resolution=resolution,
                            seed=cfg.seed)
    task = build_task(cfg.method, student, cfg, feature_dim, seed=cfg.seed)
    run_fp = fingerprint({"config": cfg.training_fingerprint(), "caches": {k: v["fingerprint"] for k, v in caches.items()},
                          "world": world})
    skipped: Counter = Counter()
    results, offset = [], 0
    for i, phase in enumerate(plan):
        if phase == "transfer":
            assert shardset is not None
            n, bs, lr = shardset.count, cfg.batch_size, cfg.lr
            spe = steps_per_epoch(n, bs, world)
            total = cfg.transfer_steps if cfg.transfer_steps is not None else spe * cfg.transfer_epochs
            lookup = transfer_lookup if (transfer_lookup.logits or transfer_lookup.features) else None

            def batches(epoch: int, skip: int, n=n, bs=bs, lookup=lookup) -> Iterator[dict[str, Any]]:
                return transfer_batches(list(shardset.shards), n, seed=cfg.seed, epoch=epoch, batch_size=bs,
                                        resolution=resolution, augment=cfg.augment, shuffle_buffer=cfg.shuffle_buffer,
                                        rank=rank, world=world, skip=skip, lookup=lookup,
                                        decode_threads=cfg.decode_threads, skipped=skipped)
        else:
            n, lr = len(ls), cfg.finetune_learning_rate
            bs = min(cfg.labels_batch_size, max(2, n // world))
            spe = steps_per_epoch(n, bs, world)
            total = spe * cfg.finetune_epochs
            lookup = labelled_lookup if labelled_lookup.features else None

            def batches(epoch: int, skip: int, bs=bs, lookup=lookup) -> Iterator[dict[str, Any]]:
                return labelled_batches(ls, seed=cfg.seed, epoch=epoch, batch_size=bs, resolution=resolution,
                                        augment=cfg.augment, rank=rank, world=world, skip=skip, lookup=lookup,
                                        decode_threads=cfg.decode_threads)
        phase_plan = PhasePlan(phase, total, spe, lr, cfg.weight_decay, int(cfg.warmup_frac * total))
        stop = None if cfg.stop_at_step is None else cfg.stop_at_step - offset
        res = train_phase(task, phase_plan, batches, ckpt_dir=out / "checkpoints" / phase, run_fingerprint=run_fp,
                          seed=cfg.seed + i, device=device, amp=cfg.amp, checkpoint_every=cfg.checkpoint_every,
                          stop_at=stop, is_main=rank == 0, distributed=distributed, progress=cfg.progress)
        results.append(res.to_dict())
        offset += total
        if not res.completed:
            return {"completed": False, "phases": results, "skipped": dict(skipped)}
    result: dict[str, Any] = {"completed": True, "phases": results, "skipped": dict(skipped),
                              "resolution": resolution, "world": world}
    if hasattr(task, "s"):
        mu = torch.sigmoid(task.s.detach()).cpu()
        result["aft_mu"] = {"mean": float(mu.mean()), "min": float(mu.min()), "max": float(mu.max())}
    if rank == 0:
        with atomic_path(out / "student.pt") as tmp:
            torch.save(student.state_dict(), tmp)
        write_json(out / TRAIN_RESULT, result)
    return result


# ------------------------------------------------------------------ the whole run

def run_distill(cfg: DistillConfig, *, query_set: Any = None) -> dict[str, Any]:
    """Run (or resume) a distillation; returns the metrics also written to OUT/metrics.json.

    `query_set`: an object with .classes and .test (items with .label, .loader()); by default the
    named query set `cfg.queries` from curation.querysets.
    """
    cfg = cfg.replace(out=str(Path(cfg.out).resolve()), transfer=str(Path(cfg.transfer).resolve()))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ls = load_labelled(cfg.transfer)
    if query_set is None:
        from curation.querysets import get_query_set

        query_set = get_query_set(cfg.queries, data_root=cfg.data_root, seed=cfg.query_seed)
    if list(query_set.classes) != list(ls.classes):
        raise ValueError(f"query set {cfg.queries!r} has classes {list(query_set.classes)} but the curated set "
                         f"{cfg.transfer} was drawn with {ls.classes}")
    shards = transfer_shards(cfg.transfer)
    plan = phases(cfg.method, cfg, bool(shards))
    shardset = ShardSet.scan(shards) if "transfer" in plan else None
    resolution = student_resolution(cfg.student, cfg.resolution)
    device = resolve_device(cfg.device)
    method = METHODS.get(cfg.method)
    write_json(out / "config.json", {
        "config": cfg.to_dict(), "resolved": {
            "resolution": resolution, "device": str(device), "phases": plan, "classes": ls.classes,
            "num_labelled": len(ls), "num_transfer": shardset.count if shardset else 0,
            "feature_sources": list(cfg.feature_sources) if method.transfer_needs == "features" or
            method.labelled_needs == "features" else [],
            "training_fingerprint": cfg.training_fingerprint()}})

    metrics: dict[str, Any] = {"method": cfg.method, "student": cfg.student, "teacher": None}
    teacher = None
    if cfg.method != "labels_only":
        teacher, info = prepare_teacher(cfg, ls, device)
        ev = evaluate(teacher, test_batches(query_set.test, teacher.spec.image_size, cfg.eval_batch_size),
                      ls.classes, device)
        metrics.update(teacher=cfg.teacher, teacher_adapt=cfg.teacher_adapt, teacher_accuracy=ev["accuracy"],
                       teacher_per_class_accuracy=ev["per_class_accuracy"], teacher_adaptation=info)
    caches = prepare_caches(cfg, ls, shardset, teacher, device)
    write_json(out / CACHES_FILE, caches)
    del teacher
    metrics["caches"] = caches

    if cfg.workers > 1:
        from jobs.train_ray import train_with_ray

        train = train_with_ray(cfg.to_dict(), cfg.workers)
    else:
        train = train_student(cfg)
    metrics["training"] = train
    if not train["completed"]:
        metrics["completed"] = False
        return metrics

    student = build_student(cfg.student, len(ls.classes), resolution=resolution)
    student.load_state_dict(torch.load(out / "student.pt", map_location="cpu", weights_only=True))
    ev = evaluate(student.to(device), test_batches(query_set.test, resolution, cfg.eval_batch_size), ls.classes, device)
    metrics.update(completed=True, test_accuracy=ev["accuracy"], per_class_accuracy=ev["per_class_accuracy"],
                   num_test=ev["num_test"],
                   epoch_seconds={p["name"]: [e["seconds"] for e in p["epochs"]] for p in train["phases"]})
    if cfg.baseline and cfg.method != "labels_only":
        base = run_distill(cfg.replace(method="labels_only", out=str(out / "baseline"), baseline=False),
                           query_set=query_set)
        metrics["baseline_accuracy"] = base.get("test_accuracy")
    elif cfg.method == "labels_only":
        metrics["baseline_accuracy"] = ev["accuracy"]
    metrics["seconds"] = time.perf_counter() - t_start
    metrics["config"] = cfg.to_dict()
    write_json(out / "metrics.json", metrics)
    return metrics


def summary_line(metrics: dict[str, Any]) -> str:
    if not metrics.get("completed"):
        done = sum(p["steps"] for p in metrics["training"]["phases"])
        return f"distill {metrics['method']}: stopped after {done} steps; rerun the same command to resume"

    def pct(v: Any) -> str:
        return f"{100 * v:.2f}%" if isinstance(v, float) else "n/a"

    skipped = metrics["training"].get("skipped") or {}
    return (f"distill {metrics['method']} student={metrics['student']}: test accuracy {pct(metrics['test_accuracy'])}"
            f" | teacher {pct(metrics.get('teacher_accuracy'))} | labels-only baseline "
            f"{pct(metrics.get('baseline_accuracy'))} | skipped {json.dumps(skipped)} | {metrics['seconds']:.1f}s")
