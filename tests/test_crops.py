"""Crop recipes: determinism, torchvision-equivalent sampling bounds, exact re-materialisation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandAugment

from index.core import contract
from index.core.config import from_mapping
from index.crops import CropConfig, CropRecipe, full_box, make_recipe, materialize, op_names, recipes_for


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth gradient + noise so that ops such as Equalize/AutoContrast have something to do
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    noise = rng.integers(0, 40, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def test_recipe_is_deterministic_and_depends_on_every_input():
    cfg = CropConfig()
    r = make_recipe("00000/k1", 3, 7, (640, 480), cfg)
    assert r == make_recipe("00000/k1", 3, 7, (640, 480), cfg)
    others = [make_recipe("00000/k1", 4, 7, (640, 480), cfg),
              make_recipe("00000/k1", 3, 8, (640, 480), cfg),
              make_recipe("00000/k2", 3, 7, (640, 480), cfg)]
    assert all(o != r for o in others)
    # all crops of one image differ from each other
    recipes = recipes_for("00000/k1", (640, 480), 7, cfg)
    assert len(recipes) == cfg.crops_per_image
    assert len({(x.box, x.ops) for x in recipes}) == cfg.crops_per_image


def test_recipe_is_stable_across_releases():
    # pins the hash -> RNG -> sampling chain; a change here silently invalidates stored indexes
    r = make_recipe("00000/abc", 3, 0, (640, 480), CropConfig())
    assert r.box == (21, 31, 308, 310)
    assert [name for name, _ in r.ops] == ["Color", "TranslateX"]
    assert r.ops[0][1] == pytest.approx(-0.27, abs=1e-6)
    assert r.ops[1][1] == pytest.approx(-150.0 / 331.0 * 224 * 9 / 30, rel=1e-6)


def _fits_bounds(box, w_img, h_img, scale, ratio) -> bool:
    """Some real (w', h') within rounding (+-0.5) of the integer box satisfies torchvision's bounds."""
    _, _, h, w = box
    area = w_img * h_img
    return ((w + 0.5) / (h - 0.5) >= ratio[0] - 1e-9 and (w - 0.5) / (h + 0.5) <= ratio[1] + 1e-9
            and (w + 0.5) * (h + 0.5) >= scale[0] * area - 1e-9
            and (w - 0.5) * (h - 0.5) <= scale[1] * area + 1e-9)


@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 0.9), (0.5, 2.0))])
def test_boxes_inside_image_and_within_bounds(scale, ratio):
    cfg = CropConfig(crops_per_image=8, scale=scale, ratio=ratio, randaugment=False)
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 2000, (300, 2))] + [(1, 1), (1, 500), (500, 1), (3, 2)]
    fallbacks, typical = 0, 0
    for w_img, h_img in sizes:
        for c, r in enumerate(recipes_for(f"s/{w_img}x{h_img}", (w_img, h_img), 0, cfg)):
            top, left, h, w = r.box
            typical += ratio[0] <= w_img / h_img <= ratio[1] and min(w_img, h_img) >= 10
            assert 0 <= top and 0 <= left and 1 <= h and 1 <= w
            assert top + h <= h_img and left + w <= w_img
            if not _fits_bounds(r.box, w_img, h_img, scale, ratio):
                # only torchvision's central fallback may leave the bounds
                in_ratio = w_img / h_img
                fallbacks += ratio[0] <= in_ratio <= ratio[1] and min(w_img, h_img) >= 10
                assert (top, left) == ((h_img - h) // 2, (w_img - w) // 2)
                if ratio[0] <= in_ratio <= ratio[1]:
                    assert (h, w) == (h_img, w_img)
                else:
                    assert h == h_img or w == w_img
    # for images whose own aspect fits `ratio`, ten failed attempts in a row are rare
    assert typical > 500 and fallbacks < typical * 0.02


def test_ops_follow_torchvision_randaugment_space():
    cfg = CropConfig(crops_per_image=50, size=224)
    space = RandAugment()._augmentation_space(cfg.num_magnitude_bins, (cfg.size, cfg.size))
    assert op_names() == list(space)
    seen_signs: dict[str, set[bool]] = {}
    for k in range(40):
        for r in recipes_for(f"s/{k}", (300, 200), 1, cfg):
            assert len(r.ops) == cfg.num_ops
            for name, mag in r.ops:
                mags, signed = space[name]
                expected = float(mags[cfg.magnitude].item()) if mags.ndim > 0 else 0.0
                assert abs(mag) == expected
                if not signed:
                    assert mag == expected
                seen_signs.setdefault(name, set()).add(mag < 0)
    assert set(seen_signs) == set(space)  # every op is drawn
    assert seen_signs["Rotate"] == {True, False}  # signed magnitudes take both signs
    no_aug = CropConfig(randaugment=False)
    assert all(r.ops == () for r in recipes_for("s/x", (300, 200), 1, no_aug))


def test_materialize_is_exact_and_survives_json_roundtrip():
    img = _image(320, 240)
    cfg = CropConfig(crops_per_image=6, size=64, num_ops=3)
    for r in recipes_for("00001/img", img.size, 5, cfg):
        a = materialize(img, r)
        assert a.mode == "RGB" and a.size == (64, 64)
        b = materialize(img, r)
        assert np.array_equal(np.asarray(a), np.asarray(b))
        r2 = CropRecipe.from_dict(json.loads(json.dumps(r.to_dict())))
        assert r2 == r
        assert np.array_equal(np.asarray(materialize(img, r2)), np.asarray(a))


def test_written_recipe_has_one_json_type_per_field_and_reads_the_older_form():
    img = _image(320, 240)
    cfg = CropConfig(crops_per_image=3, size=32, num_ops=2, keep_full_image=True)
    full, *augmented = recipes_for("00001/img", img.size, 5, cfg)
    for r in (full, *augmented):
        d = json.loads(json.dumps(r.to_dict()))
        assert list(d) == list(contract.RECIPE_FIELDS)
        assert d["ops"] and all(set(op) == {"op", "magnitude"} and isinstance(op["op"], str)
                                and isinstance(op["magnitude"], float) for op in d["ops"])
        assert CropRecipe.from_dict(d) == r
        # indexes before STORE_FORMAT 4 and sets before CURATED_FORMAT 2 wrote ops as [name, magnitude] pairs
        old = {**d, "ops": [[name, mag] for name, mag in r.ops]}
        assert CropRecipe.from_dict(old) == r and contract.recipe_json(old) == d
    assert full.ops == () and full.to_dict()["ops"] == [contract.NO_OP]   # a list Arrow can type
    assert np.array_equal(np.asarray(materialize(img, CropRecipe(full.box, full.size, True, (("Identity", 0.0),)))),
                          np.asarray(materialize(img, full))), "NO_OP is the identity"
    assert all(len(r.ops) == 2 for r in augmented)
    # an integer magnitude is written as a float: one JSON type per field
    assert contract.recipe_json({"box": [0, 0, 1, 1], "size": 4, "ops": [["Rotate", 3]]})["ops"] == \
        [{"op": "Rotate", "magnitude": 3.0}]


@pytest.mark.parametrize("bad,message", [
    ([0, 0, 1, 1], "a crop recipe is a JSON object"),
    ({"size": 4}, "needs 'box'"),
    ({"box": [0, 0, 1], "size": 4}, "needs 'box'"),
    ({"box": [0, 0, 1, 1], "size": 4, "ops": [["Rotate"]]}, "a recipe op is"),
    ({"box": [0, 0, 1, 1], "size": 4, "ops": [{"op": "Rotate"}]}, "a recipe op is"),
    ({"box": [0, 0, 1, 1], "size": 4, "ops": [{"op": "Rotate", "magnitude": "9"}]}, "a number 'magnitude'"),
    ({"box": [0, 0, 1, 1], "size": 4, "ops": [[3.0, "Rotate"]]}, "a string 'op'"),
])
def test_malformed_recipes_are_refused_saying_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        CropRecipe.from_dict(bad)


def test_materialize_matches_torchvision_pipeline():
    # Without ops the crop equals torchvision's resized_crop; each op is torchvision's own.
    from torchvision.transforms import functional as TF
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op
    img = _image(200, 150)
    r = CropRecipe(box=(10, 20, 100, 120), size=48, ops=(("Rotate", -8.0), ("Posterize", 6.0)))
    ref = TF.resized_crop(img, 10, 20, 100, 120, [48, 48], interpolation=InterpolationMode.BILINEAR, antialias=True)
    ref = _apply_op(ref, "Rotate", -8.0, interpolation=InterpolationMode.NEAREST, fill=None)
    ref = _apply_op(ref, "Posterize", 6.0, interpolation=InterpolationMode.NEAREST, fill=None)
    assert np.array_equal(np.asarray(materialize(img, r)), np.asarray(ref))
    # the ops change pixels (they are applied, not dropped)
    plain = materialize(img, CropRecipe(box=r.box, size=48))
    assert not np.array_equal(np.asarray(plain), np.asarray(ref))


def test_keep_full_image_makes_crop_zero_the_whole_image():
    cfg = CropConfig(crops_per_image=4, size=32, keep_full_image=True)
    recipes = recipes_for("s/k", (300, 200), 0, cfg)
    assert recipes[0].full and recipes[0].ops == () and recipes[0].box == (0, 50, 200, 200)
    assert not any(r.full for r in recipes[1:])
    assert recipes[1:] == recipes_for("s/k", (300, 200), 0, CropConfig(crops_per_image=4, size=32))[1:]
    img = _image(300, 200)
    ref = img.crop((50, 0, 250, 200)).resize((32, 32), Image.BILINEAR)
    assert np.array_equal(np.asarray(materialize(img, recipes[0])), np.asarray(ref))
    assert full_box(200, 301) == (50, 0, 200, 200)  # round-half-even like torchvision center_crop


def test_grayscale_and_rgba_sources_give_rgb_crops():
    r = make_recipe("s/k", 0, 0, (64, 48), CropConfig(size=16))
    for mode in ("L", "RGBA", "P"):
        out = materialize(_image(64, 48).convert(mode), r)
        assert out.mode == "RGB" and out.size == (16, 16)


def test_bad_inputs_raise_clearly():
    with pytest.raises(ValueError, match="magnitude must be in"):
        CropConfig(magnitude=31)
    with pytest.raises(ValueError, match="scale must be"):
        CropConfig(scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="valid keys"):
        from_mapping(CropConfig, {"crops": 3})
    with pytest.raises(ValueError, match="crop_index"):
        make_recipe("s/k", 10, 0, (10, 10), CropConfig())
    with pytest.raises(ValueError, match="image_size"):
        make_recipe("s/k", 0, 0, (0, 10), CropConfig())
    with pytest.raises(ValueError, match="valid ops"):
        CropRecipe.from_dict({"box": [0, 0, 1, 1], "size": 4, "ops": [["Blur", 1.0]]})
    with pytest.raises(ValueError, match="does not fit"):
        materialize(_image(10, 10), CropRecipe(box=(5, 5, 8, 8), size=4))


def test_config_roundtrip():
    cfg = CropConfig(crops_per_image=3, scale=[0.2, 0.9], keep_full_image=True)
    assert cfg.scale == (0.2, 0.9)
    assert from_mapping(CropConfig, json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_sampling_uses_no_global_rng_state():
    torch.manual_seed(0)
    np.random.seed(0)
    a = make_recipe("s/k", 1, 0, (100, 100), CropConfig())
    torch.rand(5)
    np.random.rand(5)
    assert make_recipe("s/k", 1, 0, (100, 100), CropConfig()) == a
    assert math.isfinite(a.ops[0][1])
