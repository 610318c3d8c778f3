"""Copy detection: the copy family, the verification score, calibration, and planted copies of
real images (Fashion-MNIST, Tux Paint stamps, scikit-image photos) with two encoders.

The planted-copy tests calibrate on one half of a labelled pool and measure on the other half
with fresh copies: recall per copy kind, and the false-positive rate of each held-out image
against its nearest distinct image of the same class (by embedding), the hardest look-alike.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from curation import pixelkey
from curation.calibrate import Measurements, SampledImages, cached_calibration, choose, evaluate, measure
from curation.copies import COPY_KINDS, copy_rng, make_copy
from curation.decontam import Leak, LeakReport, verify_leaks
from curation.dedup import duplicate_clusters, nearest_partners
from curation.verify import NO_MATCH, Match, VerifyRule, copy_match
from index.encode import embed_images
from index.encoders import build_encoder, resolve_encoder

from fixtures_samples import SAMPLES


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fm_images():
    return SAMPLES["fashion_mnist"](40, 3)[0]


# ---------------------------------------------------------------- the copy family


@pytest.mark.parametrize("kind", list(COPY_KINDS))
def test_each_copy_kind_is_a_deterministic_rgb_edit(kind: str, fm_images):
    im = SAMPLES["skimage"](1, 0)[0][0]
    a, b = make_copy(im, kind, copy_rng(0, 1, kind)), make_copy(im, kind, copy_rng(0, 1, kind))
    assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    assert a.size != im.size or not np.array_equal(np.asarray(a), np.asarray(im)), "a copy differs"


def test_unknown_copy_kind_lists_the_kinds():
    with pytest.raises(ValueError, match="jpeg, resize"):
        make_copy(Image.new("RGB", (8, 8)), "rotate", np.random.default_rng(0))


# ---------------------------------------------------------------- verification score


def test_copy_match_is_symmetric_and_exact_for_the_same_image(fm_images):
    a, b = fm_images[0], fm_images[1]
    assert copy_match(a, a).score == pytest.approx(1.0, abs=1e-4) and copy_match(a, a).residual < 0.5
    assert copy_match(a, b).score == pytest.approx(copy_match(b, a).score, abs=1e-6)
    assert copy_match(a, b).residual == pytest.approx(copy_match(b, a).residual, rel=1e-3)
    assert copy_match(a, b).score < 0.99 and copy_match(a, b).residual > 10


def test_flat_images_cannot_be_verified():
    flat = Image.new("RGB", (32, 32), (200, 10, 10))
    assert np.isnan(copy_match(flat, flat).score)
    rule = VerifyRule(0.5, 10.0)
    assert not rule.passes(NO_MATCH) and rule.passes(Match(0.9, 3.0)) and not rule.passes(Match(0.5, 3.0))
    assert not rule.passes(Match(0.99, 10.5)) and VerifyRule(0.5).passes(Match(0.9, 1e6))
    assert rule.to_dict() == {"min_score": 0.5, "max_residual": 10.0} and VerifyRule(0.5).to_dict()["max_residual"] is None


def test_copy_match_aligns_crops_pads_flips_and_resizes_exactly(fm_images):
    for kind in ("crop", "pad", "flip", "resize"):
        for i, im in enumerate(fm_images[:10]):
            m = copy_match(make_copy(im, kind, copy_rng(0, i, kind)), im)
            assert m.score > 0.999 and m.residual < 1.0, (kind, m)


def test_a_part_of_an_image_is_not_its_copy_but_a_letterbox_is():
    from PIL import ImageOps

    for im in SAMPLES["skimage"](6, 0)[0]:
        w, h = im.size
        part = im.crop((0, 0, w, int(h * 0.7)))          # 70% of the area: outside the crop family
        box = ImageOps.expand(im, border=(0, h // 5, 0, h // 5), fill=(255, 255, 255))
        assert not copy_match(part, im).score > 0.9, "a part whose rest is not flat"
        m = copy_match(box, im)
        assert m.score > 0.999 and m.residual < 1.0


# ---------------------------------------------------------------- calibration (pure parts)


def _measurements(pos: np.ndarray, neg: np.ndarray, pos_v: np.ndarray, neg_v: np.ndarray,
                  pos_r: np.ndarray | None = None, neg_r: np.ndarray | None = None) -> Measurements:
    kinds = tuple(f"k{i}" for i in range(pos.shape[0]))
    pos_r = np.zeros(pos.shape) if pos_r is None else pos_r
    neg_r = np.zeros(neg.shape) if neg_r is None else neg_r
    neg, neg_v, neg_r = neg[:, None], neg_v[:, None], neg_r[:, None]   # one distinct reference per image
    return Measurements(kinds, pos, pos, np.zeros(pos.shape, np.int64), pos_v, pos_r, neg, neg, neg_v, neg_r)


def test_choose_keeps_recall_for_every_kind_and_sets_verification_in_the_gap():
    pos = np.array([np.linspace(0.90, 1.0, 100), np.linspace(0.60, 1.0, 100)])   # kind 1 spreads lower
    neg = np.linspace(0.5, 0.95, 100)
    pos_v = np.full(pos.shape, 0.98)
    neg_v = np.linspace(0.0, 0.8, 100)
    cal = choose(_measurements(pos, neg, pos_v, neg_v), 0.99)
    assert cal.leak_threshold < 0.60 + 0.4 * 0.01   # set by the lower kind, not by the average
    assert all(r >= 0.99 for r in cal.recall.values())
    q99 = float(np.quantile(neg_v, 0.99))
    assert cal.verify_threshold == pytest.approx((0.98 - 1e-6 + q99) / 2, abs=1e-5)
    assert cal.false_positive_rate == 0.0 and cal.verify_max_residual is None   # the residual is not needed
    none = choose(_measurements(pos, neg, pos_v, neg_v), 0.99, verify="none")
    assert none.verify_threshold is None and none.leak_threshold > cal.leak_threshold
    assert none.false_positive_rate == evaluate(_measurements(pos, neg, pos_v, neg_v), none.leak_threshold,
                                                None)["false_positive_rate"] > 0.5


def test_choose_limits_the_residual_where_correlation_cannot_separate():
    # copies of low-contrast images correlate less (0.96..0.98) than high-contrast look-alikes (0.985),
    # but differ from their source by a small residual (grey levels) where look-alikes differ by a large one
    pos = np.full((2, 200), 0.99)
    pos_v = np.stack([np.linspace(0.96, 0.999, 200)] * 2)
    pos_r = np.stack([np.linspace(2.0, 14.0, 200), np.linspace(0.0, 6.0, 200)])
    neg, neg_v, neg_r = np.full(200, 0.99), np.full(200, 0.985), np.linspace(19.0, 40.0, 200)
    m = _measurements(pos, neg, pos_v, neg_v, pos_r, neg_r)
    cal = choose(m, 0.99)
    assert cal.false_positive_rate == 0.0 and min(cal.recall.values()) >= 0.99
    assert 13.0 <= cal.verify_max_residual < 19.0 and cal.verify_threshold < 0.961
    assert evaluate(m, cal.leak_threshold, VerifyRule(cal.verify_threshold), cal.neighbours)["false_positive_rate"] == 1.0


def test_choose_rejects_a_bad_recall():
    m = _measurements(np.ones((1, 4)), np.zeros(4), np.ones((1, 4)), np.zeros(4))
    with pytest.raises(ValueError, match="recall"):
        choose(m, 1.0)


def test_calibration_is_cached_by_encoder_and_reference_sample(tmp_path, fm_images):
    from curation.querysets import LabeledImage

    models = [build_encoder(resolve_encoder("test-tiny-clip"))]
    refs = [LabeledImage(f"r{i}", 0, (lambda im=im: im)) for i, im in enumerate(fm_images[:12])]
    feats = embed_images(models, [r.load() for r in refs], 16)
    a, reused_a = cached_calibration(models, refs, feats, tmp_path, size=8)
    b, reused_b = cached_calibration(models, refs, feats, tmp_path, size=8)
    assert (reused_a, reused_b) == (False, True) and a == b
    assert len(list(tmp_path.glob("calibration-*.json"))) == 1
    c, reused_c = cached_calibration(models, refs, feats, tmp_path, size=10)   # another sample
    assert not reused_c and len(list(tmp_path.glob("calibration-*.json"))) == 2
    saved = json.loads(next(tmp_path.glob("calibration-*.json")).read_text())
    assert saved["key"]["encoders"][0]["name"] == "test-tiny-clip"


# ---------------------------------------------------------------- dedup / decontam wiring


def test_nearest_partners_caps_pairs_per_image():
    i = np.array([0, 0, 0, 1])
    j = np.array([1, 2, 3, 2])
    s = np.array([0.9, 0.8, 0.7, 0.95])
    assert nearest_partners(i, j, s, 1).tolist() == [True, False, True, True]   # (0,3): 3's best


def test_duplicate_clusters_keep_only_verified_pairs():
    x = np.eye(4, dtype=np.float32)[[0, 0, 1, 1]]
    assert duplicate_clusters(x, 0.9).tolist() == [0, 0, 1, 1]
    labels = duplicate_clusters(x, 0.9, keep_pair=lambda i, j: i == 0)
    assert labels.tolist() == [0, 0, 1, 2]


def test_duplicate_clusters_take_candidates_from_pixel_keys_too(fm_images):
    ims = [fm_images[0], make_copy(fm_images[0], "crop", copy_rng(0, 0, "crop")), fm_images[1], fm_images[2]]
    x = np.eye(4, dtype=np.float32)              # an encoder that sees four different images
    keys = pixelkey.keys(ims)
    assert duplicate_clusters(x, 0.9).tolist() == [0, 1, 2, 3]
    labels = duplicate_clusters(x, 0.9, keys=keys, key_threshold=0.8, per_image=2,
                                keep_pair=lambda i, j: np.array([copy_match(ims[a], ims[b]).score > 0.95
                                                                 for a, b in zip(i, j)]))
    assert labels.tolist() == [0, 0, 1, 2]
    with pytest.raises(ValueError, match="one pixel key per image"):
        duplicate_clusters(x, 0.9, keys=keys[:2], key_threshold=0.8)


def test_verify_leaks_moves_unconfirmed_candidates_to_rejected():
    leaks = tuple(Leak(index=k, image_id=f"g{k}", max_similarity=0.9, encoder=0, neighbor_ids=("a", "b"),
                       neighbor_similarity=(0.9, 0.8)) for k in range(3))
    found = {("g0", "a"): Match(0.99, 30.0), ("g0", "b"): Match(0.97, 5.0), ("g1", "a"): Match(0.5, 3.0),
             ("g1", "b"): NO_MATCH, ("g2", "a"): NO_MATCH, ("g2", "b"): NO_MATCH}
    r = verify_leaks(LeakReport(0.5, 3, 2, leaks), lambda g, ref: found[(g, ref)], VerifyRule(0.9, 10.0))
    assert [x.image_id for x in r.leaks] == ["g0"]
    assert r.leaks[0].verified_reference == "b" and r.leaks[0].verify_residual == 5.0   # the passing match is shown
    assert [x.image_id for x in r.rejected] == ["g1", "g2"]
    assert r.rejected[0].verify_score == 0.5 and np.isnan(r.rejected[1].verify_score)
    assert r.to_dict()["verify_rule"] == {"min_score": 0.9, "max_residual": 10.0}


# ---------------------------------------------------------------- planted copies of real images

POOLS = {"fashion_mnist": 200, "stamps": 120, "skimage": 120}
NEGATIVES = 16   # distinct same-class images checked per held-out image (a lower bound on false
                 # positives where the calibration verifies a candidate against more references)
ENCODERS = {"efficientnet_lite0": 64, "test-tiny-clip": None}


@pytest.fixture(scope="module")
def planted() -> dict:
    """(set, encoder) -> (calibration on one half, measurements on the other half)."""
    out = {}
    for name, pool in POOLS.items():
        images, labels = SAMPLES[name](pool, 0)
        keys = pixelkey.keys(images)
        rows = np.arange(len(images))
        cal_rows, test_rows = rows[0::2], rows[1::2]
        scores: dict = {}   # verification scores do not depend on the encoder
        for enc, size in ENCODERS.items():
            models = [build_encoder(resolve_encoder(enc, image_size=size))]
            feats = embed_images(models, images, 32)
            cal = choose(measure(models, SampledImages(images, cal_rows), feats, cal_rows, seed=0, scores=scores,
                                 negatives=NEGATIVES, ref_keys=keys), 0.99)
            test = measure(models, SampledImages(images, test_rows), feats, test_rows, seed=1, labels=labels,
                           scores=scores, negatives=NEGATIVES, ref_keys=keys)
            out[name, enc] = (cal, test)
    return out


# The goal, and what these bounds hold: recall >= 0.99 for every kind and a false-positive rate
# <= 0.01, on 60..100 held-out images per set. Measured with Lite0 and test-tiny-clip alike:
# recall 1.0 for every kind on every set, no look-alike confirmed. Without retrieval by pixel key
# (embedding only) recall falls to 0.96 (Lite0: half-size JPEG copies of Fashion-MNIST below the
# leak threshold) and 0.93 (test-tiny-clip: crops whose source is not among the references
# verified), which `test_pixel_key_retrieves_what_the_embedding_misses` pins.
MIN_RECALL = 0.99
MAX_FALSE_POSITIVE_RATE = 0.01                  # per image
MAX_FALSE_POSITIVE_RATE_PER_PAIR = 0.001


@pytest.mark.slow
@pytest.mark.parametrize("name", list(POOLS))
@pytest.mark.parametrize("enc", list(ENCODERS))
def test_planted_copies_are_caught_and_most_look_alikes_kept(planted, name: str, enc: str):
    cal, test = planted[name, enc]
    got = cal.evaluate(test)
    paper = evaluate(test, 0.95, None)
    print(name, enc, json.dumps({"calibrated": got, "paper": paper}))
    recall = np.array(list(got["recall"].values()))
    assert recall.min() >= MIN_RECALL, got["recall"]
    assert got["false_positive_rate"] <= MAX_FALSE_POSITIVE_RATE, got
    assert got["false_positive_rate_per_pair"] <= MAX_FALSE_POSITIVE_RATE_PER_PAIR, got
    paper_recall = np.array(list(paper["recall"].values()))
    if enc == "efficientnet_lite0":   # the paper's threshold misses most copies of some kind
        assert paper_recall.min() < 0.8 and recall.min() > paper_recall.min() + 0.15
    else:                             # random-init: everything is > 0.95; calibration rejects most
        assert paper["false_positive_rate"] > 0.9 and got["false_positive_rate"] < 0.2


@pytest.mark.slow
def test_pixel_key_retrieves_what_the_embedding_misses(planted):
    """Without the pixel key some copies never reach verification (measured: Lite0 0.96 on
    half-size JPEG copies of Fashion-MNIST, test-tiny-clip 0.93 on crops); with it, none is lost."""
    worst = {}
    for (name, enc), (cal, test) in planted.items():
        alone = evaluate(test, cal.leak_threshold, cal.rule, cal.neighbours, None)["recall"]
        both = cal.evaluate(test)["recall"]
        assert all(both[k] >= alone[k] for k in alone)
        worst[name, enc] = min(alone.values())
    assert worst["fashion_mnist", "efficientnet_lite0"] < 0.99 and worst["fashion_mnist", "test-tiny-clip"] < 0.99


def test_pixel_key_finds_each_copy_kind_and_trims_letterboxes(fm_images):
    refs = pixelkey.Keys.of(fm_images)
    for kind in ("jpeg", "resize", "colour", "flip", "format", "pad", "resize_jpeg"):
        copies = [make_copy(im, kind, copy_rng(0, i, kind)) for i, im in enumerate(fm_images)]
        sims, rows = refs.nearest(pixelkey.keys(copies), 2)
        assert (rows[:, 0] == np.arange(len(fm_images))).mean() >= 0.95, kind
        assert np.all(rows[:, 0] != rows[:, 1])                       # distinct references
    im = SAMPLES["skimage"](1, 0)[0][0]
    from PIL import ImageOps
    box = ImageOps.expand(im, border=(0, 12, 0, 12), fill=(255, 255, 255))
    assert pixelkey.similarity(pixelkey.keys([box]), pixelkey.keys([im]))[0, 0] > 0.999
    flat = pixelkey.keys([Image.new("RGB", (20, 20), (90, 90, 90))])
    assert not flat.any() and pixelkey.similarity(flat, pixelkey.keys([im]))[0, 0] == 0.0
    with pytest.raises(ValueError, match="pixel keys must be"):
        pixelkey.Keys(np.zeros((2, 3), np.float32))


@pytest.mark.slow
def test_planted_measurements_are_the_single_pair_matches(planted):
    """The calibration's verification scores (batched, `verify_batch.match_pairs`) are copy_match's."""
    for (name, enc), (cal, test) in planted.items():
        if enc != "efficientnet_lite0":
            continue                           # the scores do not depend on the encoder
        images, _ = SAMPLES[name](POOLS[name], 0)
        rows = np.arange(len(images))[1::2]
        for ki, kind in enumerate(test.kinds):
            for i in range(0, len(rows), 7):
                r = int(rows[i])
                want = copy_match(make_copy(images[r], kind, copy_rng(1, r, kind)), images[r])
                got = (test.pos_verify[ki, i], test.pos_residual[ki, i])
                assert np.allclose(got, want, atol=1e-5, equal_nan=True), (name, kind, r, got, want)
                assert cal.rule.passes(Match(*got)) == cal.rule.passes(want)
        for i in range(0, len(rows), 5):
            for j in range(test.neg_ids.shape[1] if test.neg_ids is not None else 0):
                want = copy_match(images[int(rows[i])], images[int(test.neg_ids[i, j])])
                got = (test.neg_verify[i, j], test.neg_residual[i, j])
                if np.isfinite(test.neg_max[i, j]):
                    assert np.allclose(got, want, atol=1e-5, equal_nan=True), (name, i, j, got, want)
