"""A built index directory, opened for querying: its encoders, FAISS groups, rows and gallery shards.

`rows(gids)` reads only the row-table lines it needs (the shard's line-offset table) and remembers the
location of every image it returns, so the reads that follow (`index.ranged.read_by_id`: originals,
crops, thumbnails) go by byte range without touching a row table again. `read_stats` accumulates the
bytes those reads take from gallery files.

The manifest records each shard's absolute path. A gallery moved after indexing is read from its new
place with ``gallery_root``: every shard path is taken relative to the recorded gallery root (the
directory that holds every shard, `recorded_gallery_root`) and put under the new one. Nothing else
changes: each image is still checked against the content hash its row records, so other bytes under
the new root are a changed image, never silently the same one. `check_gallery` refuses, before any work,
an index whose shard files are not where it (or ``gallery_root``) says.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from index import store
from index.core import contract
from index.core.atomic import read_json
from index.core.errors import InputError, MissingInputError
from index.core.images import LOADER_VERSION
from index.encoders import EncoderSpec, check_same_encoders, resolve_encoder
from index.faiss_io import load_index
from index.gallery import ShardRef
from index.ranged import ReadStats
from index.search import GroupSearchTask, ShardedIndex, assign_queries, group_search_worker, plan_group_tasks
from index.search import rerank as rerank_candidates, rerank_depth
from index.topk import check_queries, merge_topk

log = logging.getLogger(__name__)


SEARCH_TASK_BYTES = 2 << 30   # default memory budget of one search task: index files it opens
SEARCH_CACHE_ENTRIES = 4      # query sets whose deepest lists are kept (curate searches one set)


_REQUIRED_KEYS = ("num_vectors", "encoders", "index_factory", "shards", "groups")   # in indexes of every version


def recorded_gallery_root(shards: list[dict[str, Any]]) -> str:
    """The directory that holds every shard an index was built from (manifest ``shards``): the common
    parent of each tar's folder and each folder shard's gallery folder (a folder of images given as the
    gallery is a shard itself; its subfolders are shards inside it). Shards recorded without a source
    (an index of vectors made elsewhere, with no gallery to read) do not count."""
    homes = []
    for s in shards:
        src = s.get("source")
        if src is None:
            continue
        direct = src["kind"] == "folder" and not src.get("recursive", True)
        homes.append(os.path.normpath(src["path"] if direct else os.path.dirname(src["path"])))
    return os.path.commonpath(homes) if homes else ""


def moved_path(path: str, recorded_root: str, gallery_root: str | None) -> str:
    """Where a recorded shard path is with the gallery moved to ``gallery_root`` (None: not moved)."""
    if gallery_root is None:
        return path
    return os.path.normpath(os.path.join(gallery_root, os.path.relpath(path, recorded_root)))


def check_gallery(manifest: dict[str, Any], gallery_root: str | None = None) -> None:
    """Refuse an index whose gallery shards are not where it says (or under ``gallery_root``, when the
    gallery moved), naming the recorded gallery root; a stat per shard, nothing is read."""
    shards = manifest["shards"]
    recorded = recorded_gallery_root(shards)
    gallery_root = None if gallery_root is None else os.path.abspath(gallery_root)
    if gallery_root is not None and not os.path.isdir(gallery_root):
        raise MissingInputError(f"--gallery-root {gallery_root} is not a directory (the index's gallery was "
                                f"recorded under {recorded})")
    missing = []
    for s in shards:
        if "source" not in s:
            continue
        path = moved_path(s["source"]["path"], recorded, gallery_root)
        if not (os.path.isdir(path) if s["source"]["kind"] == "folder" else os.path.isfile(path)):
            missing.append((s, path))
    if not missing:
        return
    images = sum(s.get("num_images", s["num_vectors"]) for s, _ in missing)
    count = f"{images} image(s) in {len(missing)} of {len(shards)} shard(s)"
    if gallery_root is None:
        raise MissingInputError(
            f"gallery files missing: {count} under {recorded} (the index's recorded gallery root) are not there, "
            f"e.g. {missing[0][1]}. If the gallery moved, pass --gallery-root NEW, the directory that now holds "
            f"what {recorded} held (each image is still checked against the content hash the index recorded)")
    raise MissingInputError(
        f"gallery files missing: {count} are not under --gallery-root {gallery_root}, e.g. {missing[0][1]} (the "
        f"index recorded {missing[0][0]['source']['path']} under {recorded}); --gallery-root must hold what "
        f"{recorded} held, in the same layout")


def read_index_manifest(root: str | Path) -> dict[str, Any]:
    """An index directory's manifest; a missing, truncated or foreign one is refused naming the file."""
    path = Path(root) / contract.MANIFEST_FILE
    if not path.is_file():
        raise MissingInputError(f"{path} not found: build the index first "
                                f"(build-index --config ... --out {root})")
    try:
        manifest = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a complete index manifest ({e}); rebuild the index") from None
    missing = [k for k in _REQUIRED_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise InputError(f"{path} is not an index manifest: it lacks {missing}; rebuild the index")
    return manifest


class GalleryIndex:
    """`executor` (an object with `map(make_worker, tasks, desc)`, e.g. jobs.executors') fans the
    search out over index groups, `search_task_bytes` of index files per task; without one the
    groups are opened in this process, as one `ShardedIndex`. ``gallery_root``: where the gallery is
    now, if it moved after indexing (module docstring)."""

    def __init__(self, root: str | Path, executor=None, search_task_bytes: int = SEARCH_TASK_BYTES,
                 gallery_root: str | None = None, manifest: dict[str, Any] | None = None):
        if search_task_bytes < 1:
            raise ValueError(f"search_task_bytes must be >= 1; got {search_task_bytes}")
        self.executor = executor
        self.search_task_bytes = int(search_task_bytes)
        self._quantizer = None
        self._cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.searches = 0   # searches run (requests served from the cache are not counted)
        self.root = Path(root)
        # `manifest`: the index build's own, before it is written (the build measures its search)
        self.manifest = read_index_manifest(self.root) if manifest is None else manifest
        if self.manifest.get("image_loader", 1) < LOADER_VERSION:
            log.warning("%s was built by an older image loader (transparency dropped, EXIF orientation "
                        "ignored): leaks of transparent or rotated target images can go unseen; rebuild it "
                        "into a new directory with build-index", self.root)
        self.specs = [EncoderSpec.from_dict(d) for d in self.manifest["encoders"]]
        self.encoder_names = [s.name for s in self.specs]
        self.shards = self.manifest["shards"]
        self.recorded_gallery_root = recorded_gallery_root(self.shards)
        self.gallery_root = None if gallery_root is None else os.path.abspath(gallery_root)
        self.offsets = np.array([s["offset"] for s in self.shards], dtype=np.int64)
        self.num_vectors = int(self.manifest["num_vectors"])
        self._faiss = None
        self._pos = {s["name"]: i for i, s in enumerate(self.shards)}
        self._locs: dict[str, dict[str, Any] | None] = {}   # image id -> loc, of every row returned
        self._hashes: dict[str, str | None] = {}             # image id -> content hash, likewise
        self._seekable: dict[int, bool] = {}                 # shard position -> has a line-offset table
        self.read_stats = ReadStats()                        # bytes read from gallery files by id

    def local_specs(self) -> list[EncoderSpec]:
        """The index's encoders as resolved on this machine; refused if their weights differ."""
        local = [resolve_encoder(s.name, s.weights if s.weights and Path(s.weights).is_file() else None,
                                 s.image_size) for s in self.specs]
        check_same_encoders(self.specs, local)
        return local

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None, executor=None,
               rerank: int | None = None, cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], ids [Q, k]) over every group, merged exactly (index.search.merge_topk).

        `nprobe` and `rerank` default to the index's operating point (manifest ``nprobe`` and
        ``rerank``, chosen at build time for its recall target, index.recall). ``rerank`` r >= 1: the
        groups return r * max(k, 100) candidates (`index.search.rerank_depth`), re-scored exactly from
        the stored vectors (`index.search.rerank`) and cut to k, so the scores are exact; 0: faiss's
        own scores (approximate for PQ codes).

        A request for the same queries, nprobe and rerank no deeper than an earlier one is served
        from that one's lists (their first k columns), so query-balanced selection deepening k, and
        its backfill, search the gallery once per new depth (`cache=False`: search anyway, keep
        nothing). With a shared quantizer (manifest ``shared_quantizer``) the queries' coarse
        assignment is computed once here from the small trained index, and the groups are searched
        as one index over those lists (a task's groups stacked, `index.search.stack_groups`);
        indexes whose groups trained their own quantizers are searched group by group.
        `executor` (default: the constructor's) runs `index.search.search_groups` tasks, so this
        process opens no group; without one the groups are loaded here once and kept.
        """
        queries = check_queries(queries, k)
        if nprobe is None:
            nprobe = self.manifest.get("nprobe")
        rerank = int(self.manifest.get("rerank", 0) if rerank is None else rerank)
        if rerank < 0:
            raise ValueError(f"rerank must be >= 0 (0: no re-ranking); got {rerank}")
        key = (hashlib.sha1(queries.tobytes()).hexdigest(), queries.shape, nprobe, rerank)
        hit = self._cache.get(key) if cache else None
        if hit is not None and hit[1].shape[1] >= k:   # copies: a caller's edit cannot reach the cache
            return hit[0][:, :k].copy(), hit[1][:, :k].copy()
        depth = min(rerank_depth(k, rerank), self.num_vectors)
        scores, ids = self._search(queries, max(depth, 1), nprobe, executor if executor is not None else self.executor)
        if rerank:
            scores, ids = rerank_candidates(queries, ids, self.vectors_at, k)
        self.searches += 1
        if cache:
            self._cache.pop(key, None)
            self._cache[key] = (scores.copy(), ids.copy())
            while len(self._cache) > SEARCH_CACHE_ENTRIES:
                self._cache.pop(next(iter(self._cache)))
        return scores, ids

    def vectors_at(self, gids: np.ndarray) -> np.ndarray:
        """float32 [n, dim]: the combined stored vectors of global ids, read by row (index.store.vectors_at)."""
        return store.vectors_at(self.root, self.shards, self.encoder_names, gids)

    def _search(self, queries: np.ndarray, k: int, nprobe: int | None, executor):
        assign = None
        trained = self.manifest.get("trained_index")
        if self.manifest.get("shared_quantizer") and trained:
            if self._quantizer is None:   # the only index this process opens: no vectors, the
                # quantizer (nlist x dim floats) and codebooks, mapped (clean page cache once read)
                self._quantizer = load_index(self.root / trained["file"], mmap=True)
            if queries.shape[1] != self._quantizer.d:
                raise ValueError(f"queries have dim {queries.shape[1]}; the index has dim {self._quantizer.d}")
            import faiss  # lazy: faiss
            assign = assign_queries(self._quantizer, queries,
                                    nprobe or faiss.extract_index_ivf(self._quantizer).nprobe)
        if executor is None:
            if self._faiss is None:
                self._faiss = ShardedIndex.from_dir(self.root, manifest=self.manifest)
            return self._faiss.search(queries, k, nprobe, assign)
        files = [g["file"] for g in self.manifest["groups"]]
        sizes = [(self.root / f).stat().st_size for f in files]
        tasks = [GroupSearchTask(root=str(self.root), files=tuple(files[g] for g in batch), queries=queries, k=k,
                                 nprobe=nprobe, assign=assign, trained_file=trained["file"] if assign is not None else None)
                 for batch in plan_group_tasks(sizes, self.search_task_bytes)]
        return merge_topk(executor.map(group_search_worker, tasks, desc="search groups"), k)

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
                self._locs[row.id], self._hashes[row.id] = row.loc, row.hash
        return out  # type: ignore[return-value]

    @functools.lru_cache(maxsize=64)
    def _shard_locs(self, shard_name: str) -> dict[str, tuple[dict[str, Any] | None, str | None]]:
        """image id -> (loc, hash) over a whole shard's row table: for ids `rows` has not returned."""
        return {r.id: (r.loc, r.hash) for r in self._rows(self._pos[shard_name])}

    def _from_table(self, iid: str) -> bool:
        """Look an id up in its shard's whole row table; False if the index does not hold it."""
        shard = contract.split_image_id(iid)[0]
        if shard not in self._pos:
            return False
        table = self._shard_locs(shard)
        if iid not in table:
            return False
        self._locs[iid], self._hashes[iid] = table[iid]
        return True

    def locations(self, ids: Iterable[str]) -> dict[str, dict[str, Any] | None]:
        """image id -> its location (contract.ROW_LOC_FIELDS), or None where the index holds the image
        but no location (an index built before locations were recorded). Ids the index does not hold
        are left out. Ids not returned by `rows` before cost a read of their shard's row table."""
        return {iid: self._locs[iid] for iid in ids if iid in self._locs or self._from_table(iid)}

    def hashes(self, ids: Iterable[str]) -> dict[str, str | None]:
        """image id -> the content hash its rows record (None in indexes built before they did); ids
        the index does not hold are left out. Looked up as `locations` does."""
        return {iid: self._hashes[iid] for iid in ids if iid in self._hashes or self._from_table(iid)}

    def remember(self, locs: dict[str, dict[str, Any] | None], hashes: dict[str, str | None] | None = None) -> None:
        """Take image locations (and content hashes) found elsewhere (a driver's `rows`, sent with a
        task), so a worker's reads of those images cost no row-table read."""
        self._locs.update(locs)
        self._hashes.update(hashes or {})

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
        ref = ShardRef.from_dict(self.shards[pos]["source"])
        return dataclasses.replace(ref, path=moved_path(ref.path, self.recorded_gallery_root, self.gallery_root))
