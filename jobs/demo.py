"""`make demo`: the whole pipeline on the embedded demo data, with the same commands a user types.

    build gallery (jobs.demo_gallery, via img2dataset from a loopback server)
    build-index --config jobs/demo.yaml --out DATA/idx
    curate --queries fashion_mnist_10shot --index DATA/idx --size N --out DATA/curated
    curate ... --strategy random --out DATA/random            (a random gallery subset of the same size)
    distill --method labels_only ...; distill --method kd --transfer DATA/curated ...;
    distill --method kd --transfer DATA/random ...
    distill rank --teachers efficientnet_lite0,efficientnet_lite1 ...   (which pretrained model to learn from)
    -> one table (method, transfer set, test accuracy) and the paths of every output.

Each step is skipped when its output is complete (its manifest / metrics exist), so a rerun resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
QUERIES = "fashion_mnist_10shot"


def run(cmd: list[str], done: Path) -> float:
    """Run a pipeline command (printed first, as a user would type it) unless its output is complete."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    if done.exists():
        print(f"  (done: {done})")
        return 0.0
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return time.perf_counter() - t


def distill_cmd(data: Path, method: str, transfer: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [str(BIN / "distill"), "--method", method, "--transfer", str(transfer), "--queries", QUERIES,
            "--teacher", "efficientnet_lite0", "--teacher-image-size", str(args.image_size),
            "--student", args.student, "--resolution", str(args.resolution),
            "--transfer-epochs", str(args.transfer_epochs), "--finetune-epochs", str(args.finetune_epochs),
            "--cache-dir", str(data / "teacher-cache"), "--out", str(out)]


def ranking_line(ranking: dict) -> str:
    """One line per `distill rank` output: teachers best first with their similarity and probe accuracy."""
    metric = ranking["metric"]
    return ", ".join(f"{r['rank']}. {r['name']} ({metric} {r['similarity'][metric]:.3f}"
                     + (f", probe accuracy {r['probe_accuracy']:.2f}" if r.get("probe_accuracy") is not None else "")
                     + ")" for r in ranking["ranking"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo-data")
    p.add_argument("--size", type=int, default=1000, help="transfer-set size N")
    p.add_argument("--image-size", type=int, default=96, help="teacher input resolution")
    p.add_argument("--student", default="mobilenetv3_small_050", help="timm student (0.58M parameters, 8x fewer than the teacher)")
    p.add_argument("--resolution", type=int, default=64, help="student input resolution")
    p.add_argument("--transfer-epochs", type=int, default=40)
    p.add_argument("--finetune-epochs", type=int, default=20)
    a = p.parse_args(argv)
    data = Path(a.data)
    t0 = time.perf_counter()
    steps: dict[str, float] = {}
    py = str(BIN / "python")
    steps["gallery"] = run([py, "-m", "jobs.demo_gallery", "--out", str(data)], data / "gallery.done.json")
    steps["index"] = run([str(BIN / "build-index"), "--config", "jobs/demo.yaml", "--out", str(data / "idx"),
                          "--gallery", str(data / "gallery" / "*.tar")], data / "idx" / "manifest.json")
    for name, strategy in (("curated", "query_balanced"), ("random", "random")):
        steps[f"curate {name}"] = run(
            [str(BIN / "curate"), "--queries", QUERIES, "--index", str(data / "idx"), "--size", str(a.size),
             "--strategy", strategy, "--out", str(data / name), "--cache-dir", str(data / "feature-cache")],
            data / name / "manifest.json")
    runs = [("labels_only", "none (labels only)", data / "curated", data / "runs" / "labels_only"),
            ("kd", f"curated, query_balanced, N={a.size}", data / "curated", data / "runs" / "kd_curated"),
            ("kd", f"random gallery subset, N={a.size}", data / "random", data / "runs" / "kd_random")]
    for method, _, transfer, out in runs:
        steps[f"distill {out.name}"] = run(distill_cmd(data, method, transfer, out, a), out / "metrics.json")

    teachers = "efficientnet_lite0,efficientnet_lite1"
    steps["rank"] = run([str(BIN / "distill"), "rank", "--queries", QUERIES, "--transfer", str(data / "curated"),
                         "--teachers", teachers, "--teacher-image-size", str(a.image_size), "--probe-accuracy",
                         "--cache-dir", str(data / "teacher-cache"), "--out", str(data / "rank")],
                        data / "rank" / "ranking.json")

    rows = []
    for method, label, _, out in runs:
        m = json.loads((out / "metrics.json").read_text())
        rows.append((method, label, m["test_accuracy"], m.get("teacher_accuracy")))
    teacher = next((t for *_, t in rows if t is not None), None)
    print("\n" + "=" * 72)
    print(f"{'method':<14}{'transfer set':<40}{'test accuracy':>14}")
    print("-" * 72)
    for method, label, acc, _ in rows:
        print(f"{method:<14}{label:<40}{acc:>14.4f}")
    if teacher is not None:
        print(f"{'(teacher)':<14}{'efficientnet_lite0 linear probe':<40}{teacher:>14.4f}")
    print("=" * 72)
    ranking = json.loads((data / "rank" / "ranking.json").read_text())
    print(f"teachers: {ranking_line(ranking)}")
    print(f"reports:  curated set {(data / 'curated' / 'report.html').resolve()}")
    print(f"          distillation {(data / 'runs' / 'kd_curated' / 'report.html').resolve()}"
          f" (every run directory under {data / 'runs'} has one; ranking plot {data / 'rank' / 'ranking.svg'})")
    print(f"outputs:  index {data / 'idx'}, curated {data / 'curated'}, random {data / 'random'}, "
          f"runs {data / 'runs'}, ranking {data / 'rank' / 'ranking.json'}")
    print(f"pipeline time: {time.perf_counter() - t0:.0f} s "
          + ", ".join(f"{k} {v:.0f} s" for k, v in steps.items() if v))


if __name__ == "__main__":
    main()
