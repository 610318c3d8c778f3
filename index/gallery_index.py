"""A built index directory, opened for querying: its encoders, FAISS groups, rows and gallery shards.

`rows(gids)` reads only the row-table lines it needs (the shard's line-offset table) and remembers the
location of every image it returns, so the reads that follow (`index.ranged.read_by_id`: originals,
crops, thumbnails) go by byte range without touching a row table again. `read_stats` accumulates the
bytes those reads take from gallery files.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from index import contract, store
from index.atomic import read_json
from index.encoders import EncoderSpec, check_same_encoders, resolve_encoder
from index.gallery import ShardRef
from index.ranged import ReadStats


class GalleryIndex:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / contract.MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: build the index first "
                                    f"(python curation/build_index.py --config ... --out {self.root})")
        self.manifest = read_json(path)
        self.specs = [EncoderSpec.from_dict(d) for d in self.manifest["encoders"]]
        self.shards = self.manifest["shards"]
        self.offsets = np.array([s["offset"] for s in self.shards], dtype=np.int64)
        self.num_vectors = int(self.manifest["num_vectors"])
        self._faiss = None
        self._pos = {s["name"]: i for i, s in enumerate(self.shards)}
        self._locs: dict[str, dict[str, Any] | None] = {}   # image id -> loc, of every row returned
        self._seekable: dict[int, bool] = {}                 # shard position -> has a line-offset table
        self.read_stats = ReadStats()                        # bytes read from gallery files by id

    def local_specs(self) -> list[EncoderSpec]:
        """The index's encoders as resolved on this machine; refused if their weights differ."""
        local = [resolve_encoder(s.name, s.weights if s.weights and Path(s.weights).is_file() else None,
                                 s.image_size) for s in self.specs]
        check_same_encoders(self.specs, local)
        return local

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        from index.search import ShardedIndex
        if self._faiss is None:
            self._faiss = ShardedIndex.from_dir(self.root)
        return self._faiss.search(np.ascontiguousarray(queries, dtype=np.float32), k, nprobe)

    def locate(self, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard position, row within shard) of global vector ids."""
        gids = np.asarray(gids, dtype=np.int64)
        if gids.size and (gids.min() < 0 or gids.max() >= self.num_vectors):
            raise IndexError(f"vector ids must be in [0, {self.num_vectors})")
        pos = np.searchsorted(self.offsets, gids, side="right") - 1
        return pos, gids - self.offsets[pos]

    @functools.lru_cache(maxsize=64)
    def _rows(self, shard_pos: int) -> list[store.Row]:
        """A shard's whole row table: for indexes without a line-offset table."""
        return store.load_rows(self.root, self.shards[shard_pos]["name"])

    def _rows_at(self, shard_pos: int, local: np.ndarray) -> list[store.Row]:
        name = self.shards[shard_pos]["name"]
        if shard_pos not in self._seekable:
            self._seekable[shard_pos] = store.has_row_offsets(self.root, name)
        if self._seekable[shard_pos]:
            return store.load_rows_at(self.root, name, local)
        table = self._rows(shard_pos)
        return [table[int(r)] for r in local]

    def rows(self, gids: np.ndarray) -> list[store.Row]:
        """The rows of global vector ids, in order; each touched shard's table is opened once and only
        the wanted lines are read. Their image locations are remembered for `location(s)`."""
        pos, local = self.locate(gids)
        out: list[store.Row | None] = [None] * len(pos)
        order = np.argsort(pos, kind="stable")
        starts = np.flatnonzero(np.r_[True, pos[order][1:] != pos[order][:-1]]) if len(pos) else []
        for a, b in zip(starts, list(starts[1:]) + [len(pos)]):
            sel = order[a:b]
            for j, row in zip(sel, self._rows_at(int(pos[sel[0]]), local[sel])):
                out[j] = row
                self._locs[row.id] = row.loc
        return out  # type: ignore[return-value]

    @functools.lru_cache(maxsize=64)
    def _shard_locs(self, shard_name: str) -> dict[str, dict[str, Any] | None]:
        """image id -> loc over a whole shard's row table: for ids `rows` has not returned."""
        return {r.id: r.loc for r in self._rows(self._pos[shard_name])}

    def locations(self, ids: Iterable[str]) -> dict[str, dict[str, Any] | None]:
        """image id -> its location (contract.ROW_LOC_FIELDS), or None where the index holds the image
        but no location (an index built before locations were recorded). Ids the index does not hold
        are left out. Ids not returned by `rows` before cost a read of their shard's row table."""
        out: dict[str, dict[str, Any] | None] = {}
        for iid in ids:
            if iid in self._locs:
                out[iid] = self._locs[iid]
                continue
            shard = contract.split_image_id(iid)[0]
            if shard in self._pos:
                table = self._shard_locs(shard)
                if iid in table:
                    out[iid] = self._locs[iid] = table[iid]
        return out

    def location(self, image_id: str) -> dict[str, Any] | None:
        """The image's location, or None where the index has none recorded; KeyError if not indexed."""
        found = self.locations([image_id])
        if image_id not in found:
            raise KeyError(f"image {image_id!r} is not in the index {self.root}")
        return found[image_id]

    def shard_ref(self, shard_name: str) -> ShardRef:
        pos = self._pos.get(shard_name)
        if pos is None:
            raise KeyError(f"shard {shard_name!r} is not in {self.root}")
        return ShardRef.from_dict(self.shards[pos]["source"])
