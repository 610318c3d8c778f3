"""`distill` command: a thin layer over run_distill(DistillConfig).

    distill --method kd|aft|feature_kd|labels_only --transfer DIR --queries NAME \
            --teacher ENCODER --student TIMM_NAME --out DIR [--workers N] [--baseline] ...

Every DistillConfig field is a flag (`--field-name`); booleans take `--x/--no-x`, lists are comma
separated. Prints one summary line at the end; the metrics are in OUT/metrics.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any

from distill.config import DistillConfig

REQUIRED = ("method", "transfer", "queries", "out")
HELP = {
    "method": "distillation method: labels_only | kd | feature_kd | aft",
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


def main(argv: list[str] | None = None) -> int:
    from distill.run import run_distill, summary_line

    try:
        cfg = config_from_args(argv)
    except (ValueError, KeyError) as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    metrics = run_distill(cfg)
    print(summary_line(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
