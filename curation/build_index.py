"""Entry point of the indexing stage, in-process or as a Ray job.

    python curation/build_index.py --config jobs/demo.yaml --out DIR [--executor local|ray]
    ray job submit --working-dir . -- python curation/build_index.py --config jobs/demo.yaml --out DIR

Under `ray job submit` (RAY_ADDRESS is set) the default executor is Ray on that cluster.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from index.build import build_gallery_index  # noqa: E402
from index.config import load_index_config  # noqa: E402
from index.core.errors import run_main  # noqa: E402
from index.threads import HELP as THREADS_HELP, threads_for  # noqa: E402


def build(argv: list[str] | None = None) -> dict:
    """Parse the command line, build the index; returns its manifest (user errors raise)."""
    p = argparse.ArgumentParser(prog="build_index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="job config YAML (see jobs/*.yaml)")
    p.add_argument("--out", required=True, help="index directory to write")
    p.add_argument("--executor", choices=["local", "ray"], default=None,
                   help="default: the config's, or ray when submitted as a Ray job")
    p.add_argument("--num-workers", type=int, default=None, help="Ray actors (default: one per CPU)")
    p.add_argument("--gallery", default=None, help="override the config's gallery path/glob")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    args = p.parse_args(argv)

    cfg = load_index_config(args.config, gallery=args.gallery, num_workers=args.num_workers)
    name = args.executor or ("ray" if os.environ.get("RAY_ADDRESS") else cfg.executor)
    from jobs.executors import make_executor
    kwargs = {} if name == "local" else {"num_workers": cfg.num_workers, "gpus_per_worker": cfg.gpus_per_worker}
    with threads_for(args.threads):
        return build_gallery_index(cfg, args.out, make_executor(name, **kwargs))


def main(argv: list[str] | None = None) -> int:
    return run_main("build_index", build, argv)


if __name__ == "__main__":
    sys.exit(main())
