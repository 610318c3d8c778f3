"""`curate`: build a task-related transfer set from a gallery index and a named query set.

    curate --queries eurosat_10shot --index IDX --size 50000 --out DIR [--strategy query_balanced]
    curate --config curate.yaml [--size 1000]          (a file of CurateConfig fields; flags override)

Every CurateConfig field is a flag. Prints one summary line at the end; the rest is in
DIR/manifest.json and DIR/report.html.
"""
from __future__ import annotations

import sys
import time

from curation.pipeline import CurateConfig, curate, summary_line
from index.core.errors import run_main
from index.core.flags import config_parser, parse_config
from index.threads import threads_for
from jobs.executors import make_executor


def parse(argv: list[str] | None = None) -> CurateConfig:
    return parse_config(CurateConfig, config_parser(CurateConfig, "curate", __doc__, argv=argv), argv)[0]


def build_executor(cfg: CurateConfig):
    """The executor `cfg.executor` names (Ray is imported only when a Ray executor starts)."""
    return make_executor(cfg.executor, num_workers=cfg.num_workers)


def _main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    t0 = time.perf_counter()
    with threads_for(cfg.threads):
        manifest = curate(cfg, executor=build_executor(cfg))
    print(summary_line(manifest, time.perf_counter() - t0), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("curate", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
