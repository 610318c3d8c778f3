"""Training-epoch cost of the distillation methods against plain labels-only training.

Same student, same data (one synthetic curated set streamed from its shards with the same
augmentation), measured in one run: labels_only (CE), aft (CE + beta * kernel distance on cached
pretrained features) and kd (KL on cached teacher logits). Teacher outputs are cached once before
timing, as the methods do. Each method trains `--epochs` epochs; the first is a warm-up, the
reported epoch time is the minimum of the others (robust to other load on the machine).
Goals: aft / labels_only <= 1.05, kd / labels_only <= 1.10. Prints JSON.

    python bench/distill_bench.py [--student mobilenetv3_large_100] [--resolution 128] [--images 256]
    python bench/distill_bench.py --smoke   # tiny student, 32 images, one round: seconds (a run check, not figures)

``targets`` holds both goals as {"value", "goal", "met"}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from hardware import Usage, bound_report, bound_targets, model_flops, sgemm_flops
from index.core.allocator import tune_allocator
from distill.cache import CacheLookup, build_or_load_cache, cache_pass
from distill.data import ShardSet, steps_per_epoch, transfer_batches, transfer_shards
from distill.methods import build_task
from distill.students import build_student
from distill.teachers import build_teacher
from distill.trainer import PhasePlan, train_phase
from index.device import pick_device

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers shared with the tests
from fixtures_curated import write_curated_dir  # noqa: E402


class _Opts:
    temperature = 1.0
    beta = 10.0
    aft_lr = 1e-2
    feature_loss = "cosine"
    contrastive_temperature = 0.07


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default="mobilenetv3_large_100")
    ap.add_argument("--teacher", default="test-tiny-timm")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=160, help="stored crop size in the shards")
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="repeat the three methods, alternating order")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true",
                    help="test-tiny-student at 32 px, 32 images, 2 epochs, 1 round (a run check, not figures)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.student, args.resolution, args.images, args.image_size = "test-tiny-student", 32, 32, 48
        args.classes, args.batch_size, args.epochs, args.rounds = 4, 16, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(pick_device(args.device))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_curated_dir(root / "cur", num_classes=args.classes, shots=2, transfer=args.images,
                          size=args.image_size, shard_size=64)
        shards = transfer_shards(root / "cur")
        n = ShardSet.scan(shards).count
        teacher = build_teacher(args.teacher, args.classes, device=device).eval()
        t0 = time.perf_counter()
        cache = build_or_load_cache(root / "cache", {"bench": args.teacher}, cache_pass(
            teacher.forward_both, transfer_batches(shards, n, seed=0, epoch=0, batch_size=64,
                                                   resolution=teacher.spec.image_size, augment=False, shuffle=False),
            device, True))
        cache_seconds = time.perf_counter() - t0
        logits_lookup = CacheLookup(cache)
        feature_lookup = CacheLookup(None, [cache])

        def label(key: str) -> int:   # synthetic transfer crop i has class i % classes
            return int(key[1:]) % args.classes

        setups = {
            "labels_only": (None, label),
            "aft": (feature_lookup, label),
            "kd": (logits_lookup, None),
        }
        spe = steps_per_epoch(n, args.batch_size)
        times: dict[str, list[float]] = {m: [] for m in setups}
        use = {m: Usage() for m in setups}   # whole phases, the warm-up epoch included
        for r in range(args.rounds):
            order = list(setups) if r % 2 == 0 else list(reversed(setups))
            for method in order:
                lookup, labels = setups[method]
                student = build_student(args.student, args.classes, resolution=args.resolution, seed=0)
                task = build_task(method, student, _Opts(), feature_lookup.feature_dim, seed=0)
                plan = PhasePlan(method, spe * args.epochs, spe, 1e-3, 0.05, 0)

                def batches(epoch: int, skip: int, lookup=lookup, labels=labels):
                    return transfer_batches(shards, n, seed=0, epoch=epoch, batch_size=args.batch_size,
                                            resolution=args.resolution, augment=True, skip=skip,
                                            lookup=lookup, labels=labels)
                with use[method]:
                    res = train_phase(task, plan, batches, ckpt_dir=root / f"ckpt-{method}-{r}",
                                      run_fingerprint="bench", seed=0, device=device, checkpoint_every=0,
                                      progress=False)
                times[method].extend(e["seconds"] for e in res.epochs[1:])
        best = {m: min(v) for m, v in times.items()}
        goals = {"aft_over_labels_only": 1.05, "kd_over_labels_only": 1.10}
        ratios = {k: round(best[k.split("_over_")[0]] / best["labels_only"], 4) for k in goals}
        # against the hardware: a training step's FLOPs (forward + backward) over the sgemm rate
        student = build_student(args.student, args.classes, resolution=args.resolution, seed=0).to(device)
        x = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device)
        y = torch.zeros(args.batch_size, dtype=torch.long, device=device)
        flops = model_flops(lambda: torch.nn.functional.cross_entropy(student(x), y).backward()) / args.batch_size
        sgemm = sgemm_flops()
        images = n * args.epochs * args.rounds
        hardware = {"sgemm_gflops": round(sgemm / 1e9, 2), "train_flops_per_image": int(flops),
                    **{m: bound_report(images, flops, sgemm, u) for m, u in use.items()}}
        targets = {k: {"value": ratios[k], "goal": f"<= {g}", "met": ratios[k] <= g} for k, g in goals.items()}
        if device.type == "cpu":
            targets.update(bound_targets("train", hardware["labels_only"]))
        print(json.dumps({
            "targets": targets,
            "hardware": hardware,
            "smoke": args.smoke,
            "aft_over_labels_only": round(best["aft"] / best["labels_only"], 4),
            "kd_over_labels_only": round(best["kd"] / best["labels_only"], 4),
            "goals": {"aft_over_labels_only": 1.05, "kd_over_labels_only": 1.10},
            "epoch_seconds_min": {m: round(v, 4) for m, v in best.items()},
            "epoch_seconds_all": {m: [round(x, 4) for x in v] for m, v in times.items()},
            "cache_build_seconds": round(cache_seconds, 3),
            "setup": {"student": args.student, "resolution": args.resolution, "images": n,
                      "batch_size": args.batch_size, "steps_per_epoch": spe, "teacher": args.teacher,
                      "feature_dim": feature_lookup.feature_dim, "device": str(device),
                      "torch_threads": torch.get_num_threads()},
        }, indent=2))


if __name__ == "__main__":
    tune_allocator()  # index.core.allocator: as every command runs
    main()
