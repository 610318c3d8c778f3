"""Dedup (B.3) and decontamination (B.4) on planted copies of small synthetic images."""
from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from curation.decontam import clear_reviewed, combine_features, find_leaks, read_review
from curation.dedup import duplicate_clusters, duplicate_pairs, keep_one_per_cluster

from fixtures_gallery import pattern


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_per_module):
    """One torch and one FAISS thread (conftest.one_thread_per_module): on a busy 2-core machine a second
    intra-op thread only waits at barriers."""

# ---------------------------------------------------------------- fixtures: images and features


def jpeg_copy(im: Image.Image, quality: int = 70) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def resized_copy(im: Image.Image) -> Image.Image:
    return im.resize((61, 61), Image.BILINEAR)


def look_alike(im: Image.Image, other: Image.Image, t: float) -> Image.Image:
    return Image.blend(im, other, t)


# Two fixed "encoders": random projections of the mean-centred pixels at two resolutions.
_ENCODERS = [(16, np.random.default_rng(1).normal(size=(16 * 16 * 3, 64)).astype(np.float32)),
             (8, np.random.default_rng(2).normal(size=(8 * 8 * 3, 48)).astype(np.float32))]


def encode(images: list[Image.Image]) -> list[np.ndarray]:
    out = []
    for res, proj in _ENCODERS:
        px = np.stack([np.asarray(im.resize((res, res), Image.BILINEAR), np.float32).ravel() / 255
                       for im in images])
        f = (px - px.mean(axis=1, keepdims=True)) @ proj
        out.append((f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32))
    return out


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near(x: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors with cosine exactly ``cos`` to the rows of x."""
    noise = rng.normal(size=x.shape).astype(np.float32)
    noise -= (noise * x).sum(axis=1, keepdims=True) * x
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return (cos * x + np.sqrt(1 - cos ** 2) * noise).astype(np.float32)


# ---------------------------------------------------------------- dedup


def test_planted_image_copies_cluster_and_distinct_images_stay_apart():
    originals = [pattern(s) for s in range(12)]
    # rows 0-11 originals, 12: JPEG of 0, 13: resized 0, 14: JPEG of 5, 15: look-alike of 7
    images = originals + [jpeg_copy(originals[0]), resized_copy(originals[0]),
                          jpeg_copy(originals[5]), look_alike(originals[7], originals[8], .3)]
    feats = combine_features(encode(images))
    sim = feats @ feats.T
    assert sim[7, 15] < 0.99 and sim[7, 15] > 0.8, "fixture: the look-alike must be close but below"
    labels = duplicate_clusters(feats, threshold=0.99)
    assert labels[12] == labels[13] == labels[0]
    assert labels[14] == labels[5]
    assert labels[15] != labels[7]
    assert np.unique(labels).size == 16 - 3
    assert labels.tolist() == duplicate_clusters(feats, 0.99, method="ivf").tolist()
    # labels are numbered by each cluster's smallest row
    first = [labels.tolist().index(c) for c in range(labels.max() + 1)]
    assert first == sorted(first)


def test_pairs_threshold_is_strict_and_symmetric_once():
    x = np.eye(3, dtype=np.float32)
    x[1] = [0.6, 0.8, 0]
    i, j = duplicate_pairs(x, threshold=0.5)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1)]
    i, j = duplicate_pairs(x, threshold=0.8)
    assert i.size == 0
    i, j = duplicate_pairs(unit(np.random.default_rng(0), 400, 16), 0.99, method="ivf")
    assert i.size == 0
    with pytest.raises(ValueError, match="normalised"):
        duplicate_pairs(x * 2, 0.9)
    with pytest.raises(ValueError, match="valid choices"):
        duplicate_clusters(x, 0.9, method="hnsw")


def test_item_level_keep_one_crop_per_duplicate_cluster():
    # six retrieved crops from four original images; images a and c are duplicates
    source = ["a", "b", "a", "c", "d", "b"]
    uniq, item_img = np.unique(source, return_inverse=True)   # as the curate stage maps items to images
    assert uniq.tolist() == ["a", "b", "c", "d"] and item_img.tolist() == [0, 1, 0, 2, 3, 1]
    rng = np.random.default_rng(0)
    f = unit(rng, 4, 32)
    f[2] = near(f[:1], 0.995, rng)[0]
    item_labels = duplicate_clusters(f, 0.99)[item_img]
    assert item_labels.tolist() == [0, 1, 0, 0, 2, 1]
    order = np.array([3, 0, 1, 2, 5, 4])  # curated rank of each crop (lower is better)
    keep = keep_one_per_cluster(item_labels, order)
    assert keep.tolist() == [False, True, True, False, True, False]


def test_keep_one_ties_break_by_index():
    keep = keep_one_per_cluster(np.array([1, 1, 0, 0]), np.array([0, 0, 2, 2]))
    assert keep.tolist() == [True, False, True, False]


@pytest.mark.slow
def test_large_dedup_finds_every_planted_pair():
    rng = np.random.default_rng(0)
    n, planted = 50_000, 300
    x = unit(rng, n, 64)
    src = rng.choice(n // 2, size=planted, replace=False)
    dst = n // 2 + rng.choice(n // 2, size=planted, replace=False)
    x[dst] = near(x[src], 0.995, rng)
    labels = duplicate_clusters(x, 0.99)  # auto -> IVF at this size
    assert (labels[src] == labels[dst]).all()
    assert np.unique(labels).size == n - planted


# ---------------------------------------------------------------- decontamination


def test_planted_copies_of_references_are_flagged_look_alikes_are_not(tmp_path):
    refs = [pattern(100 + s) for s in range(15)]
    ref_ids = [f"{split}/{i}" for split, i in
               [("train", i) for i in range(5)] + [("val", i) for i in range(5)] +
               [("test", i) for i in range(5)]]
    others = [pattern(200 + s) for s in range(6)]
    retrieved = others + [jpeg_copy(refs[12]),             # test image, re-encoded
                          resized_copy(refs[1]),            # train image, resized
                          jpeg_copy(resized_copy(refs[6])),  # val image, both
                          look_alike(refs[8], others[0], .4)]
    ids = [f"web/{i}" for i in range(len(retrieved))]
    img_f, ref_f = encode(retrieved), encode(refs)
    alike = max(float(img_f[e][9] @ ref_f[e][8]) for e in range(2))
    assert 0.7 < alike < 0.95, "fixture: the look-alike must be similar but below the threshold"

    report = find_leaks(img_f, ref_f, threshold=0.95, k=5, reference_ids=ref_ids, image_ids=ids)
    assert sorted(x.index for x in report.leaks) == [6, 7, 8]
    by_id = {x.image_id: x for x in report.leaks}
    assert by_id["web/6"].neighbor_ids[0] == "test/2"
    assert by_id["web/7"].neighbor_ids[0] == "train/1"
    assert by_id["web/8"].neighbor_ids[0] == "val/1"
    for leak in report.leaks:
        assert len(leak.neighbor_ids) == 5 and leak.max_similarity > 0.95
        assert list(leak.neighbor_similarity) == sorted(leak.neighbor_similarity, reverse=True)
    assert report.leak_mask().tolist() == [False] * 6 + [True] * 3 + [False]
    json.dumps(report.to_dict())

    review = tmp_path / "review.json"
    review.write_text(json.dumps({"not_leaks": ["web/7"]}))
    reviewed = clear_reviewed(report, set(read_review(review)))
    assert sorted(x.image_id for x in reviewed.leaks) == ["web/6", "web/8"]
    assert [x.image_id for x in reviewed.cleared] == ["web/7"]
    assert clear_reviewed(reviewed, {"web/7"}).leaks == reviewed.leaks  # applying twice is harmless
    review.write_text(json.dumps(["web/6", "web/0"]))
    assert read_review(review) == ["web/6", "web/0"]
    review.write_text(json.dumps({"leaks": []}))
    with pytest.raises(ValueError, match="not_leaks"):
        read_review(review)


def test_max_over_encoders_flags_and_mean_orders_neighbours():
    # encoder 0: image 0 is 0.97 to ref 0 (flag); encoder 1: 0.2 -> mean 0.585
    # ref 1 is 0.9 / 0.9 (mean 0.9): first by mean similarity, though below 0.95 in both
    e0 = np.array([[1, 0, 0]], np.float32), np.array([[.97, np.sqrt(1 - .97 ** 2), 0],
                                                      [.9, 0, np.sqrt(1 - .81)]], np.float32)
    e1 = np.array([[0, 1, 0]], np.float32), np.array([[np.sqrt(1 - .04), .2, 0],
                                                      [0, .9, np.sqrt(1 - .81)]], np.float32)
    report = find_leaks([e0[0], e1[0]], [e0[1], e1[1]], threshold=0.95, k=5,
                        reference_ids=["r0", "r1"])
    (leak,) = report.leaks
    assert leak.max_similarity == pytest.approx(0.97, abs=1e-6) and leak.encoder == 0
    assert leak.neighbor_ids == ("r1", "r0")  # k capped at the reference count
    assert leak.neighbor_similarity == pytest.approx((0.9, 0.585), abs=1e-5)
    # neither encoder alone above 0.95 -> not flagged
    assert not find_leaks([e0[0], e1[0]], [e0[1][1:], e1[1][1:]]).leaks


def test_find_leaks_input_errors():
    x = np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match="encoders"):
        find_leaks([x, x], [x])
    with pytest.raises(ValueError, match="dim"):
        find_leaks(x, np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="unique"):
        find_leaks(x, x, image_ids=["a", "a"])


@pytest.mark.slow
def test_large_decontamination_smoke():
    rng = np.random.default_rng(1)
    n, r, planted = 50_000, 30_000, 40
    refs = [unit(rng, r, 32), unit(rng, r, 32)]
    imgs = [unit(rng, n, 32), unit(rng, n, 32)]
    rows = rng.choice(n, size=planted, replace=False)
    src = rng.choice(r, size=planted, replace=False)
    imgs[0][rows] = near(refs[0][src], 0.97, rng)  # above the threshold in one encoder only
    imgs[1][rows] = near(refs[1][src], 0.90, rng)
    report = find_leaks(imgs, refs, threshold=0.95)  # auto -> IVF references at this size
    assert sorted(x.index for x in report.leaks) == sorted(rows.tolist())
    assert {x.index: x.neighbor_ids[0] for x in report.leaks} == \
        {int(i): str(s) for i, s in zip(rows, src)}


def test_leak_report_round_trips_through_its_dict():
    """A curate stage record stores the report as JSON; the run continues from the read-back copy."""
    from curation.decontam import LeakReport
    from curation.verify import VerifyRule

    rng = np.random.default_rng(3)
    refs = rng.normal(size=(6, 8)).astype(np.float32)
    refs /= np.linalg.norm(refs, axis=1, keepdims=True)
    imgs = np.concatenate([refs[:2] + 0.01, rng.normal(size=(3, 8))]).astype(np.float32)
    imgs /= np.linalg.norm(imgs, axis=1, keepdims=True)
    report = find_leaks(imgs, refs, 0.95, 2, image_ids=[f"g/{i}" for i in range(5)])
    report = dataclasses.replace(report, rejected=report.leaks[1:], leaks=report.leaks[:1],
                                 verify_rule=VerifyRule.of(0.9, None))
    assert len(report.leaks) == 1 and len(report.rejected) == 1
    back = LeakReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert back == report
