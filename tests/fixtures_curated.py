"""Tiny deterministic curated directories and query sets, for tests and benchmarks (no network).

Images of class c are a flat colour from a fixed palette plus noise and a random bright square, so a
small student learns them in a few steps. The directory follows index/core/contract.py: transfer and
query WebDataset shards and queries.json.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from index.core.contract import QUERIES_DRAW_FILE, QUERIES_PATTERN, TRANSFER_PATTERN, TransferRecord

PALETTE = np.array([[200, 40, 40], [40, 180, 60], [50, 70, 210], [220, 200, 40],
                    [160, 60, 190], [40, 190, 190], [240, 130, 30], [120, 120, 120]], dtype=np.float32)


def synthetic_image(label: int, index: int, size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng([seed, label, index])
    img = PALETTE[label % len(PALETTE)] + rng.normal(0, 25, (size, size, 3))
    s = max(2, size // 4)
    y, x = rng.integers(0, size - s, 2)
    img[y:y + s, x:x + s] = 255
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class SyntheticItem:
    id: str
    label: int
    seed: int
    size: int

    def loader(self) -> Image.Image:
        return synthetic_image(self.label, int(self.id.rsplit("-", 1)[1]), self.size, self.seed)


@dataclass
class SyntheticQuerySet:
    """Same attributes as curation.querysets' query sets: name, classes, test items with .loader()."""
    name: str
    classes: list[str]
    test: list[SyntheticItem] = field(default_factory=list)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=95) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def write_curated_dir(out: str | Path, *, num_classes: int = 4, shots: int = 4, transfer: int = 32,
                      test_per_class: int = 4, size: int = 32, shard_size: int = 16, seed: int = 0,
                      name: str = "synthetic") -> SyntheticQuerySet:
    """Write a curated directory and return the matching query set (its test split)."""
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = [f"class{c}" for c in range(num_classes)]
    queries = [(f"q{c}-{i}", c) for c in range(num_classes) for i in range(shots)]
    with wds.ShardWriter(str(out / QUERIES_PATTERN), maxcount=shard_size, verbose=0) as w:
        for qid, c in queries:
            img = synthetic_image(c, 1000 + int(qid.split("-")[1]), size, seed)
            w.write({"__key__": qid.replace("-", "_"), "png": _encode(img, "PNG"), "cls": str(c).encode(),
                     "json": json.dumps({"id": qid, "label": c, "class_name": classes[c]}).encode()})
    with wds.ShardWriter(str(out / TRANSFER_PATTERN), maxcount=shard_size, verbose=0) as w:
        for i in range(transfer):
            c = i % num_classes
            img = synthetic_image(c, 2000 + i, size, seed)
            source = f"{i // 2:05d}/img{i}"
            recipe = {"box": [0, 0, size, size], "size": size, "full": True, "ops": []}
            rec = TransferRecord(key=f"t{i:05d}", source_id=source, crop=i % 2, recipe=recipe, rank=i)
            w.write({"__key__": rec.key, "jpg": _encode(img, "JPEG"), "json": json.dumps(rec.to_dict()).encode()})
    draw = {"name": name, "seed": seed, "classes": classes,
            "queries": [{"id": q, "label": c} for q, c in queries]}
    (out / QUERIES_DRAW_FILE).write_text(json.dumps(draw))
    test = [SyntheticItem(id=f"test{c}-{i}", label=c, seed=seed, size=size)
            for c in range(num_classes) for i in range(test_per_class)]
    return SyntheticQuerySet(name=name, classes=classes, test=test)


