"""The report's thumbnails of written images, kept by the write stage: ``DIR/.curate/report-thumbs.tar``.

The write stage decodes every written original to cut its crop; for those the report shows it also
stores `curation.report.thumbnail_png` of the crop and of the original, so the report stage reads
from the gallery only images that were never written. A WebDataset tar, one sample per record
that carries a thumbnail, in write order::

    <record key>.json           {"key", "source_id", "crop"}
    <record key>.crop.png       the crop's thumbnail (when a per-query panel shows it)
    <record key>.original.png   its original's thumbnail (on the first record of that source only)

Fixed tar mtimes and PNG bytes make it byte-identical across reruns; it is written under a
temporary name and renamed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import webdataset as wds

from index.core.atomic import atomic_path


def write_report_thumbs(path: Path, thumbs: Iterable[tuple[dict, dict[str, bytes]]]) -> None:
    """``thumbs``: (record dict, {"crop"?: png, "original"?: png}) in write order; an original
    already stored for its source is not stored again."""
    seen: set[str] = set()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        tar = wds.TarWriter(fh, mtime=0.0)
        for rec, t in thumbs:
            sample = {"__key__": rec["key"], "json": json.dumps(
                {"key": rec["key"], "source_id": rec["source_id"], "crop": rec["crop"]}, sort_keys=True).encode()}
            if "crop" in t:
                sample["crop.png"] = t["crop"]
            if "original" in t and rec["source_id"] not in seen:
                seen.add(rec["source_id"])
                sample["original.png"] = t["original"]
            if len(sample) > 2:
                tar.write(sample)
        tar.close()


def read_report_thumbs(path: Path) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(crop thumbnails by record key, original thumbnails by source id), as PNG bytes."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: the write stage's report thumbnails are missing; rerun curate "
                                "with the same --out to recompute the write stage")
    crops: dict[str, bytes] = {}
    originals: dict[str, bytes] = {}
    for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
        meta = json.loads(s["json"])
        if "crop.png" in s:
            crops[meta["key"]] = s["crop.png"]
        if "original.png" in s:
            originals[meta["source_id"]] = s["original.png"]
    return crops, originals
