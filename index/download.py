"""Download a url list into a WebDataset gallery with img2dataset, and summarise its stats.

A thin wrapper around ``img2dataset.download``: WebDataset output (``00000.tar`` with ``key.jpg``,
``key.json``, ``key.txt`` when captions are given, plus img2dataset's ``00000.parquet`` and
``00000_stats.json``), JPEG encoding, no wandb, the multiprocessing distributor, a short timeout
and no retries. By default images keep their original size; ``max_side`` shrinks larger ones so
that their longer side is ``max_side`` (aspect kept, never upscaled).

img2dataset writes each ``_stats.json`` last, so a tar without one is incomplete (the run was
killed); a rerun into the same folder resumes, skipping the shards whose stats exist.

    download-gallery --url-list urls.txt --out gallery/ --max-side 512     (index.cli)
"""
from __future__ import annotations

import glob
import json
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from index.core.registry import choice
from index.core.config import check_integer
from index.core.errors import ConfigError, MissingInputError

INPUT_FORMATS = ("txt", "txt.gz", "csv", "csv.gz", "tsv", "tsv.gz", "json", "json.gz",
                 "jsonl", "jsonl.gz", "parquet")
_TABLE_FORMATS = INPUT_FORMATS[2:]
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")  # img2dataset's


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
        import pyarrow.parquet as pq  # lazy: pyarrow
        return list(pq.read_schema(url_list).names)
    import pandas as pd  # lazy: pandas
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


@dataclass(frozen=True)
class DownloadConfig:
    url_list: str = field(metadata={"help": "img2dataset url list: .txt (one url a line) or a csv/tsv/json/jsonl/"
                                            "parquet table (optionally .gz) with a url column"})
    out: str = field(metadata={"help": "gallery directory to write (WebDataset shards)"})
    max_side: int | None = field(default=None, metadata={
        "help": "shrink larger images so that their longer side is this many pixels (default: keep the size)"})
    resize_mode: str | None = field(default=None, metadata={
        "help": "img2dataset's resize mode: " + " | ".join(RESIZE_MODES) + " (default: no, or keep_ratio_largest "
                "with --max-side); any mode but 'no' re-encodes every image as img2dataset does"})
    image_size: int = field(default=256, metadata={
        "help": "with --resize-mode: the size img2dataset resizes to (img2dataset's default 256)"})
    resize_only_if_bigger: bool = field(default=True, metadata={
        "help": "with --resize-mode: never upscale (img2dataset's own default is --no-resize-only-if-bigger)"})
    processes: int = field(default=1, metadata={"help": "download processes"})
    threads: int = field(default=4, metadata={"help": "download threads per process"})
    timeout: int = field(default=5, metadata={"help": "seconds to wait for each url"})
    retries: int = field(default=0, metadata={"help": "retries of a failed url"})
    samples_per_shard: int = field(default=10_000, metadata={"help": "images per tar shard"})
    url_col: str = field(default="url", metadata={"help": "url column of a table"})
    caption_col: str | None = field(default="auto", metadata={
        "help": "caption column of a table ('auto': 'caption' when the table has one)"})
    input_format: str | None = field(default=None, metadata={
        "help": f"url list format: {', '.join(INPUT_FORMATS)} (default: from the file name)"})
    encode_quality: int = field(default=95, metadata={"help": "JPEG quality of the stored images"})
    min_image_size: int = field(default=0, metadata={"help": "drop images whose shorter side is below this"})
    resume: bool = field(default=True, metadata={
        "help": "skip the shards a killed run finished; --no-resume deletes what the directory holds first"})

    def __post_init__(self) -> None:
        if self.input_format is not None:
            choice("url list format", self.input_format, INPUT_FORMATS)
        else:
            input_format_of(self.url_list)      # refused now if the name does not say
        check_integer("max_side", self.max_side, 1, optional=True)
        check_integer("image_size", self.image_size, 1)
        if self.resize_mode is not None:
            choice("resize mode", self.resize_mode, RESIZE_MODES)
            if self.max_side is not None:
                raise ConfigError("give --max-side or --resize-mode with --image-size, not both")
        for name, low in (("processes", 1), ("threads", 1), ("timeout", 1), ("retries", 0),
                          ("samples_per_shard", 1), ("min_image_size", 0)):
            check_integer(name, getattr(self, name), low)
        if isinstance(self.encode_quality, bool) or not isinstance(self.encode_quality, int) \
                or not 1 <= self.encode_quality <= 100:
            raise ConfigError(f"encode_quality must be an integer in [1, 100]; got {self.encode_quality!r}")

    @property
    def format(self) -> str:
        return self.input_format or input_format_of(self.url_list)


def download(url_list: str, out_dir: str, **options: Any) -> dict[str, Any]:
    """Download `url_list` into WebDataset shards under `out_dir`; return ``summarize(out_dir)``.

    `options` are `DownloadConfig` fields (max_side, threads, url_col, ...).
    """
    return download_gallery(DownloadConfig(url_list=url_list, out=out_dir, **options))


def download_gallery(cfg: DownloadConfig) -> dict[str, Any]:
    """Download ``cfg.url_list`` into WebDataset shards under ``cfg.out``; return ``summarize(cfg.out)``.

    A table's `url_col` (and `caption_col` unless None) must be among its columns; a ``.txt`` list has
    none. ``resume=False`` deletes what ``cfg.out`` holds first (img2dataset's 'overwrite' mode).
    Must run in the main thread (img2dataset installs a SIGINT handler; it is restored after). Ctrl-C
    raises KeyboardInterrupt, as in every other command; a rerun with ``resume`` goes on from the
    shards finished.
    """
    # albumentations (imported by img2dataset, also in its spawned workers) asks PyPI for updates
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download as img2dataset_download  # lazy: img2dataset (cv2, wandb, pyarrow)

    fmt, url_list, caption_col = cfg.format, cfg.url_list, cfg.caption_col
    if not os.path.isfile(url_list):
        raise MissingInputError(f"url list {url_list!r} does not exist")
    if fmt in _TABLE_FORMATS:
        columns = _table_columns(url_list, fmt)
        if cfg.url_col not in columns:
            raise ConfigError(f"url list {url_list!r} has no column {cfg.url_col!r}; its columns: {', '.join(columns)}")
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
            output_folder=str(cfg.out),
            processes_count=cfg.processes,
            thread_count=cfg.threads,
            image_size=cfg.max_side or cfg.image_size,  # unused when resize_mode='no'
            resize_mode=cfg.resize_mode or ("no" if cfg.max_side is None else "keep_ratio_largest"),
            resize_only_if_bigger=cfg.resize_only_if_bigger if cfg.resize_mode else True,
            encode_format="jpg",
            encode_quality=cfg.encode_quality,
            output_format="webdataset",
            input_format=fmt,
            url_col=cfg.url_col,
            caption_col=caption_col,
            number_sample_per_shard=cfg.samples_per_shard,
            timeout=cfg.timeout,
            retries=cfg.retries,
            min_image_size=cfg.min_image_size,
            enable_wandb=False,
            distributor="multiprocessing",
            incremental_mode="incremental" if cfg.resume else "overwrite",
        )
    except SystemExit as e:
        # img2dataset's SIGINT handler removes its _tmp folder and exits with status 0 (its only sys.exit):
        # that is Ctrl-C, which the commands report as such (index.core.errors.run_main)
        if e.code not in (0, None):
            raise
        raise KeyboardInterrupt from None
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    return summarize(cfg.out)
