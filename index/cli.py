"""The indexing commands: `build-index` (gallery -> embeddings -> FAISS index) and `download-gallery`.

    build-index --config jobs/demo.yaml --out DIR [--executor local|ray] [--num-workers N] [--gallery GLOB]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . --
        "$PWD/.venv/bin/python" curation/build_index.py --config jobs/demo.yaml --out DIR   (README: A Ray cluster)
    download-gallery --url-list urls.parquet --out /data/gallery [--max-side 512]

`build-index` takes a job config (IndexConfig fields; the crop recipe and FAISS settings are set
there) and every top-level scalar field as a flag over it. Under `ray job submit` (RAY_ADDRESS is
set) the default executor is Ray on that cluster. It prints one summary line; the rest is in
DIR/manifest.json. `download-gallery` wraps img2dataset (index.download) and prints the stats as JSON.
"""
from __future__ import annotations

import json
import os

from index.build import build_gallery_index, summary_line
from index.config import IndexConfig
from index.core.errors import run_main
from index.core.flags import config_parser, parse_config
from index.download import DownloadConfig, download_gallery
from index.threads import threads_for
from jobs.executors import make_executor


def parse_build(argv: list[str] | None = None) -> tuple[IndexConfig, str]:
    """(the job config, the output directory) a `build-index` command line names."""
    parser = config_parser(IndexConfig, "build-index", __doc__, argv=argv,
                           defaults={"executor": "ray"} if os.environ.get("RAY_ADDRESS") else None)
    parser.add_argument("--out", required=True, help="index directory to write")
    cfg, args = parse_config(IndexConfig, parser, argv)
    return cfg, args.out


def build(argv: list[str] | None = None) -> dict:
    """Parse the command line, build the index; returns its manifest (user errors raise)."""
    cfg, out = parse_build(argv)
    executor = make_executor(cfg.executor, num_workers=cfg.num_workers, gpus_per_worker=cfg.gpus_per_worker)
    with threads_for(cfg.threads):
        return build_gallery_index(cfg, out, executor)


def _build_main(argv: list[str] | None) -> int:
    manifest = build(argv)
    print(summary_line("index", manifest, manifest["seconds"]), flush=True)
    return 0


def build_index_main(argv: list[str] | None = None) -> int:
    return run_main("build-index", _build_main, argv)


def _download_main(argv: list[str] | None) -> int:
    parser = config_parser(DownloadConfig, "download-gallery", argv=argv,
                           description="Download a url list into WebDataset gallery shards with img2dataset "
                                       "(index.download); prints the download stats as JSON")
    cfg, _ = parse_config(DownloadConfig, parser, argv)
    print(json.dumps(download_gallery(cfg), indent=2))
    return 0


def download_main(argv: list[str] | None = None) -> int:
    return run_main("download-gallery", _download_main, argv)
