"""`distill` command: a thin layer over run_distill(DistillConfig), and `distill rank`.

    distill --method kd|aft|feature_kd|labels_only|kd_nearest|kd_weighted --transfer DIR --queries NAME \
            --teacher ENCODER --student TIMM_NAME --out DIR [--workers N] [--baseline] ...
    distill rank --queries NAME --teachers A,B,C [--transfer DIR] [--out DIR] [--probe-accuracy]

Every DistillConfig field is a flag (`--field-name`); booleans take `--x/--no-x`, lists are comma
separated. Prints one summary line at the end; the metrics are in OUT/metrics.json. `rank` prints
the teachers ranked by task similarity on the labelled probe set and writes OUT/ranking.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any

from distill.config import DistillConfig
from index.core.errors import run_main
from index.threads import HELP as THREADS_HELP, threads_for

REQUIRED = ("method", "transfer", "queries", "out")
HELP = {
    "method": "distillation method: labels_only | kd | feature_kd | aft | kd_nearest | kd_weighted",
    "teachers": "comma-separated candidate teachers for kd_nearest / kd_weighted (default: --teacher)",
    "similarity": "task similarity that ranks the teachers: parc | cka | rsa",
    "weight_temperature": "p of the teacher weights softmax(p * similarity): 0 equal weights, inf the nearest",
    "teacher_head": "multi-teacher pseudo-labels: probe (linear probe on the labels) | source (the model's own head)",
    "transfer": "curated directory (transfer-*.tar, queries-*.tar, queries.json)",
    "queries": "named query set; its test split is the evaluation set",
    "out": "run directory (config, checkpoints, caches, metrics.json)",
    "teacher": "VFM encoder name from the encoder registry (index.encoders)",
    "teacher_adapt": "linear_probe | finetune",
    "teacher_image_size": "teacher input resolution (CNN teachers; default: the encoder's own)",
    "feature_encoders": "comma-separated encoders whose features AFT / feature_kd use (default: the teacher)",
    "student": "timm model name or a registered student (test-tiny-student)",
    "student_weights": "local pretrained weights file for the student (nothing is downloaded)",
    "resolution": "student input resolution (default: the student's own)",
    "workers": "data-parallel workers; > 1 trains with Ray Train (gloo, CPU)",
    "baseline": "also train labels_only with the same student and report its accuracy",
    "cache_dir": "teacher output cache directory (default OUT/cache); reused across runs",
    "stop_at_step": "end training after this many steps without saving, as a kill would (testing resume)",
    "threads": THREADS_HELP,
}


def _flag_kwargs(tp: Any) -> dict[str, Any]:
    """argparse kwargs for a field type: X | None -> X; bool -> --x/--no-x; tuple[str, ...] -> comma list."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(tp) is tuple:
        return {"type": lambda s: tuple(x for x in s.split(",") if x)}
    return {"type": tp}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(DistillConfig)
    for f in dataclasses.fields(DistillConfig):
        kw = _flag_kwargs(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        if f.name in REQUIRED:
            p.add_argument(flag, required=True, help=HELP.get(f.name), **kw)
        else:
            p.add_argument(flag, default=f.default, help=HELP.get(f.name, " "), **kw)
    return p


def config_from_args(argv: list[str] | None = None) -> DistillConfig:
    ns = build_parser().parse_args(argv)
    return DistillConfig(**vars(ns))


def build_rank_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill rank", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Rank candidate teachers by task similarity (PARC, CKA, RSA) on the "
                                            "labelled probe set, from cached features")
    p.add_argument("--queries", required=True, help="named query set: its labelled shots are the probe set")
    p.add_argument("--teachers", required=True, type=lambda s: [x for x in s.split(",") if x],
                   help="comma-separated encoder names from the encoder registry")
    p.add_argument("--transfer", default=None,
                   help="curated directory: its labelled query images are the probe set (and its caches are shared "
                        "with `distill` runs); without it they are drawn from the named query set")
    p.add_argument("--out", default=None, help="directory for ranking.json; without it the ranking is only printed")
    p.add_argument("--probe-accuracy", action="store_true",
                   help="also rank by a linear probe's cross-validated accuracy on the probe set")
    p.add_argument("--similarity", default="parc", help="metric the ranking is sorted by: parc | cka | rsa")
    p.add_argument("--weight-temperature", type=float, default=None,
                   help="also report kd_weighted's teacher weights softmax(p * similarity) for this p")
    p.add_argument("--teacher-image-size", type=int, default=None, help="teacher input resolution (CNN teachers)")
    p.add_argument("--cache-dir", default=None, help="feature cache directory; without it OUT/cache, or a temporary one")
    p.add_argument("--data-root", default=None)
    p.add_argument("--query-seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--probe-steps", type=int, default=100)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    return p


def rank_main(argv: list[str] | None) -> int:
    import tempfile
    from pathlib import Path

    import torch

    from distill.rank import format_ranking, rank_teachers, write_ranking
    from index.device import pick_device

    a = build_rank_parser().parse_args(argv)
    ls, data = _probe_set(a)
    cache = a.cache_dir or (str(Path(a.out) / "cache") if a.out else tempfile.mkdtemp(prefix="distill-rank-"))
    with threads_for(a.threads):
        result = rank_teachers(a.teachers, ls, data, cache, metric=a.similarity, image_size=a.teacher_image_size,
                               device=torch.device(pick_device(a.device)), probe_accuracy=a.probe_accuracy,
                               probe_steps=a.probe_steps, weight_temperature=a.weight_temperature,
                               batch_size=a.eval_batch_size)
    result["queries"] = a.queries
    print(format_ranking(result))
    if a.out:
        from distill.plots import ranking_plot

        print(f"wrote {write_ranking(a.out, result)} and {ranking_plot(a.out, result)}")
    return 0


def _probe_set(a: argparse.Namespace):
    """(LabelledSet, its manifest): the curated directory's labelled images, or the named query set's shots."""
    from distill.data import LabelledSet, load_labelled
    from index.core.atomic import fingerprint

    if a.transfer:
        from distill.adaptation import labelled_manifest

        ls = load_labelled(a.transfer)
        return ls, labelled_manifest(types.SimpleNamespace(transfer=a.transfer), ls)
    from curation.querysets import get_query_set

    qs = get_query_set(a.queries, data_root=a.data_root, seed=a.query_seed)
    ls = LabelledSet(keys=[q.id for q in qs.queries], images=[q.load().convert("RGB") for q in qs.queries],
                     labels=[q.label for q in qs.queries], classes=list(qs.classes), name=qs.name)
    return ls, {"queries": fingerprint(qs.to_draw_dict()), "keys": fingerprint(ls.keys), "count": len(ls)}


def distill_main(argv: list[str] | None) -> int:
    from distill.run import run_distill, summary_line

    cfg = config_from_args(argv)
    launcher = None
    if cfg.workers > 1:   # the cluster lives in jobs/: the library is handed its launcher
        from jobs.train_ray import train_with_ray as launcher
    with threads_for(cfg.threads):
        metrics = run_distill(cfg, launcher=launcher)
    print(summary_line(metrics))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "rank":
        return run_main("distill rank", rank_main, argv[1:])
    return run_main("distill", distill_main, argv)


if __name__ == "__main__":
    sys.exit(main())
