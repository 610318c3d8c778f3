"""Teachers for a run: adapt each on the labelled set, save the adaptation, load it back on a rerun.

    OUT/teacher/                 the adapted teacher (head, or whole model after finetuning) + done.json
    OUT/teachers/<name>/         the same per selected teacher of a multi-teacher method
    OUT/teachers.json            the selected teachers, their weights and outputs (what training reads)

`prepare_teacher` adapts one teacher (linear probe or finetune), or keeps its own pretrained head
(teacher_head='source'); `prepare_teachers` ranks the candidates of kd_nearest / kd_weighted by task
similarity and adapts the selected ones.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from distill.config import DistillConfig
from distill.data import LabelledSet, eval_transform, labelled_batches, steps_per_epoch, test_batches
from distill.evaluate import evaluate
from distill.methods import MULTI_TEACHER, TeacherMix
from distill.rank import rank_teachers
from distill.teachers import Teacher, TeacherCETask, build_source_teacher, build_teacher, linear_probe, weights_hash
from distill.trainer import PhasePlan, train_phase
from index.core.atomic import atomic_path, check_done, file_sha256, fingerprint, read_json, write_json
from index.core.contract import QUERIES_DRAW_FILE, encoder_slug

TEACHERS_FILE = "teachers.json"


def labelled_manifest(cfg: DistillConfig, ls: LabelledSet) -> dict[str, Any]:
    """The labelled set's identity in fingerprints: the curated directory's query draw and the keys."""
    return {"queries": file_sha256(Path(cfg.transfer) / QUERIES_DRAW_FILE), "keys": fingerprint(ls.keys),
            "count": len(ls)}


def teacher_adaptation(cfg: DistillConfig) -> str:
    """How the teachers' outputs are made: linear_probe | finetune (target classes), or source (own head)."""
    return "source" if cfg.method in MULTI_TEACHER and cfg.teacher_head == "source" else cfg.teacher_adapt


def _adaptation_inputs(cfg: DistillConfig, ls: LabelledSet, teacher: Teacher) -> dict[str, Any]:
    params = ({"steps": cfg.probe_steps, "weight_decay": cfg.probe_weight_decay}
              if cfg.teacher_adapt == "linear_probe" else
              {"epochs": cfg.teacher_epochs, "lr": cfg.teacher_lr, "batch_size": cfg.teacher_batch_size,
               "weight_decay": cfg.weight_decay, "warmup_frac": cfg.warmup_frac})
    return {"spec": teacher.spec.identity(), "adapt": cfg.teacher_adapt, "labelled": labelled_manifest(cfg, ls),
            "seed": cfg.seed, "augment": cfg.augment, "params": params}


def _adapt(cfg: DistillConfig, ls: LabelledSet, teacher: Teacher, tdir: Path, fp: str,
           device: torch.device) -> dict[str, Any]:
    """Fit the teacher on the labelled set: its head by linear probe, or the whole model by finetuning."""
    spec = teacher.spec
    if cfg.teacher_adapt == "linear_probe":
        images = torch.stack([eval_transform(im, spec.image_size) for im in ls.images])
        return linear_probe(teacher, images, torch.tensor(ls.labels), steps=cfg.probe_steps,
                            weight_decay=cfg.probe_weight_decay, batch_size=cfg.eval_batch_size)
    n = len(ls)
    bs = min(cfg.teacher_batch_size, n)
    spe = steps_per_epoch(n, bs)
    total = spe * cfg.teacher_epochs
    plan = PhasePlan("teacher-finetune", total, spe, cfg.teacher_lr, cfg.weight_decay, int(cfg.warmup_frac * total))
    res = train_phase(
        TeacherCETask(teacher), plan,
        lambda e, skip: labelled_batches(ls, seed=cfg.seed, epoch=e, batch_size=bs, resolution=spec.image_size,
                                         augment=cfg.augment, skip=skip),
        ckpt_dir=tdir / "finetune", run_fingerprint=fp, seed=cfg.seed, device=device, amp=cfg.amp,
        checkpoint_every=cfg.checkpoint_every, progress=cfg.progress)
    return {"steps": res.steps, "epochs": res.epochs}


def prepare_teacher(cfg: DistillConfig, ls: LabelledSet, device: torch.device, name: str | None = None,
                    tdir: Path | None = None) -> tuple[Teacher, dict[str, Any]]:
    """Build and adapt the teacher (`name`, default cfg.teacher) on the labelled set, or load the
    adaptation a previous run saved under `tdir` (default OUT/teacher). With teacher_head='source'
    (multi-teacher methods) the teacher keeps its own pretrained classifier and nothing is adapted."""
    name = name or cfg.teacher
    weights = cfg.teacher_weights if name == cfg.teacher else None
    if teacher_adaptation(cfg) == "source":
        teacher = build_source_teacher(name, weights=weights, image_size=cfg.teacher_image_size, device=device)
        return teacher.eval(), {"head": "source", "num_outputs": teacher.head.out_features,
                                "weights_hash": weights_hash(teacher.head)}
    teacher = build_teacher(name, len(ls.classes), weights=weights, image_size=cfg.teacher_image_size, device=device)
    inputs = _adaptation_inputs(cfg, ls, teacher)
    tdir = tdir or Path(cfg.out) / "teacher"
    fp = fingerprint(inputs)
    trained = teacher.head if cfg.teacher_adapt == "linear_probe" else teacher
    record = check_done(tdir / "done.json", fp)
    if record is not None:
        trained.load_state_dict(torch.load(tdir / "teacher.pt", map_location=device, weights_only=True))
        return teacher.eval(), record["info"]
    t0 = time.perf_counter()
    info = _adapt(cfg, ls, teacher, tdir, fp, device)
    info["seconds"] = time.perf_counter() - t0
    info["weights_hash"] = weights_hash(trained)
    with atomic_path(tdir / "teacher.pt") as tmp:
        torch.save(trained.state_dict(), tmp)
    write_json(tdir / "done.json", {"fingerprint": fp, "inputs": inputs, "info": info})
    return teacher.eval(), info


# ------------------------------------------------------------------ several teachers (kd_nearest, kd_weighted)

def select_teachers(cfg: DistillConfig, ls: LabelledSet, device: torch.device) -> dict[str, Any]:
    """Rank cfg.teacher_sources by task similarity on the labelled set; weights softmax(p * similarity),
    p = inf for kd_nearest. Teachers whose weight is exactly 0 are not used (no pass over the data)."""
    p = math.inf if cfg.method == "kd_nearest" else cfg.weight_temperature
    result = rank_teachers(cfg.teacher_sources, ls, labelled_manifest(cfg, ls), cfg.cache_root, metric=cfg.similarity,
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
            ev = evaluate(t, test_batches(query_set.test, t.spec.image_size, cfg.eval_batch_size), ls.classes, device,
                          progress=cfg.progress)
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
