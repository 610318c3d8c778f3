"""Batched verification (`curation.verify_batch.match_pairs`) against `copy_match`, pair by pair.

On the planted-copy sets of `test_copy_detection` (copies of every kind against their source, and
each image against its nearest distinct images of the class by pixel key, the hardest look-alikes)
and on random pairs of varied sizes, flat, mirrored and letterboxed images: the same decision
under every rule calibrated there, and the same scores (both paths score the same placement).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from curation import pixelkey, verify_batch
from curation.copies import COPY_KINDS, copy_rng, make_copy
from curation.verify import NO_MATCH, Thumb, VerifyRule, copy_match
from curation.verify_batch import match_pairs, plan

from fixtures_samples import SAMPLES

# the rules calibrated on the planted-copy sets (bench/results/copydetect_quick.json), and two
# strict and loose ones around them
RULES = [VerifyRule(0.745734, 13.7998), VerifyRule(0.740866, 12.4387), VerifyRule(0.78845, 12.345),
         VerifyRule(0.980998, 4.3537), VerifyRule(0.5), VerifyRule(0.9, 8.0)]


@pytest.fixture(autouse=True)
def _batch_every_group(monkeypatch):
    """Groups of one size pair too small to batch go to `copy_match` itself; batch them here too."""
    monkeypatch.setattr(verify_batch, "SMALL_GROUP", 1)


def _planted_pairs(name: str, pool: int, images_used: int, lookalikes: int) -> list[tuple[Thumb, Thumb]]:
    images, labels = SAMPLES[name](pool, 0)
    thumbs = [Thumb.of(im) for im in images]
    keys = pixelkey.keys(images)
    s = pixelkey.similarity(keys, keys)
    np.fill_diagonal(s, -2)
    s[labels[:, None] != labels[None, :]] = -2
    pairs = []
    for i in range(images_used):
        pairs += [(Thumb.of(make_copy(images[i], k, copy_rng(1, i, k))), thumbs[i]) for k in COPY_KINDS]
        pairs += [(thumbs[i], thumbs[j]) for j in np.argsort(-s[i], kind="stable")[:lookalikes]]
    return pairs


def _assert_agree(pairs, got):
    want = [copy_match(a, b) for a, b in pairs]
    assert len(got) == len(want)
    w, g = np.array(want, np.float64).reshape(-1, 2), np.array(got, np.float64).reshape(-1, 2)
    assert np.array_equal(np.isnan(w), np.isnan(g))
    np.testing.assert_allclose(np.nan_to_num(g), np.nan_to_num(w), atol=1e-5, rtol=0)
    for rule in RULES:
        assert np.array_equal(rule.accepts(g[:, 0], g[:, 1]), rule.accepts(w[:, 0], w[:, 1])), rule
    return w


@pytest.mark.parametrize("name,pool,used", [("fashion_mnist", 120, 12), ("stamps", 60, 6), ("skimage", 60, 5)])
def test_batched_and_single_pair_verification_agree_on_planted_copies(name, pool, used):
    pairs = _planted_pairs(name, pool, used, 4)
    w = _assert_agree(pairs, match_pairs(pairs, device="cpu"))
    copies = np.array([k < len(COPY_KINDS) for _ in range(used) for k in range(len(COPY_KINDS) + 4)])
    assert RULES[0].accepts(w[copies, 0], w[copies, 1]).mean() > 0.8     # the sets hold real copies
    assert not RULES[3].accepts(w[~copies, 0], w[~copies, 1]).any()       # and real look-alikes


def _random_image(rng, w: int, h: int) -> Image.Image:
    base = rng.integers(0, 255, (max(2, h // 6), max(2, w // 6), 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
    return Image.fromarray(np.clip(np.asarray(im, np.int16) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def test_batched_verification_agrees_on_varied_sizes_flat_mirrored_and_letterboxed():
    rng = np.random.default_rng(7)
    ims = [_random_image(rng, int(w), int(h)) for w, h in rng.integers(8, 200, (14, 2))]
    ims += [_random_image(rng, 3, 40), _random_image(rng, 160, 12)]        # thin images
    flat = Image.new("RGB", (40, 30), (120, 30, 30))
    derived = [ImageOps.mirror(ims[0]), ImageOps.expand(ims[1], border=(0, 9, 0, 9), fill=(255, 255, 255)),
               ims[2].resize((ims[2].width // 2 + 1, ims[2].height // 2 + 1)), ims[3].crop((3, 3, ims[3].width - 2,
                                                                                               ims[3].height - 4))]
    thumbs = [Thumb.of(im) for im in ims + derived + [flat]]
    pairs = [(thumbs[i], thumbs[j]) for i in range(len(thumbs)) for j in range(len(thumbs)) if (i * 7 + j) % 3 == 0]
    pairs += [(thumbs[-5], thumbs[0]), (thumbs[-4], thumbs[1]), (thumbs[-3], thumbs[2]), (thumbs[-2], thumbs[3]),
              (thumbs[-1], thumbs[0]), (thumbs[0], thumbs[0])]
    w = _assert_agree(pairs, match_pairs(pairs, device="cpu"))
    assert np.isnan(w[-2]).all() and (w[-6:-2, 0] > 0.98).all()        # flat: NaN; the edits: copies


def test_torch_maps_give_the_same_matches(monkeypatch):
    """The torch FFT correlation (the CUDA path), run on the CPU, against `copy_match`."""
    monkeypatch.setattr(verify_batch, "CPU_MAPS", "torch")
    pairs = _planted_pairs("fashion_mnist", 60, 4, 3) + _planted_pairs("stamps", 40, 2, 2)
    _assert_agree(pairs, match_pairs(pairs, device="cpu"))


def test_images_are_accepted_and_bad_input_is_refused():
    im = SAMPLES["fashion_mnist"](2, 0)[0][0]
    assert match_pairs([]) == []
    (m,) = match_pairs([(im, ImageOps.mirror(im))], device="cpu")
    assert m.score > 0.999 and m == copy_match(im, ImageOps.mirror(im))
    with pytest.raises(TypeError, match="Thumb or PIL images"):
        match_pairs([(im, np.zeros((4, 4)))])


def test_progress_bar_reaches_its_total(capsys):
    ims = SAMPLES["fashion_mnist"](6, 0)[0]
    flat = Image.new("L", (28, 28), 9)
    pairs = [(a, b) for a in ims[:3] for b in ims[3:]] + [(flat, ims[0])]
    got = match_pairs(pairs, device="cpu", progress="verify test")
    err = capsys.readouterr().err
    assert "verify test" in err and f"{len(pairs)}/{len(pairs)}" in err
    assert got[-1] == NO_MATCH or np.isnan(got[-1].score)


def test_plan_lists_every_slide_copy_match_tries():
    jobs = plan((28, 28), (28, 28))
    assert [j.slide.tw for j in jobs if j.ref_side == 0] == [28, 27, 26, 25]   # own scale, then 97..88% crops
    assert [j.partial for j in jobs][:4] == [False, False, False, True]          # 25 x 25 < 80% of 28 x 28
    assert len(plan((96, 96), (48, 48))) > len(plan((96, 96), (96, 96)))          # + whole-image resizes


def test_bench_verify_agrees_with_copy_match_and_reports_its_target(capsys):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_verify", Path(__file__).parents[1] / "bench" / "verify.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    target = out["targets"]["verify_pairs_per_s"]
    assert target["goal"] == f">= {bench.GOAL}" and target["value"] > 0 and isinstance(target["met"], bool)
    assert all(s["same_decisions"] and s["same_nan"] and s["max_score_difference"] < 1e-5 for s in out["sets"].values())
