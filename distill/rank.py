"""Rank candidate teachers for a target task by task similarity on its labelled probe set.

Each teacher's pretrained features of the probe set are computed once and cached (the same cache
the distillation runs use for labelled features, so adding a teacher costs one pass over the data);
PARC, CKA and RSA (distill.similarity) are computed from them, and optionally a linear probe's
cross-validated accuracy on the probe set (k folds within each class; no test labels are seen).

    rank_teachers(...) -> {"metric", "probe_set", "ranking": [{name, rank, similarity, ...}], ...}

Borup et al. 2023 rank source models by PARC of their features (sec. 4.1, Table 2).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from distill.cache import OutputCache, build_or_load_cache, cache_pass, data_dir_name, pretrained_features_inputs
from distill.data import EVAL_TRANSFORM_ID, LabelledSet, labelled_batches
from distill.similarity import SIMILARITIES, similarity_weights
from distill.teachers import build_feature_model, fit_linear_head
from index.core.atomic import write_json
from index.core.contract import encoder_slug
from index.core.errors import ConfigError

RANKING_FILE = "ranking.json"


def probe_features(name: str, ls: LabelledSet, data: dict[str, Any], root: Path, *, image_size: int | None,
                   device: torch.device, batch_size: int = 64, weights: str | None = None) -> OutputCache:
    """Pretrained features of the labelled probe set for encoder `name`, cached under `root`."""
    fm = build_feature_model(name, weights=weights, image_size=image_size, device=device)
    spec = fm.spec
    inputs = pretrained_features_inputs(spec, data, EVAL_TRANSFORM_ID)
    d = root / f"{encoder_slug(spec.name)}-pretrained" / data_dir_name("labelled", data)
    batches = labelled_batches(ls, seed=0, epoch=0, batch_size=batch_size, resolution=spec.image_size,
                               augment=False, shuffle=False)
    return build_or_load_cache(d, inputs, cache_pass(fm, batches, device, False))


def cv_probe_accuracy(features: np.ndarray, labels: np.ndarray, *, folds: int = 5, steps: int = 100,
                      weight_decay: float = 1e-4) -> float:
    """Accuracy of a logistic-regression probe, cross-validated on the probe set: example i of each class
    is held out in fold i mod k (k = min(folds, smallest class size))."""
    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    k = min(folds, int(counts.min()))
    if k < 2:
        raise ConfigError("cross-validated probe accuracy needs at least 2 examples of every class")
    fold = np.empty(len(y), dtype=np.int64)
    for c in classes:
        idx = np.flatnonzero(y == c)
        fold[idx] = np.arange(len(idx)) % k
    x = torch.from_numpy(np.array(features, dtype=np.float32))
    t = torch.from_numpy(y.astype(np.int64))
    correct = 0
    for f in range(k):
        train, test = fold != f, fold == f
        w, b = fit_linear_head(x[train], t[train], int(y.max()) + 1, steps=steps, weight_decay=weight_decay)
        correct += int((x[test] @ w.T + b).argmax(1).eq(t[test]).sum())
    return correct / len(y)


def score_features(features: np.ndarray, labels: np.ndarray, *, probe_accuracy: bool = False,
                   probe_steps: int = 100, probe_weight_decay: float = 1e-4) -> dict[str, Any]:
    """Every registered similarity of one representation (and optionally its CV probe accuracy), timed."""
    sims, seconds = {}, {}
    for metric in SIMILARITIES:
        t0 = time.perf_counter()
        sims[metric] = SIMILARITIES.get(metric)(features, labels)
        seconds[metric] = time.perf_counter() - t0
    out: dict[str, Any] = {"similarity": sims, "seconds": seconds}
    if probe_accuracy:
        t0 = time.perf_counter()
        out["probe_accuracy"] = cv_probe_accuracy(features, labels, steps=probe_steps, weight_decay=probe_weight_decay)
        seconds["probe"] = time.perf_counter() - t0
    return out


def order(scores: dict[str, dict[str, Any]], key: str) -> list[str]:
    """Names by descending score (`key`: a similarity name or "probe_accuracy"); ties by name."""
    def value(name: str) -> float:
        s = scores[name]
        return s["probe_accuracy"] if key == "probe_accuracy" else s["similarity"][key]
    return sorted(scores, key=lambda n: (-value(n), n))


def rank_teachers(teachers: Sequence[str], ls: LabelledSet, data: dict[str, Any], cache_root: str | Path, *,
                  metric: str = "parc", image_size: int | None = None, device: torch.device | str = "cpu",
                  probe_accuracy: bool = False, probe_steps: int = 100, probe_weight_decay: float = 1e-4,
                  weight_temperature: float | None = None, batch_size: int = 64,
                  weights: dict[str, str] | None = None) -> dict[str, Any]:
    """Score every teacher on the probe set and rank them by `metric` (and by probe accuracy if asked).

    `weight_temperature` p: also report the DistillWeighted weights softmax(p * similarity).
    `weights`: local weights files of some teachers ({name: path}); the others use their registry default.
    """
    SIMILARITIES.get(metric)
    if not teachers:
        raise ConfigError("rank needs at least one teacher")
    if len(set(teachers)) != len(teachers):
        raise ConfigError(f"teachers must be distinct, got {list(teachers)}")
    device = torch.device(device)
    labels = np.asarray(ls.labels)
    scores: dict[str, dict[str, Any]] = {}
    for name in teachers:
        t0 = time.perf_counter()
        cache = probe_features(name, ls, data, Path(cache_root), image_size=image_size, device=device,
                               batch_size=batch_size, weights=(weights or {}).get(name))
        feat_s = time.perf_counter() - t0
        s = score_features(np.asarray(cache.features), labels, probe_accuracy=probe_accuracy,
                           probe_steps=probe_steps, probe_weight_decay=probe_weight_decay)
        s["seconds"] = {"features": feat_s, **s["seconds"]}
        s["seconds"]["total"] = sum(s["seconds"].values())
        s.update(feature_dim=int(cache.features.shape[1]), cache={"dir": str(cache.directory), "reused": cache.reused})
        scores[name] = s
    names = order(scores, metric)
    ranking = [{"rank": i + 1, "name": n, **scores[n]} for i, n in enumerate(names)]
    if weight_temperature is not None:
        w = similarity_weights([r["similarity"][metric] for r in ranking], weight_temperature)
        for r, wi in zip(ranking, w):
            r["weight"] = float(wi)
    out: dict[str, Any] = {"metric": metric, "probe_set": {"count": len(ls), "classes": list(ls.classes),
                                                            "name": ls.name},
                           "ranking": ranking, "weight_temperature": weight_temperature}
    if probe_accuracy:
        out["by_probe_accuracy"] = order(scores, "probe_accuracy")
    return out


def write_ranking(out_dir: str | Path, result: dict[str, Any]) -> Path:
    path = Path(out_dir) / RANKING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return path


def format_ranking(result: dict[str, Any]) -> str:
    """A plain-text table: rank, teacher, the similarities, probe accuracy and weight where present, seconds."""
    metrics = list(SIMILARITIES)
    head = f"{'rank':<5}{'teacher':<28}" + "".join(f"{m:>8}" for m in metrics)
    has_probe = "by_probe_accuracy" in result
    has_w = result.get("weight_temperature") is not None
    head += (f"{'probe acc':>11}" if has_probe else "") + (f"{'weight':>8}" if has_w else "") + f"{'seconds':>9}"
    lines = [f"teachers ranked by {result['metric']} on the probe set ({result['probe_set']['count']} labelled images)",
             head]
    for r in result["ranking"]:
        row = f"{r['rank']:<5}{r['name']:<28}" + "".join(f"{r['similarity'][m]:>8.3f}" for m in metrics)
        row += (f"{r['probe_accuracy']:>11.3f}" if has_probe else "") + (f"{r['weight']:>8.3f}" if has_w else "")
        lines.append(row + f"{r['seconds']['total']:>9.2f}")
    if has_probe:
        lines.append("by probe accuracy: " + ", ".join(result["by_probe_accuracy"]))
    return "\n".join(lines)
