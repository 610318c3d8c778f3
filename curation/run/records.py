"""Stage records of a curation run: ``DIR/.curate/<stage>.json`` (+ ``<stage>.npz`` for arrays).

A record is the small result of one stage (ids, scores, thresholds, counts; never pixels) with the
fingerprint of the inputs it was made from. The arrays are written first and the JSON last, each by
rename (`index.core.atomic`), so a JSON record that exists is complete. A record whose fingerprint differs
is stale: the stage is recomputed and the record replaced (the curated directory's outputs are the
run's own; the manifest says which stages were recomputed and why). The run continues from the
record as read back, also right after computing it, so a resumed and an uninterrupted run go on
from identical values.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index.core import contract
from index.core.atomic import atomic_path, read_json


@dataclass
class Record:
    data: dict[str, Any] = field(default_factory=dict)          # JSON-able
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class StageStore:
    def __init__(self, out: str | Path):
        self.root = Path(out) / contract.STAGES_DIR

    def json_path(self, stage: str) -> Path:
        return self.root / f"{stage}.json"

    def npz_path(self, stage: str) -> Path:
        return self.root / f"{stage}.npz"

    def load(self, stage: str, fingerprint: str) -> tuple[Record | None, str]:
        """(record, status): status "absent", "stale" (other fingerprint) or "match"."""
        path = self.json_path(stage)
        if not path.is_file():
            return None, "absent"
        head = read_json(path)
        if head.get("fingerprint") != fingerprint:
            return None, "stale"
        arrays: dict[str, np.ndarray] = {}
        if head.get("arrays"):
            with np.load(self.npz_path(stage), allow_pickle=False) as z:
                arrays = {k: z[k] for k in head["arrays"]}
        return Record(head["data"], arrays), "match"

    def save(self, stage: str, fingerprint: str, record: Record) -> None:
        if record.arrays:
            with atomic_path(self.npz_path(stage)) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **record.arrays)
        head = {"stage": stage, "fingerprint": fingerprint, "arrays": sorted(record.arrays), "data": record.data}
        with atomic_path(self.json_path(stage)) as tmp:   # keys in their order: dict order is data here
            tmp.write_text(json.dumps(head, indent=1) + "\n")
