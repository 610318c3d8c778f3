"""Image-level features for curation: labelled images (queries, references) and gallery originals.

All are whole images through each encoder's own preprocessing (resize + centre crop), L2-normalised,
one float32 matrix per encoder. Reference features (every image of the target dataset) are cached on
disk by a fingerprint of (query set, image ids, their content hashes, encoder identities), so repeated
curations reuse them and an image changed under the same name is embedded again.
Pixel keys (`curation.pixelkey`) are computed alongside, from the same decoded images.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from curation import pixelkey
from curation.querysets import LabeledImage, iter_images
from index.core.atomic import atomic_path, fingerprint
from index.encode import embed_images
from index.ranged import read_by_id
from index.skips import SkipCounts


def embed_labeled(models, items: Sequence[LabeledImage], batch_size: int = 64,
                  desc: str = "embed queries") -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in models]
    for _, images in tqdm(iter_images(items, batch_size * 4, num_workers=2), desc=desc, unit="batch",
                          total=(len(items) + batch_size * 4 - 1) // (batch_size * 4)):
        for acc, f in zip(parts, embed_images(models, images, batch_size)):
            acc.append(f)
    return [np.concatenate(p) if p else np.zeros((0, m.spec.embed_dim), np.float32)
            for p, m in zip(parts, models)]


def labeled_keys(items: Sequence[LabeledImage], batch_size: int = 256) -> np.ndarray:
    """[len(items), pixelkey.DIM] the pixel keys of labelled images."""
    parts = [pixelkey.keys(images) for _, images in tqdm(
        iter_images(items, batch_size, num_workers=2), desc="pixel keys", unit="batch",
        total=(len(items) + batch_size - 1) // batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, pixelkey.DIM), np.float32)


def embed_originals(gindex, models, image_ids: Sequence[str], into: dict[str, list[np.ndarray]],
                    batch_size: int = 64, keys_into: dict[str, np.ndarray] | None = None) -> dict[str, str]:
    """Embed gallery originals into `into`, and with `keys_into` their pixel keys into that; return
    {id: skip reason} unreadable. Images are read by byte range (index.ranged), in chunks of
    `4 * batch_size` ids in id order (so a chunk's reads run forward through each shard), and embedded
    in full batches whatever the number of shards they come from."""
    ids = sorted(set(map(str, image_ids)))
    chunk = max(1, 4 * batch_size)
    unreadable: dict[str, str] = {}
    for a in range(0, len(ids), chunk):   # the executor's bar counts these images (one task's share)
        got = read_by_id(gindex, ids[a:a + chunk], SkipCounts())
        ok = sorted(got.images)
        feats = embed_images(models, [got.images[i] for i in ok], batch_size)
        for row, iid in enumerate(ok):
            into[iid] = [f[row] for f in feats]
            if keys_into is not None:
                keys_into[iid] = pixelkey.key(got.images[iid])
        unreadable.update(got.unreadable)
    return unreadable


def default_cache_dir() -> Path:
    return Path(os.environ.get("VFM_CACHE", Path.home() / ".cache" / "vfm-curate")) / "features"


class FeatureCache:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root else default_cache_dir()

    def get_or_compute(self, key: dict[str, Any], compute: Callable[[], list[np.ndarray]]) -> list[np.ndarray]:
        path = self.root / f"{key.get('kind', 'features')}-{fingerprint(key)}.npz"
        if path.is_file():
            with np.load(path) as z:
                return [z[f"e{i}"] for i in range(len(z.files))]
        feats = compute()
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **{f"e{i}": a for i, a in enumerate(feats)})
        return feats
