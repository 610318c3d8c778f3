"""Embedding shards on disk: per gallery shard, float16 L2-normalised matrices per encoder + a row table.

Layout (index.contract): ``<root>/embeddings/<shard>/{<encoder>.npy, rows.jsonl, done.json}``. The
matrices and the row table are written atomically first; ``done.json`` is written last and carries
counts and the fingerprint of the shard's inputs, so its presence means the shard is complete.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from index import contract
from index.atomic import atomic_path, check_done, read_json, write_json


@dataclass(frozen=True)
class Row:
    id: str          # gallery image id
    crop: int        # crop index within the image
    recipe: dict[str, Any]


def shard_dir(root: str | Path, shard: str) -> Path:
    return Path(root) / contract.EMBEDDINGS_DIR / shard


def write_shard(root: str | Path, shard: str, features: dict[str, np.ndarray], rows: list[Row],
                record: dict[str, Any]) -> dict[str, Any]:
    """Write one shard's matrices and rows, then its done record (last)."""
    d = shard_dir(root, shard)
    d.mkdir(parents=True, exist_ok=True)
    for name, mat in features.items():
        if len(mat) != len(rows):
            raise ValueError(f"{name}: {len(mat)} vectors for {len(rows)} rows")
        with atomic_path(d / contract.embedding_file(name)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(mat, dtype=np.float16))
    with atomic_path(d / contract.ROWS_FILE) as tmp:
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps({"id": r.id, "crop": r.crop, "recipe": r.recipe}, sort_keys=True) + "\n")
    write_json(d / contract.DONE_FILE, record)
    return record


def done_record(root: str | Path, shard: str, fingerprint: str) -> dict[str, Any] | None:
    """The shard's done record if complete with this fingerprint; None if not done; raises if it differs."""
    return check_done(shard_dir(root, shard) / contract.DONE_FILE, fingerprint)


def load_features(root: str | Path, shard: str, encoder: str, mmap: bool = True) -> np.ndarray:
    return np.load(shard_dir(root, shard) / contract.embedding_file(encoder), mmap_mode="r" if mmap else None)


def load_rows(root: str | Path, shard: str) -> list[Row]:
    with open(shard_dir(root, shard) / contract.ROWS_FILE) as f:
        return [Row(**json.loads(line)) for line in f]


def read_record(root: str | Path, shard: str) -> dict[str, Any]:
    return read_json(shard_dir(root, shard) / contract.DONE_FILE)


def combined(root: str | Path, shard: str, encoders: list[str]) -> np.ndarray:
    """float32 [n, sum(dims)]: each encoder's features scaled by 1/sqrt(E), so inner product = mean cosine."""
    from index.knn import combine_features
    return combine_features([load_features(root, shard, e) for e in encoders])


def iter_blocks(root: str | Path, shards: list[dict[str, Any]], encoders: list[str]
                ) -> Iterator[tuple[int, np.ndarray]]:
    """(global offset, combined float32 vectors) per shard, in manifest order."""
    for s in shards:
        yield s["offset"], combined(root, s["name"], encoders)
