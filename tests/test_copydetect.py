"""`curation.copydetect.CopyDetector`: the filter stage's one interface to copy detection.

Planted copies of real images (scikit-image photos) with hand-made features: the detector must make
the same decisions as the per-pair rules (`decontam.verify_leaks`, `dedup.duplicate_clusters` with a
`copy_match` callback), verify each pair once per run however many rounds ask, and send all of a
call's new pairs to the executor as one batch of chunks.
"""
from __future__ import annotations

import numpy as np
import pytest

from curation.copies import copy_rng, make_copy
from curation.copydetect import CopyDetector, match_pairs
from curation.decontam import find_leaks, verify_leaks
from curation.dedup import duplicate_clusters
from curation.thresholds import Thresholds
from curation.verify import Thumb, copy_match
from index.core.executor import LocalExecutor, chunks

from fixtures_samples import SAMPLES


class CountingExecutor(LocalExecutor):
    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def map(self, make_worker, tasks, desc="", **progress):
        self.calls.append((desc, len(tasks)))
        return super().map(make_worker, tasks, desc, **progress)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def world():
    photos = SAMPLES["skimage"](4, 0)[0]
    refs = {f"ref/{i}": im for i, im in enumerate(photos)}
    # gallery: a copy of ref/0, a look-alike of ref/1 (a copy of another photo), a copy of ref/2, a
    # duplicate pair (g/dup_a, g/dup_b: copies of ref/3)
    gallery = {"g/copy0": make_copy(photos[0], "jpeg", copy_rng(0, 0, "jpeg")),
               "g/alike1": make_copy(photos[3], "resize", copy_rng(0, 1, "resize")),
               "g/copy2": make_copy(photos[2], "pad", copy_rng(0, 2, "pad")),
               "g/dup_a": make_copy(photos[3], "jpeg", copy_rng(0, 3, "jpeg")),
               "g/dup_b": make_copy(photos[3], "colour", copy_rng(0, 4, "colour"))}
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(4, 16)))
    ref_feats = [base]
    near = lambda r: _unit(base[r] + 0.01 * rng.normal(size=(1, 16)))[0]   # noqa: E731
    g_feats = [np.stack([near(0), near(1), near(2), near(3), near(3)])]   # the look-alike sits near ref/1
    th = Thresholds(dedup=0.99, leak=0.95, verify=0.9, max_residual=None, key=None, verifier="align",
                    neighbours=2, key_neighbours=2, source="given")
    return refs, gallery, ref_feats, g_feats, th


def _detector(world, executor, pairs_per_task=3):
    refs, gallery, ref_feats, _, th = world
    return CopyDetector(th, list(refs), ref_feats, None,
                        load_references=lambda ids: {i: refs[i] for i in ids},
                        load_gallery=lambda ids: {i: gallery[i] for i in ids if i in gallery},
                        executor=executor, pairs_per_task=pairs_per_task)


def test_match_pairs_agrees_with_copy_match(world):
    refs, gallery, *_ = world
    pairs = [(Thumb.of(gallery[g]), Thumb.of(refs[r])) for g in gallery for r in refs]
    assert match_pairs(pairs) == [copy_match(a, b) for a, b in pairs]


def test_leaks_and_duplicates_decide_as_the_per_pair_rules(world):
    refs, gallery, ref_feats, g_feats, th = world
    ids = list(gallery)
    det = _detector(world, CountingExecutor())
    got = det.leaks(ids, g_feats, None)
    want = verify_leaks(find_leaks(g_feats, ref_feats, th.leak, th.neighbours, reference_ids=list(refs), image_ids=ids),
                        lambda a, b: copy_match(gallery[a], refs[b]), th.rule)
    assert got == want
    assert {x.image_id for x in got.leaks} == {"g/copy0", "g/copy2", "g/dup_a", "g/dup_b"}
    assert [x.image_id for x in got.rejected] == ["g/alike1"], "a look-alike is no copy"
    labels = det.duplicates(ids, g_feats, None)
    want_labels = duplicate_clusters(g_feats[0], th.dedup, per_image=th.neighbours,
                                     keep_pair=lambda i, j: np.array([th.rule.passes(copy_match(gallery[ids[a]], gallery[ids[b]]))
                                                                      for a, b in zip(i, j)], bool))
    assert labels.tolist() == want_labels.tolist()
    assert labels[3] == labels[4] and len(set(labels.tolist())) == 4


def test_each_pair_is_verified_once_in_one_batch_per_call(world):
    _, gallery, _, g_feats, _ = world
    ex = CountingExecutor()
    det = _detector(world, ex)
    ids = list(gallery)
    first = det.leaks(ids, g_feats, None)
    n = det.pairs_verified
    assert n == sum(len(x.neighbor_ids) for x in first.leaks + first.rejected) > 3
    assert ex.calls == [("verify pairs", len(chunks(range(n), 3)))], "all of a call's pairs in one map"
    assert det.leaks(ids, g_feats, None) == first, "a second round decides the same"
    assert det.pairs_verified == n and len(ex.calls) == 1, "and verifies nothing again"


def test_unreadable_images_never_pass(world):
    refs, gallery, ref_feats, g_feats, th = world
    det = CopyDetector(th, list(refs), ref_feats, None, load_references=lambda ids: {i: refs[i] for i in ids},
                       load_gallery=lambda ids: {})
    report = det.leaks(list(gallery), g_feats, None)
    assert not report.leaks and len(report.rejected) == 5
    assert all(np.isnan(x.verify_score) for x in report.rejected)
