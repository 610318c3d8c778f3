"""A built index directory, opened for querying: its encoders, FAISS groups, rows and gallery shards."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from index import contract, store
from index.atomic import read_json
from index.encoders import EncoderSpec, check_same_encoders, resolve_encoder
from index.gallery import ShardRef


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
        return store.load_rows(self.root, self.shards[shard_pos]["name"])

    def rows(self, gids: np.ndarray) -> list[store.Row]:
        pos, local = self.locate(gids)
        return [self._rows(int(p))[int(r)] for p, r in zip(pos, local)]

    def shard_ref(self, shard_name: str) -> ShardRef:
        for s in self.shards:
            if s["name"] == shard_name:
                return ShardRef.from_dict(s["source"])
        raise KeyError(f"shard {shard_name!r} is not in {self.root}")
