"""`distill`: train a small student from a VFM on a curated set (run_distill), or rank teachers.

    distill [train] --method kd|aft|feature_kd|labels_only|kd_nearest|kd_weighted --transfer DIR \\
            --queries NAME --teacher ENCODER --student TIMM_NAME --out DIR [--workers N] [--baseline] ...
    distill rank --queries NAME --teachers A,B,C [--transfer DIR] [--out DIR] [--probe-accuracy]

Every DistillConfig field is a flag of `distill` (`distill train` is the same command), every
RankConfig field one of `distill rank`; `--config FILE` takes either as a YAML/JSON mapping.
`distill` prints one summary line at the end; the metrics are in OUT/metrics.json. `rank` prints
the teachers ranked by task similarity on the labelled probe set and writes OUT/ranking.json.
"""
from __future__ import annotations

import sys

from distill.config import DistillConfig
from distill.plots import ranking_plot
from distill.rank import format_ranking, write_ranking
from distill.ranking import RankConfig, rank
from distill.run import run_distill, summary_line
from index.core.errors import run_main
from index.core.flags import config_parser, parse_config
from index.threads import threads_for
from jobs.train_ray import train_with_ray


def config_from_args(argv: list[str] | None = None) -> DistillConfig:
    parser = config_parser(DistillConfig, "distill", __doc__, argv=argv,
                           epilog="subcommands: distill rank --help (rank teachers); distill train (this command)")
    return parse_config(DistillConfig, parser, argv)[0]


def rank_config_from_args(argv: list[str] | None = None) -> RankConfig:
    parser = config_parser(RankConfig, "distill rank", argv=argv,
                           description="Rank candidate teachers by task similarity (PARC, CKA, RSA) on the "
                                       "labelled probe set, from cached features")
    return parse_config(RankConfig, parser, argv)[0]


def rank_main(argv: list[str] | None) -> int:
    cfg = rank_config_from_args(argv)
    with threads_for(cfg.threads):
        result = rank(cfg)
    print(format_ranking(result))
    if cfg.out:
        print(f"wrote {write_ranking(cfg.out, result)} and {ranking_plot(cfg.out, result)}")
    return 0


def distill_main(argv: list[str] | None) -> int:
    cfg = config_from_args(argv)
    # the cluster lives in jobs/: the library is handed its launcher
    launcher = train_with_ray if cfg.workers > 1 else None
    with threads_for(cfg.threads):
        metrics = run_distill(cfg, launcher=launcher)
    print(summary_line(metrics))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "rank":
        return run_main("distill rank", rank_main, argv[1:])
    return run_main("distill", distill_main, argv[1:] if argv and argv[0] == "train" else argv)


if __name__ == "__main__":
    sys.exit(main())
