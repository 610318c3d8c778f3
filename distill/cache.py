"""Teacher output cache: one pass over a dataset writes teacher logits and/or features keyed by
sample key; later runs with the same fingerprint reuse it, a different fingerprint is refused.

Layout of a cache directory:
    keys.json        sample keys, row order of the arrays
    logits.npy       float32 [N, C]   (teachers with a head)
    features.npy     float32 [N, D]
    done.json        written last: fingerprint, its inputs, counts

The fingerprint covers the teacher spec, a hash of the weights that produced the outputs (the head,
or the whole model after finetuning), the dataset manifest (shards, sizes, keys) and the eval
transform. Arrays are written under temporary names and renamed; done.json last (index.core.atomic).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from index.core.atomic import CODE_VERSION, atomic_path, check_done, fingerprint, write_json

DONE = "done.json"
OutputsIter = Iterable[tuple[list[str], torch.Tensor | None, torch.Tensor]]


@dataclass
class OutputCache:
    directory: Path
    keys: list[str]
    features: np.ndarray
    logits: np.ndarray | None
    reused: bool

    def __post_init__(self) -> None:
        self.index = {k: i for i, k in enumerate(self.keys)}
        if len(self.index) != len(self.keys):
            raise ValueError(f"duplicate sample keys in cache {self.directory}")

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        try:
            return np.fromiter((self.index[k] for k in keys), dtype=np.int64, count=len(keys))
        except KeyError as e:
            raise KeyError(f"sample {e.args[0]!r} is not in the teacher cache {self.directory} "
                           f"({len(self.keys)} keys); the cache was built from other data") from None


def cache_fingerprint_inputs(*, model: dict[str, Any], weights: str | None, data: dict[str, Any],
                             transform: dict[str, Any], outputs: Sequence[str]) -> dict[str, Any]:
    return {"model": model, "weights": weights, "data": data, "transform": transform,
            "outputs": sorted(outputs), "code_version": CODE_VERSION}


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def load_cache(directory: str | Path, expected_fingerprint: str) -> OutputCache | None:
    """The cache if complete and matching; None if absent; FingerprintMismatch if it differs."""
    d = Path(directory)
    record = check_done(d / DONE, expected_fingerprint)
    if record is None:
        return None
    keys = json.loads((d / "keys.json").read_text())
    feats = np.load(d / "features.npy", mmap_mode="r")
    logits = np.load(d / "logits.npy", mmap_mode="r") if (d / "logits.npy").exists() else None
    return OutputCache(d, keys, feats, logits, reused=True)


def build_or_load_cache(directory: str | Path, inputs: dict[str, Any],
                        compute: Callable[[], OutputsIter]) -> OutputCache:
    """Reuse the cache at `directory` if its fingerprint matches `inputs`, else compute and write it.

    `compute()` yields (keys, logits or None, features) batches over the whole dataset, once.
    """
    d = Path(directory)
    cached = load_cache(d, fingerprint(inputs))
    if cached is not None:
        return cached
    keys: list[str] = []
    feats: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    for k, lg, f in compute():
        keys.extend(k)
        feats.append(f.detach().float().cpu().numpy())
        if lg is not None:
            logits.append(lg.detach().float().cpu().numpy())
    if not keys:
        raise ValueError(f"no samples to cache for {d}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate sample keys in the data cached to {d}")
    d.mkdir(parents=True, exist_ok=True)
    f_arr = np.concatenate(feats).astype(np.float32)
    _save_npy(d / "features.npy", f_arr)
    l_arr = None
    if logits:
        l_arr = np.concatenate(logits).astype(np.float32)
        _save_npy(d / "logits.npy", l_arr)
    write_json(d / "keys.json", keys)
    write_json(d / DONE, {"fingerprint": fingerprint(inputs), "inputs": inputs, "count": len(keys),
                          "feature_dim": int(f_arr.shape[1]),
                          "num_classes": int(l_arr.shape[1]) if l_arr is not None else None})
    return OutputCache(d, keys, np.load(d / "features.npy", mmap_mode="r"),
                       np.load(d / "logits.npy", mmap_mode="r") if l_arr is not None else None, reused=False)


def cache_pass(fn: Any, batches: Iterable[dict[str, Any]], device: torch.device, with_logits: bool):
    """The `compute` of build_or_load_cache: fn(x) -> (logits, features) or features, over `batches`."""
    @torch.no_grad()
    def gen():
        for b in batches:
            x = b["image"].to(device)
            if with_logits:
                logits, feats = fn(x)
                yield b["key"], logits, feats
            else:
                yield b["key"], None, fn(x)
    return gen


def data_dir_name(split: str, data: Any) -> str:
    """A cache location per data set, so one --cache-dir serves several transfer sets; at one location
    a different teacher (or head) is refused rather than silently recomputed."""
    return f"{split}-{fingerprint(data)[:12]}"


def pretrained_features_inputs(spec: Any, data: dict[str, Any], transform_id: str) -> dict[str, Any]:
    """Fingerprint inputs of a pretrained (un-adapted) encoder's features of one data set."""
    return cache_fingerprint_inputs(
        model={"spec": spec.identity(), "adapt": "pretrained"}, weights=spec.weights_digest or "seeded-init",
        data=data, transform={"id": transform_id, "resolution": spec.image_size}, outputs=["features"])


class CacheLookup:
    """keys -> {"teacher_logits": [B, sum C], "teacher_features": [B, sum D]} from one or more caches.

    Logit caches of several teachers are placed side by side in the given order (DistillWeighted's
    teachers); feature caches of several models likewise (AFT's multi-model Psi).
    """

    def __init__(self, logits: OutputCache | Sequence[OutputCache] | None = None,
                 features: Sequence[OutputCache] = ()):
        self.logits = [logits] if isinstance(logits, OutputCache) else list(logits or [])
        for c in self.logits:
            if c.logits is None:
                raise ValueError(f"cache {c.directory} holds no logits")
        self.features = list(features)

    def __call__(self, keys: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.logits:
            parts = [np.asarray(c.logits[c.rows(keys)]) for c in self.logits]
            out["teacher_logits"] = torch.from_numpy(np.concatenate(parts, axis=1))
        if self.features:
            parts = [np.asarray(c.features[c.rows(keys)]) for c in self.features]
            out["teacher_features"] = torch.from_numpy(np.concatenate(parts, axis=1))
        return out

    @property
    def feature_dim(self) -> int:
        return sum(int(c.features.shape[1]) for c in self.features)


