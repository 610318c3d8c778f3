"""Download a url list into a WebDataset gallery with img2dataset, and summarise its stats.

A thin wrapper around ``img2dataset.download``: WebDataset output (``00000.tar`` with ``key.jpg``,
``key.json``, ``key.txt`` when captions are given, plus img2dataset's ``00000.parquet`` and
``00000_stats.json``), JPEG encoding, no wandb, the multiprocessing distributor, a short timeout
and no retries. By default images keep their original size; ``max_side`` shrinks larger ones so
that their longer side is ``max_side`` (aspect kept, never upscaled).

img2dataset writes each ``_stats.json`` last, so a tar without one is incomplete (the run was
killed); a rerun into the same folder resumes, skipping the shards whose stats exist.

    python -m index.download urls.txt gallery/ --max-side 512
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from index.core.registry import choice
from index.core.errors import ConfigError, MissingInputError, run_main

INPUT_FORMATS = ("txt", "txt.gz", "csv", "csv.gz", "tsv", "tsv.gz", "json", "json.gz",
                 "jsonl", "jsonl.gz", "parquet")
_TABLE_FORMATS = INPUT_FORMATS[2:]


def input_format_of(url_list: str) -> str:
    """img2dataset's input_format from the file name, e.g. 'urls.csv.gz' -> 'csv.gz'."""
    name = Path(url_list).name.lower()
    for fmt in sorted(INPUT_FORMATS, key=len, reverse=True):
        if name.endswith("." + fmt):
            return fmt
    raise ConfigError(f"cannot tell the format of url list {url_list!r} from its name; "
                     f"valid extensions: {', '.join('.' + f for f in INPUT_FORMATS)}")


def _table_columns(url_list: str, fmt: str) -> list[str]:
    if fmt == "parquet":
        import pyarrow.parquet as pq
        return list(pq.read_schema(url_list).names)
    import pandas as pd
    if fmt.startswith(("csv", "tsv")):
        return list(pd.read_csv(url_list, nrows=0, sep="\t" if fmt.startswith("tsv") else ",").columns)
    return list(pd.read_json(url_list, lines=fmt.startswith("jsonl"), nrows=1 if fmt.startswith("jsonl") else None)
                .columns)


def summarize(out_dir: str) -> dict[str, Any]:
    """Totals over every ``*_stats.json`` in `out_dir`; tars without stats are listed as incomplete."""
    out = Path(out_dir)
    totals = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    status: dict[str, int] = {}
    done = []
    for f in sorted(glob.glob(str(out / "*_stats.json"))):
        stats = json.loads(Path(f).read_text())
        done.append(Path(f).name[: -len("_stats.json")])
        for k in totals:
            totals[k] += int(stats.get(k, 0))
        for k, v in stats.get("status_dict", {}).items():
            status[k] = status.get(k, 0) + int(v)
    tars = sorted(p.stem for p in out.glob("*.tar"))
    return {"out_dir": str(out), **totals, "status": dict(sorted(status.items())),
            "shards": tars, "incomplete_shards": [t for t in tars if t not in done]}


def download(url_list: str, out_dir: str, *, max_side: int | None = None, processes: int = 1,
             threads: int = 4, timeout: int = 5, retries: int = 0, samples_per_shard: int = 10_000,
             url_col: str = "url", caption_col: str | None = "auto", input_format: str | None = None,
             encode_quality: int = 95, min_image_size: int = 0, resume: bool = True) -> dict[str, Any]:
    """Download `url_list` into WebDataset shards under `out_dir`; return ``summarize(out_dir)``.

    url_list: ``.txt`` (one url a line) or a table (csv/tsv/json/jsonl/parquet, optionally .gz)
    with a `url_col` column. caption_col='auto' takes a 'caption' column when the table has one.
    resume=False deletes what `out_dir` holds first (img2dataset's 'overwrite' mode).
    Must run in the main thread (img2dataset installs a SIGINT handler; it is restored after).
    """
    # albumentations (imported by img2dataset, also in its spawned workers) asks PyPI for updates
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download as img2dataset_download  # heavy import (cv2, wandb, pyarrow)

    fmt = choice("url list format", input_format, INPUT_FORMATS) if input_format else input_format_of(url_list)
    if not os.path.isfile(url_list):
        raise MissingInputError(f"url list {url_list!r} does not exist")
    if max_side is not None and max_side < 1:
        raise ConfigError(f"max_side must be a positive number of pixels or None (keep size), got {max_side}")
    if fmt in _TABLE_FORMATS:
        columns = _table_columns(url_list, fmt)
        if url_col not in columns:
            raise ConfigError(f"url list {url_list!r} has no column {url_col!r}; its columns: {', '.join(columns)}")
        if caption_col == "auto":
            caption_col = "caption" if "caption" in columns else None
        elif caption_col is not None and caption_col not in columns:
            raise ConfigError(f"url list {url_list!r} has no caption column {caption_col!r}; "
                             f"its columns: {', '.join(columns)}")
    else:
        if caption_col not in (None, "auto"):
            raise ConfigError(f"a {fmt} url list has no columns; caption_col={caption_col!r} needs a table format")
        caption_col = None

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        img2dataset_download(
            url_list=url_list,
            output_folder=str(out_dir),
            processes_count=processes,
            thread_count=threads,
            image_size=max_side or 256,  # unused when resize_mode='no'
            resize_mode="no" if max_side is None else "keep_ratio_largest",
            resize_only_if_bigger=True,
            encode_format="jpg",
            encode_quality=encode_quality,
            output_format="webdataset",
            input_format=fmt,
            url_col=url_col,
            caption_col=caption_col,
            number_sample_per_shard=samples_per_shard,
            timeout=timeout,
            retries=retries,
            min_image_size=min_image_size,
            enable_wandb=False,
            distributor="multiprocessing",
            incremental_mode="incremental" if resume else "overwrite",
        )
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    return summarize(out_dir)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m index.download", description=__doc__.splitlines()[0])
    p.add_argument("url_list")
    p.add_argument("out_dir")
    p.add_argument("--max-side", type=int, default=None, help="shrink images to this longer side (default: keep)")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--timeout", type=int, default=5)
    p.add_argument("--retries", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=10_000)
    p.add_argument("--url-col", default="url")
    p.add_argument("--caption-col", default="auto")
    a = p.parse_args(argv)
    stats = download(a.url_list, a.out_dir, max_side=a.max_side, processes=a.processes, threads=a.threads,
                     timeout=a.timeout, retries=a.retries, samples_per_shard=a.samples_per_shard,
                     url_col=a.url_col, caption_col=a.caption_col)
    print(json.dumps(stats, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("python -m index.download", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
