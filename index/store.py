"""Embedding shards on disk: per gallery shard, float16 L2-normalised matrices per encoder + a row table.

Layout (index.core.contract, STORE_FORMAT 4): ``<root>/vectors/<encoder>/<shard>.npy`` (one folder per
encoder holding only its matrices, as .npy-folder readers expect) and
``<root>/embeddings/<shard>/{rows.jsonl, rows.offsets.npy, done.json}``. The matrices, the row table and
its line-offset table are written atomically first; ``done.json`` is written last and carries counts,
the store format and the fingerprint of the shard's inputs, so its presence means the shard is
complete. Matrices of indexes written before STORE_FORMAT 4 are read where those kept them. `load_rows_at` reads only the lines asked for (a shard's row table
is ~9 MB at DataComp scale and a curated set touches tens of thousands of shards).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from index.core import contract
from index.core.atomic import atomic_path, check_done, read_json, write_json
from index.core.errors import InputError
from index.core.outdir import invalidate
from index.knn import combine_features


class RowTableMismatch(InputError, IndexError):
    """A row table that does not hold the rows the index refers to."""


@dataclass(frozen=True)
class Row:
    id: str          # gallery image id
    crop: int        # crop index within the image
    recipe: dict[str, Any]
    loc: dict[str, Any] | None = None  # contract.ROW_LOC_FIELDS; None in old indexes or unseekable shards
    hash: str | None = None            # the image's content hash (contract.ROW_FIELDS); None in old indexes

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "crop": self.crop, "recipe": self.recipe, "loc": self.loc, "hash": self.hash}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Row":
        return cls(id=d["id"], crop=d["crop"], recipe=d["recipe"], loc=d.get("loc"), hash=d.get("hash"))


def shard_dir(root: str | Path, shard: str) -> Path:
    return Path(root) / contract.EMBEDDINGS_DIR / shard


def write_shard(root: str | Path, shard: str, features: dict[str, np.ndarray], rows: list[Row],
                record: dict[str, Any]) -> dict[str, Any]:
    """Write one shard's matrices and rows, then its done record (last), stamped with STORE_FORMAT."""
    d = shard_dir(root, shard)
    invalidate(root, contract.MANIFEST_FILE)   # the index is being changed: no longer finished
    d.mkdir(parents=True, exist_ok=True)
    for name, mat in features.items():
        if len(mat) != len(rows):
            raise ValueError(f"{name}: {len(mat)} vectors for {len(rows)} rows")
        path = Path(root) / contract.vectors_file(name, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(mat, dtype=np.float16))
    offsets = np.zeros(len(rows) + 1, np.int64)
    with atomic_path(d / contract.ROWS_FILE) as tmp:
        with open(tmp, "wb") as f:
            for i, r in enumerate(rows):
                line = (json.dumps(r.to_dict(), sort_keys=True) + "\n").encode()
                f.write(line)
                offsets[i + 1] = offsets[i] + len(line)
    with atomic_path(d / contract.ROWS_OFFSETS_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, offsets)
    record = {**record, "store_format": contract.STORE_FORMAT}
    write_json(d / contract.DONE_FILE, record)
    return record


def store_format(record: dict[str, Any]) -> int:
    """The STORE_FORMAT a shard's done record was written in (formats before 4 named it "rows_format";
    the first wrote neither)."""
    return int(record.get("store_format", record.get("rows_format", 1)))


def has_done(root: str | Path, shard: str) -> bool:
    return (shard_dir(root, shard) / contract.DONE_FILE).is_file()


def done_record(root: str | Path, shard: str, fingerprint: str) -> dict[str, Any] | None:
    """The shard's done record if complete with this fingerprint; None if not done; raises if it differs."""
    return check_done(shard_dir(root, shard) / contract.DONE_FILE, fingerprint)


def features_path(root: str | Path, shard: str, encoder: str) -> Path:
    """The shard's matrix of `encoder`: in its encoder's folder, or beside the row table in an index
    of STORE_FORMAT <= 3."""
    path = Path(root) / contract.vectors_file(encoder, shard)
    legacy = Path(root) / contract.legacy_vectors_file(encoder, shard)
    return legacy if not path.is_file() and legacy.is_file() else path


def load_features(root: str | Path, shard: str, encoder: str, mmap: bool = True) -> np.ndarray:
    return np.load(features_path(root, shard, encoder), mmap_mode="r" if mmap else None)


def load_rows(root: str | Path, shard: str) -> list[Row]:
    path = shard_dir(root, shard) / contract.ROWS_FILE
    with open(path, "rb") as f:
        return [parse_row(line, path, shard, i) for i, line in enumerate(f)]


def parse_row(line: bytes, path: Path, shard: str, position: int) -> Row:
    """One row-table line; a truncated line, or a row of another shard's table, is refused naming the file."""
    try:
        row = Row.from_dict(json.loads(line))
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: row {position} is truncated or not a row ({type(e).__name__}: {e}); "
                         "rebuild this shard (delete its directory and rerun build-index)") from None
    if contract.split_image_id(row.id)[0] != shard:
        raise InputError(f"{path}: row {position} is image {row.id!r}, not one of shard {shard!r}: "
                         "this row table belongs to another shard; rebuild this shard")
    return row


def has_row_offsets(root: str | Path, shard: str) -> bool:
    return (shard_dir(root, shard) / contract.ROWS_OFFSETS_FILE).is_file()


def load_rows_at(root: str | Path, shard: str, rows: Sequence[int] | np.ndarray) -> list[Row]:
    """The rows at these positions (any order, repeats allowed), reading only their lines: one seek and
    read per run of consecutive positions. Without a line-offset table (an index written before it
    existed) the whole row table is read."""
    d = shard_dir(root, shard)
    want = np.asarray(rows, dtype=np.int64).reshape(-1)
    if not (d / contract.ROWS_OFFSETS_FILE).is_file():
        table = load_rows(root, shard)
        return [table[int(r)] for r in want]
    try:
        offsets = np.load(d / contract.ROWS_OFFSETS_FILE, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise InputError(f"{d / contract.ROWS_OFFSETS_FILE} is not a readable line-offset table ({e}); "
                         "rebuild this shard (delete its directory and rerun build-index)") from None
    n = len(offsets) - 1
    if want.size and (want.min() < 0 or want.max() >= n):
        raise RowTableMismatch(f"{d}: row positions must be in [0, {n}): its row table holds {n} rows, fewer "
                               "than the index asks for; it belongs to another shard or build: rebuild this shard")
    uniq = np.unique(want)
    found: dict[int, Row] = {}
    with open(d / contract.ROWS_FILE, "rb") as f:
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        for run in np.split(uniq, breaks) if uniq.size else []:
            start, end = int(offsets[run[0]]), int(offsets[run[-1] + 1])
            f.seek(start)
            block = f.read(end - start)
            if len(block) != end - start:
                raise InputError(f"{d / contract.ROWS_FILE} is shorter than its line-offset table says "
                                 "(truncated); rebuild this shard (delete its directory and rerun build-index)")
            for r in run:
                a, b = int(offsets[r]) - start, int(offsets[r + 1]) - start
                found[int(r)] = parse_row(block[a:b], d / contract.ROWS_FILE, shard, int(r))
    return [found[int(r)] for r in want]


def read_record(root: str | Path, shard: str) -> dict[str, Any]:
    return read_json(shard_dir(root, shard) / contract.DONE_FILE)


def combined(root: str | Path, shard: str, encoders: list[str]) -> np.ndarray:
    """float32 [n, sum(dims)]: each encoder's features scaled by 1/sqrt(E), so inner product = mean cosine."""
    return combine_features([load_features(root, shard, e) for e in encoders])


def iter_blocks(root: str | Path, shards: list[dict[str, Any]], encoders: list[str]
                ) -> Iterator[tuple[int, np.ndarray]]:
    """(global offset, combined float32 vectors) per shard, in manifest order."""
    for s in shards:
        yield s["offset"], combined(root, s["name"], encoders)


def vectors_at(root: str | Path, shards: list[dict[str, Any]], encoders: list[str], gids: np.ndarray) -> np.ndarray:
    """float32 [len(gids), dim]: the combined vectors of global row ids (any order, repeats allowed).

    `shards` are the manifest's entries in offset order. Only the rows asked for are read, from each
    touched shard's memory-mapped matrices, so the cost is the rows' bytes, whatever the gallery size.
    """
    gids = np.asarray(gids, dtype=np.int64).reshape(-1)
    offsets = np.array([s["offset"] for s in shards], dtype=np.int64)
    total = int(shards[-1]["offset"] + shards[-1]["num_vectors"]) if shards else 0
    if gids.size and (gids.min() < 0 or gids.max() >= total):
        raise IndexError(f"vector ids must be in [0, {total}); got [{gids.min()}, {gids.max()}]")
    pos = np.searchsorted(offsets, gids, side="right") - 1
    out: np.ndarray | None = None
    for p in np.unique(pos):
        sel = np.flatnonzero(pos == p)
        rows, back = np.unique(gids[sel] - offsets[p], return_inverse=True)
        part = combine_features([load_features(root, shards[p]["name"], e)[rows] for e in encoders])
        if out is None:
            out = np.empty((len(gids), part.shape[1]), dtype=np.float32)
        out[sel] = part[back]
    if out is None:
        dim = sum(load_features(root, shards[0]["name"], e).shape[1] for e in encoders) if shards else 0
        out = np.empty((0, dim), dtype=np.float32)
    return out
