"""curate's stages against the work a curated set cannot do without, and against the hardware.

    python bench/curate_stages.py [--data demo-data] [--size 1000] [--out bench/results/curate_stages.json]
    python bench/curate_stages.py --smoke

Runs `curate` as a user would (the console script in a fresh process, a fresh `--cache-dir`, so the
target task's references are embedded and the copy rules calibrated) on the demo's index
(`DATA/idx`, built by `make demo`; built here the same way when absent), and reads the run's own
account of its time (the manifest's `timings.parts`) and the images it embedded (its stage records).

The work a curated set needs is the search, embedding the queries, the gallery originals and the
target task's references, and writing the shards: `total_over_essential` is the run's wall time over
the sum of those parts (goal <= 2); the rest is copy verification, calibration, dedup and
decontamination. Beside it, for the curate process as a whole (getrusage of the child): user and
system CPU seconds (goal: system <= 10% of user) and minor page faults per embedded image; for the
two embedding parts, images per second against their compute bound (the index encoder's FLOPs per
image over the sgemm rate measured in this process, `bench/hardware.py`).

`--smoke`: a tiny demo gallery (40 in-domain images, 40 stamps, a few photos) indexed with the
random-init `test-tiny-timm` encoder, curate of 20 items with 20 calibration images; a run check.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from index.core.allocator import tune_allocator  # noqa: E402

tune_allocator()

import torch  # noqa: E402

from hardware import emit, machine, model_flops, sgemm_flops  # noqa: E402
from index.core import contract  # noqa: E402

BIN = Path(sys.executable).parent
QUERIES = "fashion_mnist_10shot"
ESSENTIAL = ("retrieve", "embed queries", "embed references", "embed originals", "write")
SMOKE_GALLERY = {"pool": 40, "leaks": 2, "crops_per_stamp": 1, "crops_per_photo": 1, "stamps": 40}


def log(msg: str) -> None:
    print(f"[curate_stages {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_index(data: Path, smoke: bool) -> Path:
    """DATA/idx, built as `make demo` builds it (the demo gallery, then build-index with jobs/demo.yaml)
    unless its manifest is there; the smoke index uses the tiny random-init encoder at 32 px."""
    idx = data / "idx"
    if (idx / contract.MANIFEST_FILE).exists():
        return idx
    from jobs.demo_gallery import build_demo_gallery
    log(f"demo gallery -> {data / 'gallery'}")
    with contextlib.redirect_stdout(sys.stderr):   # stdout is the JSON's
        build_demo_gallery(data, **(SMOKE_GALLERY if smoke else {}))
    cfg = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
    cfg["gallery"] = str(data / "gallery" / "*.tar")
    if smoke:
        cfg.update(encoders=["test-tiny-timm"], image_size=32)
        cfg["crops"]["size"] = 32
    path = data / "index.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log(f"build-index -> {idx}")
    subprocess.run([str(BIN / "build-index"), "--config", str(path), "--out", str(idx)], check=True,
                   stdout=sys.stderr)
    return idx


def run_curate(idx: Path, out: Path, size: int, extra: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """curate in its own process: (its manifest, its wall / user / system seconds and minor faults)."""
    cmd = [str(BIN / "curate"), "--queries", QUERIES, "--index", str(idx), "--size", str(size),
           "--out", str(out / "curated"), "--cache-dir", str(out / "cache"), *extra]
    log("$ " + " ".join(cmd))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    usage = {"wall_s": round(wall, 2), "user_s": round(after.ru_utime - before.ru_utime, 2),
             "system_s": round(after.ru_stime - before.ru_stime, 2),
             "minor_faults": after.ru_minflt - before.ru_minflt}
    return json.loads((out / "curated" / contract.MANIFEST_FILE).read_text()), usage


def embedded_images(curated: Path) -> dict[str, int]:
    """Images the run embedded: the gallery originals it read (its filter record) and the target task's
    references (its query set's)."""
    from curation.querysets import get_query_set
    record = json.loads((curated / contract.STAGES_DIR / "filter.json").read_text())
    return {"originals": len(record["data"]["originals"]), "references": len(get_query_set(QUERIES).references)}


def encoder_flops(manifest_encoders: list[dict[str, Any]]) -> float:
    """FLOPs of one image through every encoder of the index, at each one's input size."""
    from index.encoders import build_encoder, resolve_encoder
    total = 0
    for e in manifest_encoders:
        spec = resolve_encoder(e["name"], e.get("weights"), e.get("image_size"))
        with torch.no_grad():
            total += model_flops(build_encoder(spec), torch.zeros(1, 3, spec.image_size, spec.image_size))
    return float(total)


def target(value: float | None, goal: str, met: bool | None) -> dict[str, Any]:
    return {"value": value, "goal": goal, "met": met}


def run(data: Path, out: Path, size: int, smoke: bool) -> dict[str, Any]:
    idx = ensure_index(data, smoke)
    extra = ["--calibration-images", "20"] if smoke else []
    manifest, usage = run_curate(idx, out, size, extra)
    parts = {k: round(v, 3) for k, v in manifest["timings"]["parts"].items()}
    essential = sum(parts.get(k, 0.0) for k in ESSENTIAL)
    images = embedded_images(out / "curated")
    index_manifest = json.loads((idx / contract.MANIFEST_FILE).read_text())
    flops = encoder_flops(index_manifest["encoders"])
    sgemm = sgemm_flops()
    bound = sgemm / flops
    embedding = {}
    for part, n in (("embed references", images["references"]), ("embed originals", images["originals"])):
        seconds = parts.get(part, 0.0)
        rate = n / seconds if seconds > 0 else None
        embedding[part] = {"images": n, "seconds": seconds, "images_per_s": round(rate, 1) if rate else None,
                           "compute_bound_images_per_s": round(bound, 1),
                           "of_compute_bound": round(rate / bound, 3) if rate else None}
    total = usage["wall_s"]
    ratio = round(total / essential, 2) if essential > 0 else None
    share = round(usage["system_s"] / usage["user_s"], 3) if usage["user_s"] else None
    faults = round(usage["minor_faults"] / max(1, images["originals"] + images["references"]), 1)
    targets = {
        "total_over_essential": target(ratio, "<= 2 (wall over search + embedding + write)",
                                       ratio is not None and ratio <= 2),
        "system_over_user": target(share, "<= 0.1", share is not None and share <= 0.1),
        "faults_per_embedded_image": target(faults, "<= 10", faults <= 10),
    }
    for part, e in embedding.items():
        v = e["of_compute_bound"]
        targets[part.replace(" ", "_") + "_of_compute_bound"] = target(v, ">= 0.7", v is not None and v >= 0.7)
    return {"bench": "curate_stages", "smoke": smoke, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
            "index": str(idx), "index_factory": index_manifest.get("index_factory"),
            "num_vectors": index_manifest.get("num_vectors"), "size": size, "counts": manifest["counts"],
            "verified_pairs": manifest.get("verified_pairs"), "usage": usage, "parts": parts,
            "essential_s": round(essential, 2), "not_essential": {k: v for k, v in parts.items() if k not in ESSENTIAL},
            "embedded_images": images, "encoder_flops_per_image": flops, "sgemm_gflops": round(sgemm / 1e9, 2),
            "embedding": embedding, "torch": torch.__version__, "python": platform.python_version(),
            "targets": targets}



def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="demo-data", help="the demo's data directory (its idx/ is used or built)")
    ap.add_argument("--size", type=int, default=1000, help="curated items N (the demo's)")
    ap.add_argument("--smoke", action="store_true", help="a tiny gallery and run in a temporary directory")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vfm-curate-stages-") as tmp:
        data = Path(tmp) / "data" if args.smoke else Path(args.data)
        res = run(data, Path(tmp), 20 if args.smoke else args.size, args.smoke)
    emit(res, args.out)
    return res


if __name__ == "__main__":
    main()
