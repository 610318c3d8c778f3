"""Data order is a pure function of (seed, epoch); skipping, threads and ranks behave; caches are
reused by fingerprint and refused when it differs."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from distill.cache import CacheLookup, build_or_load_cache, cache_fingerprint_inputs
from distill.data import (ShardSet, _batches_of, labelled_batches, load_labelled, num_batches, random_resized_crop_box,
                          steps_per_epoch, transfer_batches, transfer_shards)
from index.core.atomic import FingerprintMismatch

from fixtures_curated import write_curated_dir


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    d = tmp_path_factory.mktemp("curated")
    write_curated_dir(d, num_classes=3, shots=3, transfer=21, size=24, shard_size=8)
    return d


def _epoch(curated, **kw):
    shards = transfer_shards(curated)
    n = ShardSet.scan(shards).count
    args = dict(seed=0, epoch=0, batch_size=4, resolution=16, augment=True, shuffle_buffer=10)
    args.update(kw)
    return list(transfer_batches(shards, n, **args))


def test_batches_of_partition_property():
    for n in range(0, 40):
        for bs in range(1, 9):
            chunks = list(_batches_of(range(n), bs))
            assert [i for c in chunks for i in c] == list(range(n))
            assert len(chunks) == num_batches(n, bs)
            if bs > 1 and n > 1:
                assert min(len(c) for c in chunks) >= 2


def test_random_resized_crop_box_stays_inside():
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(1, 300), rng.randint(1, 300)
        left, top, cw, ch = random_resized_crop_box(w, h, rng)
        assert 0 <= left and 0 <= top and cw > 0 and ch > 0 and left + cw <= w and top + ch <= h


def test_shardset_scan(curated):
    ss = ShardSet.scan(transfer_shards(curated))
    assert len(ss.shards) == 3 and ss.count == 21
    assert ss.all_keys()[:2] == ["t00000", "t00001"]
    m = ss.manifest()
    assert m["count"] == 21 and [s["count"] for s in m["shards"]] == [8, 8, 5]


def test_transfer_order_is_a_pure_function_of_seed_and_epoch(curated):
    a, b = _epoch(curated), _epoch(curated)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    keys = [k for x in a for k in x["key"]]
    assert sorted(keys) == sorted(ShardSet.scan(transfer_shards(curated)).all_keys())   # nothing lost
    assert len(a) == steps_per_epoch(21, 4) == 5 and [len(x["key"]) for x in a][-1] == 5   # 1 left over joins
    other = _epoch(curated, epoch=1)
    assert [k for x in other for k in x["key"]] != keys


def test_skip_and_threads_give_the_same_batches(curated):
    full = _epoch(curated)
    skipped = _epoch(curated, skip=2)
    assert [x["key"] for x in skipped] == [x["key"] for x in full[2:]]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(skipped, full[2:]))
    threaded = _epoch(curated, decode_threads=2)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(threaded, full))
    assert full[0]["image"].shape == (4, 3, 16, 16)
    assert 0.0 <= float(full[0]["image"].min()) and float(full[0]["image"].max()) <= 1.0


def test_ranks_split_evenly_and_count_the_remainder(curated):
    counters = [Counter(), Counter()]
    per_rank = [_epoch(curated, rank=r, world=2, skipped=counters[r]) for r in range(2)]
    keys = [[k for x in batches for k in x["key"]] for batches in per_rank]
    assert len(per_rank[0]) == len(per_rank[1]) == steps_per_epoch(21, 4, 2)
    assert len(keys[0]) == len(keys[1]) == 10 and not set(keys[0]) & set(keys[1])
    assert sum(c["ddp_remainder"] for c in counters) == 1


def test_labelled_set_and_batches(curated):
    ls = load_labelled(curated)
    assert len(ls) == 9 and ls.classes == ["class0", "class1", "class2"] and sorted(set(ls.labels)) == [0, 1, 2]
    a = list(labelled_batches(ls, seed=3, epoch=2, batch_size=4, resolution=16, augment=True))
    b = list(labelled_batches(ls, seed=3, epoch=2, batch_size=4, resolution=16, augment=True, skip=1))
    assert [x["key"] for x in b] == [x["key"] for x in a[1:]]
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"]) for x, y in zip(b, a[1:]))
    assert [len(x["key"]) for x in a] == [4, 5]


def test_labelled_set_missing_draw_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="queries.json"):
        load_labelled(tmp_path)


# ------------------------------------------------------------------ cache

def _compute(keys, calls):
    def gen():
        calls.append(1)
        x = torch.arange(len(keys) * 3, dtype=torch.float32).view(len(keys), 3)
        yield keys, x[:, :2], x
    return gen


def test_cache_reused_with_same_fingerprint_and_refused_otherwise(tmp_path):
    keys = ["a", "b", "c"]
    inputs = cache_fingerprint_inputs(model={"name": "m"}, weights="h1", data={"keys": keys},
                                      transform={"res": 16}, outputs=["logits", "features"])
    calls: list[int] = []
    c1 = build_or_load_cache(tmp_path / "c", inputs, _compute(keys, calls))
    c2 = build_or_load_cache(tmp_path / "c", inputs, _compute(keys, calls))
    assert len(calls) == 1 and not c1.reused and c2.reused
    assert np.array_equal(c1.features, c2.features) and c2.logits.shape == (3, 2)
    changed = dict(inputs, weights="h2")
    with pytest.raises(FingerprintMismatch, match="different configuration"):
        build_or_load_cache(tmp_path / "c", changed, _compute(keys, calls))
    assert len(calls) == 1


def test_cache_lookup_concatenates_in_order_and_reports_missing_keys(tmp_path):
    def make(name, scale):
        def gen():
            yield ["a", "b"], None, torch.tensor([[1.0], [2.0]]) * scale
        return build_or_load_cache(tmp_path / name, {"n": name}, gen)
    lk = CacheLookup(None, [make("x", 1), make("y", 10)])
    out = lk(["b", "a"])
    assert lk.feature_dim == 2
    assert torch.equal(out["teacher_features"], torch.tensor([[2.0, 20.0], [1.0, 10.0]]))
    with pytest.raises(KeyError, match="not in the teacher cache"):
        lk(["zz"])
    with pytest.raises(ValueError, match="no logits"):
        CacheLookup(make("x", 1))
