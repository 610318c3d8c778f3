"""The state one curation run's stages share, and the (de)serialisation of its parts to records."""
from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from curation import pixelkey
from curation.calibrate import Calibration
from curation.decontam import LeakReport
from curation.features import FeatureCache, embed_labeled, labeled_keys
from curation.pixelkey import Keys
from curation.querysets import QuerySet, content_hashes
from curation.selection import Selection, Selector
from curation.thresholds import Thresholds
from index.core import contract
from index.core.executor import Executor
from index.device import pick_device
from index.encoders import EncoderSpec, build_encoder
from index.gallery_index import GalleryIndex

_SELECTION_ARRAYS = ("ids", "scores", "hit_offsets", "hit_query", "hit_rank", "hit_score")
_SELECTION_FLAGS = ("k", "strategy", "needs_deeper", "suggested_k", "exhausted", "message")


def selection_to_record(sel: Selection, prefix: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    flags = {"k": int(sel.k), "strategy": str(sel.strategy), "needs_deeper": bool(sel.needs_deeper),
             "suggested_k": None if sel.suggested_k is None else int(sel.suggested_k),
             "exhausted": bool(sel.exhausted), "message": str(sel.message)}
    return (flags,
            {f"{prefix}{f}": np.asarray(getattr(sel, f)) for f in _SELECTION_ARRAYS})


def selection_from_record(flags: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str) -> Selection:
    return Selection(**{f: arrays[f"{prefix}{f}"] for f in _SELECTION_ARRAYS}, **flags)


@dataclass
class Filtered:
    """What the filters removed, by global vector id, and why."""
    duplicates: set[int] = field(default_factory=set)
    dup_parent: dict[str, str] = field(default_factory=dict)  # union-find over duplicate images
    leak_items: dict[str, int] = field(default_factory=dict)  # leaked image id -> crops removed
    leaks: set[int] = field(default_factory=set)
    unreadable: set[int] = field(default_factory=set)
    changed: set[int] = field(default_factory=set)   # their image changed since indexing (curation.changed)

    def all(self) -> np.ndarray:
        return np.array(sorted(self.duplicates | self.leaks | self.unreadable | self.changed), dtype=np.int64)

    def _root(self, i: str) -> str:
        while self.dup_parent.setdefault(i, i) != i:
            i = self.dup_parent[i]
        return i

    def link(self, images: list[str]) -> None:
        """Record that these original images are duplicates of each other (across rounds too)."""
        for other in images[1:]:
            a, b = self._root(images[0]), self._root(other)
            if a != b:
                self.dup_parent[max(a, b)] = min(a, b)

    def clusters(self, final_images: set[str]) -> list[list[tuple[str, bool]]]:
        """Duplicate clusters of two or more distinct images: (image id, kept in the final set).

        Two crops of one image are duplicates too (one crop per image survives) and are counted in
        removed_duplicate, but a cluster of one image is not listed.
        """
        groups: dict[str, list[str]] = defaultdict(list)
        for i in sorted(self.dup_parent):
            groups[self._root(i)].append(i)
        return [[(i, i in final_images) for i in g] for g in groups.values() if len(g) > 1]

    def to_dict(self) -> dict[str, Any]:
        return {"duplicates": sorted(self.duplicates), "leaks": sorted(self.leaks),
                "unreadable": sorted(self.unreadable), "changed": sorted(self.changed), "dup_parent": dict(sorted(self.dup_parent.items())),
                "leak_items": dict(sorted(self.leak_items.items()))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Filtered":
        return cls(duplicates=set(d["duplicates"]), dup_parent=dict(d["dup_parent"]),
                   leak_items=dict(d["leak_items"]), leaks=set(d["leaks"]), unreadable=set(d["unreadable"]),
                   changed=set(d.get("changed", ())))


@dataclass
class RunState:
    """Config, query set, index and the results of the stages so far.

    Fields after ``base_fingerprint`` are set by the stages (from a computed result or from its
    record, through the same code, so a resumed run continues from exactly what it stored).
    """
    cfg: Any                                   # curation.pipeline.CurateConfig
    out: Path
    executor: Executor
    gindex: GalleryIndex
    specs: list[EncoderSpec]
    qs: QuerySet
    selector: Selector
    base_fingerprint: dict[str, Any]
    # embed_queries
    qfeat: np.ndarray | None = None
    query_ids: list[str] = field(default_factory=list)
    k0: int = 0
    # retrieve
    first: Selection | None = None
    point: dict[str, Any] | None = None        # the index's operating point in force (index.recall.point_for)
    recall: dict[str, Any] | None = None       # the estimated recall of the retrieval (index.recall.estimate_run)
    deepest: tuple[np.ndarray, np.ndarray, int] | None = None   # the deepest search's (scores, ids, k)
    # references
    th: Thresholds | None = None
    calibration: Calibration | None = None
    # filter
    sel: Selection | None = None
    filtered: Filtered = field(default_factory=Filtered)
    leak_report: LeakReport | None = None
    rounds: int = 0
    verified_pairs: int = 0
    verify_seconds: float = 0.0
    # write
    records: list[contract.TransferRecord] = field(default_factory=list)
    written: dict[str, Any] = field(default_factory=dict)
    # bookkeeping
    timings: dict[str, float] = field(default_factory=dict)
    stage_status: dict[str, dict[str, Any]] = field(default_factory=dict)
    stage_fingerprints: dict[str, str] = field(default_factory=dict)

    @functools.cached_property
    def device(self) -> str:
        return pick_device(self.cfg.device)

    @functools.cached_property
    def models(self) -> list:
        """The encoders in this process, built on first use (a fully resumed run builds none)."""
        return [build_encoder(s, self.device) for s in self.specs]

    @functools.cached_property
    def cache(self) -> FeatureCache:
        return FeatureCache(self.cfg.cache_dir)

    @property
    def ref_ids(self) -> list[str]:
        return [r.id for r in self.qs.references]

    @functools.cached_property
    def ref_hashes(self) -> list[str]:
        """The content hash of every reference: the caches are keyed by contents, not names."""
        return content_hashes(self.qs.references)

    @functools.cached_property
    def ref_feats(self) -> list[np.ndarray]:
        """Features of every reference (cached by query set, reference contents and encoders, across runs)."""
        return self.cache.get_or_compute(
            {"kind": "references", "query_set": self.qs.name, "ids": self.ref_ids, "contents": self.ref_hashes,
             "encoders": [s.identity() for s in self.specs]},
            lambda: embed_labeled(self.models, self.qs.references, self.cfg.batch_size, desc="embed references"))

    @functools.cached_property
    def ref_keys(self) -> Keys | None:
        """Pixel keys of every reference; they serve verification only (None without it)."""
        if self.cfg.verify == "none":
            return None
        return Keys(self.cache.get_or_compute(
            {"kind": "pixel-keys", "query_set": self.qs.name, "ids": self.ref_ids, "contents": self.ref_hashes,
             "version": pixelkey.KEY_VERSION},
            lambda: [labeled_keys(self.qs.references)])[0])
