"""`curate`: build a task-related transfer set from a gallery index and a named query set.

    curate --queries eurosat_10shot --index IDX --size 50000 --out DIR [--strategy query_balanced]
"""
from __future__ import annotations

import argparse
import sys

from curation.changed import CHANGED_POLICIES
from curation.pipeline import CurateConfig, curate
from curation.querysets import list_query_sets
from curation.selection import SELECTORS
from curation.verify import VERIFIERS
from index.core.errors import run_main
from index.threads import HELP as THREADS_HELP, threads_for


def parse(argv: list[str] | None = None) -> CurateConfig:
    return _parse(argv)[0]


def _parse(argv: list[str] | None = None) -> tuple[CurateConfig, int | None]:
    p = argparse.ArgumentParser(prog="curate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", required=True, help=f"query set: {', '.join(list_query_sets())}")
    p.add_argument("--index", required=True, help="index directory written by curation/build_index.py")
    p.add_argument("--size", type=int, required=True, help="N, the transfer-set size")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--strategy", default="query_balanced", help=f"one of: {', '.join(SELECTORS.names())}")
    p.add_argument("--seed", type=int, default=0, help="query draw and random-drop seed")
    p.add_argument("--data-root", default=None, help="where the query set's dataset lives")
    p.add_argument("--dedup-threshold", default="auto",
                   help="'auto' (calibrated for the index's encoders) or a mean cosine; the paper: 0.99")
    p.add_argument("--leak-threshold", default="auto",
                   help="'auto' (calibrated) or a max cosine over encoders; the paper: 0.95")
    p.add_argument("--verify", default="align", choices=list(VERIFIERS),
                   help="second signal that confirms copies among the candidates (none: threshold only)")
    p.add_argument("--verify-threshold", default="auto",
                   help="'auto' (calibrated) or a lower limit on the aligned correlation, in [-1, 1]")
    p.add_argument("--verify-max-residual", default="auto",
                   help="'auto' (calibrated) or an upper limit on the aligned grey-level residual (inf: none)")
    p.add_argument("--key-threshold", default="auto",
                   help="'auto' (calibrated) or a pixel key similarity above which an image is also a "
                        "copy candidate, checked against its nearest references by pixel key (1: off)")
    p.add_argument("--copy-recall", type=float, default=0.99,
                   help="calibration target: recall of every kind of synthetic near-copy")
    p.add_argument("--calibration-images", type=int, default=300, help="references sampled for calibration")
    p.add_argument("--leak-review", default=None,
                   help="JSON list of gallery image ids a person judged not to be leaks")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per transfer shard")
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--max-k", type=int, default=None, help="cap on the per-query search depth")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    p.add_argument("--cache-dir", default=None, help="reference feature cache")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where original embedding, verification and crop materialisation run")
    p.add_argument("--num-workers", type=int, default=None, help="Ray actors (default: one per CPU)")
    p.add_argument("--changed-images", choices=list(CHANGED_POLICIES), default="refuse",
                   help="a gallery image whose bytes changed since indexing: refuse (stop before writing, "
                        "naming them) or skip (leave it out, counted in the manifest and summary)")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    a = p.parse_args(argv)
    return CurateConfig(queries=a.queries, index=a.index, size=a.size, out=a.out, strategy=a.strategy,
                        seed=a.seed, data_root=a.data_root, dedup_threshold=a.dedup_threshold,
                        leak_threshold=a.leak_threshold, verify=a.verify, verify_threshold=a.verify_threshold,
                        verify_max_residual=a.verify_max_residual, key_threshold=a.key_threshold,
                        copy_recall=a.copy_recall, calibration_images=a.calibration_images, leak_review=a.leak_review, shard_size=a.shard_size,
                        nprobe=a.nprobe, max_k=a.max_k, batch_size=a.batch_size, device=a.device,
                        cache_dir=a.cache_dir, executor=a.executor,
                        num_workers=a.num_workers, changed_images=a.changed_images), a.threads


def build_executor(cfg: CurateConfig):
    """The executor `cfg.executor` names (Ray is imported only when asked for)."""
    from jobs.executors import make_executor

    return make_executor(cfg.executor, **({"num_workers": cfg.num_workers} if cfg.executor == "ray" else {}))


def _main(argv: list[str] | None = None) -> int:
    cfg, threads = _parse(argv)
    with threads_for(threads):
        curate(cfg, executor=build_executor(cfg))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("curate", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
