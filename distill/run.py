"""run_distill(cfg) -> metrics: adapt the teacher, cache its outputs, train the student, evaluate.

    OUT/config.json          the fully resolved configuration (written first)
    OUT/teacher/             adapted teacher (head, or whole model after finetuning) + done.json
    OUT/cache/ (--cache-dir) teacher outputs per model and split, fingerprinted (cache.py)
    OUT/checkpoints/<phase>/ last.pt (periodic), final.pt + done.json (phase finished)
    OUT/student.pt           final student weights
    OUT/metrics.json         test accuracy, per-class accuracy, confusion matrix, teacher and baseline accuracy,
                             timings
    OUT/report.html          learning curves, per-class accuracy against the teacher's, confusion matrix,
                             AFT's feature weights (distill/report.py)

Every step is resumable: a rerun with the same configuration reuses what is done and continues
from the last checkpoint. Student training runs in-process, or with `workers > 1` on Ray Train
(jobs/train_ray.py, imported only then).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch

from distill.cache import (CacheLookup, OutputCache, build_or_load_cache, cache_fingerprint_inputs, cache_pass,
                           data_dir_name, load_cache, pretrained_features_inputs)
from distill.config import DistillConfig
from distill.data import (EVAL_TRANSFORM_ID, LabelledSet, ShardSet, eval_transform, labelled_batches, load_labelled,
                          steps_per_epoch, test_batches, transfer_batches, transfer_shards)
from distill.evaluate import evaluate
from distill.methods import METHODS, MULTI_TEACHER, TeacherMix, build_task, phases
from curation.timing import Clock, most_time
from distill.plots import bar_plot
from distill.rank import rank_teachers
from distill.report import REPORT_FILE, write_run_report
from distill.students import build_student, resolve_student, student_resolution
from distill.teachers import (Teacher, TeacherCETask, build_feature_model, build_teacher, linear_probe,
                              weights_hash)
from distill.trainer import PhasePlan, train_phase
from index.atomic import atomic_path, check_done, file_sha256, fingerprint, read_json, write_json
from index.contract import QUERIES_DRAW_FILE, encoder_slug
from index.errors import ConfigError, InputError, MissingInputError
from index.outdir import Owner, owned_dir, owning_also

CACHES_FILE = "caches.json"
TEACHERS_FILE = "teachers.json"
TRAIN_RESULT = "train_result.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available; use --device cpu or auto")
    return torch.device(name)


def labelled_manifest(cfg: DistillConfig, ls: LabelledSet) -> dict[str, Any]:
    return {"queries": file_sha256(Path(cfg.transfer) / QUERIES_DRAW_FILE), "keys": fingerprint(ls.keys),
            "count": len(ls)}


# ------------------------------------------------------------------ teacher

def teacher_adaptation(cfg: DistillConfig) -> str:
    """How the teachers' outputs are made: linear_probe | finetune (target classes), or source (own head)."""
    return "source" if cfg.method in MULTI_TEACHER and cfg.teacher_head == "source" else cfg.teacher_adapt


def prepare_teacher(cfg: DistillConfig, ls: LabelledSet, device: torch.device, name: str | None = None,
                    tdir: Path | None = None) -> tuple[Teacher, dict[str, Any]]:
    """Build and adapt the teacher (`name`, default cfg.teacher) on the labelled set, or load the
    adaptation a previous run saved under `tdir` (default OUT/teacher). With teacher_head='source'
    (multi-teacher methods) the teacher keeps its own pretrained classifier and nothing is adapted."""
    name = name or cfg.teacher
    weights = cfg.teacher_weights if name == cfg.teacher else None
    if teacher_adaptation(cfg) == "source":
        from index.encoders import resolve_encoder, source_head

        head = source_head(resolve_encoder(name, weights, cfg.teacher_image_size))
        teacher = build_teacher(name, head.out_features, weights=weights, image_size=cfg.teacher_image_size,
                                device=device)
        teacher.head.load_state_dict(head.state_dict())
        return teacher.eval(), {"head": "source", "num_outputs": head.out_features,
                                "weights_hash": weights_hash(teacher.head)}
    teacher = build_teacher(name, len(ls.classes), weights=weights, image_size=cfg.teacher_image_size, device=device)
    spec = teacher.spec
    inputs = {"spec": spec.identity(), "adapt": cfg.teacher_adapt, "labelled": labelled_manifest(cfg, ls),
              "seed": cfg.seed, "augment": cfg.augment,
              "params": ({"steps": cfg.probe_steps, "weight_decay": cfg.probe_weight_decay}
                         if cfg.teacher_adapt == "linear_probe" else
                         {"epochs": cfg.teacher_epochs, "lr": cfg.teacher_lr, "batch_size": cfg.teacher_batch_size,
                          "weight_decay": cfg.weight_decay, "warmup_frac": cfg.warmup_frac})}
    tdir = tdir or Path(cfg.out) / "teacher"
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

def prepare_caches(cfg: DistillConfig, ls: LabelledSet, shardset: ShardSet | None,
                   teachers: Teacher | list[Teacher] | None, device: torch.device) -> dict[str, dict[str, Any]]:
    """Build (or reuse) the caches the method reads; returns {role: {dir, fingerprint, reused, count}}.

    `teachers`: the adapted teacher, or the selected teachers of a multi-teacher method in order
    (one transfer-logits cache each: `transfer_logits:<i>`)."""
    teachers = [teachers] if isinstance(teachers, Teacher) else list(teachers or [])
    teacher = teachers[0] if teachers else None
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

    adapt = teacher_adaptation(cfg)
    for i, t in enumerate(teachers if method.transfer_needs == "logits" and "transfer" in plan else ()):
        spec = t.spec
        hashed = t.head if adapt in ("linear_probe", "source") else t
        inputs = cache_fingerprint_inputs(
            model={"spec": spec.identity(), "adapt": adapt}, weights=weights_hash(hashed),
            data=transfer_data, transform={"id": EVAL_TRANSFORM_ID, "resolution": spec.image_size},
            outputs=["logits", "features"])
        d = root / f"{encoder_slug(spec.name)}-{adapt}" / data_dir_name("transfer", transfer_data)
        t.eval()
        record(f"transfer_logits:{i}", build_or_load_cache(
            d, inputs, cache_pass(t.forward_both, transfer_iter(spec.image_size), device, True)), inputs)

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
            inputs = pretrained_features_inputs(spec, data, EVAL_TRANSFORM_ID)
            d = root / f"{encoder_slug(spec.name)}-pretrained" / data_dir_name(split, data)
            batches = transfer_iter(spec.image_size) if split == "transfer" else labelled_iter(spec.image_size)
            record(f"{split}_features:{i}", build_or_load_cache(d, inputs, cache_pass(model, batches, device, False)),
                   inputs)
    return caches


def _open(caches: dict[str, dict[str, Any]], prefix: str) -> list[OutputCache]:
    out = []
    for role in sorted((r for r in caches if r.startswith(prefix)), key=lambda r: int(r.rsplit(":", 1)[-1])):
        c = load_cache(caches[role]["dir"], caches[role]["fingerprint"])
        if c is None:
            raise FileNotFoundError(f"teacher cache {caches[role]['dir']} is missing")
        out.append(c)
    return out


def per_source_weights(mu: torch.Tensor, names: tuple[str, ...] | list[str], dims: list[int]) -> list[dict[str, Any]]:
    """AFT's weights sigmoid(s) summarised per pretrained model (its block of the concatenated features)."""
    if len(names) != len(dims) or sum(dims) != mu.numel():
        raise ValueError(f"feature blocks {dict(zip(names, dims))} do not cover the {mu.numel()} weights")
    out, start = [], 0
    for name, d in zip(names, dims):
        block = mu[start:start + d]
        out.append({"name": name, "dim": d, "mean": float(block.mean()), "min": float(block.min()),
                    "max": float(block.max())})
        start += d
    return out


# ------------------------------------------------------------------ several teachers (kd_nearest, kd_weighted)

def select_teachers(cfg: DistillConfig, ls: LabelledSet, device: torch.device) -> dict[str, Any]:
    """Rank cfg.teacher_sources by task similarity on the labelled set; weights softmax(p * similarity),
    p = inf for kd_nearest. Teachers whose weight is exactly 0 are not used (no pass over the data)."""
    p = math.inf if cfg.method == "kd_nearest" else cfg.weight_temperature
    root = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out) / "cache"
    result = rank_teachers(cfg.teacher_sources, ls, labelled_manifest(cfg, ls), root, metric=cfg.similarity,
                           image_size=cfg.teacher_image_size, device=device, weight_temperature=p,
                           batch_size=cfg.eval_batch_size,
                           weights={cfg.teacher: cfg.teacher_weights} if cfg.teacher_weights else None)
    if cfg.method == "kd_nearest":   # ties: the first in rank order (by name) alone
        for r in result["ranking"]:
            r["weight"] = 1.0 if r["rank"] == 1 else 0.0
    result["selected"] = [r["name"] for r in result["ranking"] if r["weight"] > 0]
    return result


def read_teacher_mix(out: Path) -> TeacherMix:
    d = read_json(out / TEACHERS_FILE)
    return TeacherMix([t["name"] for t in d["teachers"]], [t["outputs"] for t in d["teachers"]],
                      [t["weight"] for t in d["teachers"]])


# ------------------------------------------------------------------ student training (also a Ray worker's body)

def worker_device() -> torch.device:
    """A data-parallel worker's device: its GPU under NCCL (the launcher gives each worker one), else the CPU."""
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def train_student(cfg: DistillConfig, *, rank: int = 0, world: int = 1, distributed: bool = False) -> dict[str, Any]:
    """Train the student through the method's phases; rank 0 writes OUT/student.pt and OUT/train_result.json.

    Reads only files (config, curated shards, caches), so it runs the same in a Ray Train worker.
    """
    out = Path(cfg.out)
    device = resolve_device(cfg.device) if not distributed else worker_device()
    ls = load_labelled(cfg.transfer)
    shards = transfer_shards(cfg.transfer)
    plan = phases(cfg.method, cfg, bool(shards))
    shardset = ShardSet.scan(shards) if "transfer" in plan else None
    caches = read_json(out / CACHES_FILE) if (out / CACHES_FILE).exists() else {}
    transfer_lookup = CacheLookup(_open(caches, "transfer_logits"), _open(caches, "transfer_features"))
    labelled_lookup = CacheLookup(None, _open(caches, "labelled_features"))
    feature_dim = transfer_lookup.feature_dim or labelled_lookup.feature_dim
    resolution = student_resolution(cfg.student, cfg.resolution)
    student = build_student(cfg.student, len(ls.classes), weights=cfg.student_weights, resolution=resolution,
                            seed=cfg.seed)
    mix = read_teacher_mix(out) if cfg.method in MULTI_TEACHER else None
    task = build_task(cfg.method, student, cfg, feature_dim, seed=cfg.seed, mix=mix)
    run_fp = fingerprint({"config": cfg.training_fingerprint(), "caches": {k: v["fingerprint"] for k, v in caches.items()},
                          "world": world, **({"mix": dataclasses.asdict(mix)} if mix else {})})
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
        result["aft_mu"] = {"mean": float(mu.mean()), "min": float(mu.min()), "max": float(mu.max()),
                            "per_source": per_source_weights(
                                mu, cfg.feature_sources,
                                [int(c.features.shape[1]) for c in (transfer_lookup.features or labelled_lookup.features)])}
    if rank == 0:
        with atomic_path(out / "student.pt") as tmp:
            torch.save(student.state_dict(), tmp)
        write_json(out / TRAIN_RESULT, result)
    return result


# ------------------------------------------------------------------ the whole run

def prepare_teachers(cfg: DistillConfig, ls: LabelledSet, query_set: Any, device: torch.device,
                     metrics: dict[str, Any]) -> list[Teacher]:
    """Rank the candidate teachers, adapt the selected ones (OUT/teachers/<name>/), evaluate those with a
    target-class head, write OUT/teachers.json (what training reads) and fill `metrics`."""
    selection = select_teachers(cfg, ls, device)
    weight = {r["name"]: r["weight"] for r in selection["ranking"]}
    teachers, described = [], []
    for name in selection["selected"]:
        t, info = prepare_teacher(cfg, ls, device, name=name, tdir=Path(cfg.out) / "teachers" / encoder_slug(name))
        d: dict[str, Any] = {"name": name, "weight": weight[name], "outputs": int(t.head.out_features),
                             "head": teacher_adaptation(cfg), "adaptation": info}
        if d["head"] != "source":
            ev = evaluate(t, test_batches(query_set.test, t.spec.image_size, cfg.eval_batch_size), ls.classes, device)
            d.update(accuracy=ev["accuracy"], per_class_accuracy=ev["per_class_accuracy"])
        teachers.append(t)
        described.append(d)
    write_json(Path(cfg.out) / TEACHERS_FILE, {"teachers": described, "selection": selection})
    top = described[0]
    metrics.update(teacher=top["name"], teacher_adapt=top["head"], teacher_accuracy=top.get("accuracy"),
                   teacher_adaptation=top["adaptation"], teachers=described,
                   teacher_ranking=[{k: r[k] for k in ("rank", "name", "similarity", "weight", "seconds")}
                                    for r in selection["ranking"]], similarity=cfg.similarity)
    return teachers


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


def check_names(cfg: DistillConfig) -> None:
    """Refuse an unknown student, teacher or feature encoder, or a device this machine lacks, before work."""
    from index.encoders import resolve_encoder

    resolve_device(cfg.device)
    resolve_student(cfg.student)
    if cfg.method != "labels_only":
        for name in dict.fromkeys(cfg.teacher_sources + cfg.feature_sources):
            resolve_encoder(name, cfg.teacher_weights if name == cfg.teacher else None, cfg.teacher_image_size)


def run_distill(cfg: DistillConfig, *, query_set: Any = None) -> dict[str, Any]:
    """Run (or resume) a distillation; returns the metrics also written to OUT/metrics.json.

    `query_set`: an object with .classes and .test (items with .label, .loader()); by default the
    named query set `cfg.queries` from curation.querysets. The run directory is owned
    (`index.outdir.owned_dir`): it may not be or lie inside the curated set.
    """
    cfg = cfg.replace(out=str(Path(cfg.out).resolve()), transfer=str(Path(cfg.transfer).resolve()))
    t_start = time.perf_counter()
    if query_set is None:
        from curation.querysets import get_query_set

        query_set = get_query_set(cfg.queries, data_root=cfg.data_root, seed=cfg.query_seed)
    check_query_set(cfg, query_set)
    check_names(cfg)
    inputs = {"--transfer": [cfg.transfer], "--data-root": [cfg.data_root] if cfg.data_root else []}
    with owned_dir(cfg.out, owning_also(OWNER, cfg.out, [cfg.cache_dir]), inputs):
        return _run_distill(cfg, query_set, t_start)


def _run_distill(cfg: DistillConfig, query_set: Any, t_start: float) -> dict[str, Any]:
    out = Path(cfg.out)
    ls = load_labelled(cfg.transfer)
    if list(query_set.classes) != list(ls.classes):
        raise InputError(f"query set {cfg.queries!r} has classes {list(query_set.classes)} but the curated set "
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
    clock = Clock()
    teachers: list[Teacher] = []
    if cfg.method in MULTI_TEACHER:
        teachers = prepare_teachers(cfg, ls, query_set, device, metrics)
    elif cfg.method != "labels_only":
        teacher, info = prepare_teacher(cfg, ls, device)
        ev = evaluate(teacher, test_batches(query_set.test, teacher.spec.image_size, cfg.eval_batch_size),
                      ls.classes, device)
        metrics.update(teacher=cfg.teacher, teacher_adapt=cfg.teacher_adapt, teacher_accuracy=ev["accuracy"],
                       teacher_per_class_accuracy=ev["per_class_accuracy"], teacher_adaptation=info)
        teachers = [teacher]
    clock.lap("teacher")
    caches = prepare_caches(cfg, ls, shardset, teachers, device)
    write_json(out / CACHES_FILE, caches)
    clock.lap("teacher outputs (cache)")
    del teachers
    metrics["caches"] = caches

    if cfg.workers > 1:
        from jobs.train_ray import train_with_ray

        train = train_with_ray(cfg.to_dict(), cfg.workers)
    else:
        train = train_student(cfg)
    metrics["training"] = train
    clock.lap("training")
    if not train["completed"]:
        metrics["completed"] = False
        return metrics

    student = build_student(cfg.student, len(ls.classes), resolution=resolution)
    student.load_state_dict(torch.load(out / "student.pt", map_location="cpu", weights_only=True))
    ev = evaluate(student.to(device), test_batches(query_set.test, resolution, cfg.eval_batch_size), ls.classes, device)
    clock.lap("evaluation")
    metrics.update(completed=True, test_accuracy=ev["accuracy"], per_class_accuracy=ev["per_class_accuracy"],
                   num_test=ev["num_test"], confusion=ev["confusion"], classes=list(ls.classes),
                   epoch_seconds={p["name"]: [e["seconds"] for e in p["epochs"]] for p in train["phases"]})
    if cfg.baseline and cfg.method != "labels_only":
        base = run_distill(cfg.replace(method="labels_only", out=str(out / "baseline"), baseline=False,
                                       teacher_head="probe"),
                           query_set=query_set)
        metrics["baseline_accuracy"] = base.get("test_accuracy")
    elif cfg.method == "labels_only":
        metrics["baseline_accuracy"] = ev["accuracy"]
    if train.get("aft_mu", {}).get("per_source"):
        blocks = train["aft_mu"]["per_source"]
        metrics["aft_source_weights"] = {b["name"]: b["mean"] for b in blocks}
        bar_plot(out / "aft_source_weights.png", [b["name"] for b in blocks], [b["mean"] for b in blocks],
                 title="AFT: learned feature weights per model", ylabel="mean sigmoid(s)")
    clock.lap("baseline and figures")
    metrics["timings"] = clock.parts
    metrics["seconds"] = time.perf_counter() - t_start
    metrics["config"] = cfg.to_dict()
    write_json(out / "metrics.json", metrics)
    write_run_report(out, metrics)
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
            f"{pct(metrics.get('baseline_accuracy'))} | skipped {json.dumps(skipped)} | {metrics['seconds']:.1f}s"
            f"{most_time(metrics.get('timings') or {})} | report {Path(metrics['config']['out']) / REPORT_FILE}")
