"""The GPU path of indexing, exercised on CPU: crops cut from recipes on tensors, batched JPEG decode
with the CPU fallback, embed_shard with crops on the device, fp32 CPU output unchanged.

The bounds were measured on 9 scikit-image photos and 12 Tux Paint stamps, 10 crops of 224 px each
(2026-12, torchvision 0.29 CPU kernels against Pillow): mean absolute pixel difference 0.095 (worst
crop 2.9, a 17 x 51 stamp upscaled); embedding cosine with test-tiny-timm at least 0.9978 (mean 0.99998).
The GPU-only tests below run where CUDA is present.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from index import store
from index.crops import CropConfig, CropRecipe, materialize, recipes_for
from index.device_crops import OPS, apply_ops, crop_images, cut
from index.device_decode import EncodedJpeg, decode_on, defer_jpeg, pil_to_tensor
from index.embed import EmbedTask, Embedder, embed_shard
from index.encode import encode, prepare
from index.encoders import build_encoder, resolve_encoder
from index.core.images import decode_image
from index.gallery import list_shards
from test_index_build import CROPS, make_gallery

from fixtures_samples import bundled_skimage, stamps

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "horse", "rocket", "hubble_deep_field",
          "immunohistochemistry")
MEAN_ABS_DIFF_MAX = 0.2      # measured 0.095
CROP_ABS_DIFF_MAX = 4.0      # measured 2.9
COSINE_MIN = 0.995           # measured 0.9978
COSINE_MEAN_MIN = 0.9995     # measured 0.99998
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the device decode and bf16 path)")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_per_module):
    """One torch and one FAISS thread (conftest.one_thread_per_module): on a busy 2-core machine a second
    intra-op thread only waits at barriers."""


@pytest.fixture(scope="module")
def real_images() -> list[Image.Image]:
    photos = [bundled_skimage(n) for n in PHOTOS]
    images = [Image.fromarray(a).convert("RGB") for a in photos if a is not None]
    try:
        images += stamps(12, 0)[0]
    except FileNotFoundError:
        pass
    if len(images) < 8:
        pytest.skip("fewer than 8 real images on this machine (scikit-image samples, Tux Paint stamps)")
    return images


def _tensor(im: Image.Image) -> torch.Tensor:
    return pil_to_tensor(im, "cpu")


def test_tensor_crops_agree_with_pil_crops_on_real_images(real_images):
    cfg = CropConfig(crops_per_image=10, size=224)
    spec = resolve_encoder("test-tiny-timm")
    models = [build_encoder(spec)]
    diffs, cosines = [], []
    for k, im in enumerate(real_images):
        recipes = recipes_for(f"real/{k}", im.size, 0, cfg)
        got = crop_images([_tensor(im)], [recipes]).permute(0, 2, 3, 1)
        ref = np.stack([np.asarray(materialize(im, r)) for r in recipes])
        assert got.shape == ref.shape and got.dtype == torch.uint8
        diffs.extend(np.abs(ref.astype(np.int16) - got.numpy().astype(np.int16)).mean(axis=(1, 2, 3)))
        a, b = (encode(models, x, "cpu")[0].astype(np.float32) for x in (ref, got))
        cosines.extend((a * b).sum(1))
    assert np.mean(diffs) <= MEAN_ABS_DIFF_MAX, np.mean(diffs)
    assert np.max(diffs) <= CROP_ABS_DIFF_MAX, np.max(diffs)
    assert np.min(cosines) >= COSINE_MIN, np.min(cosines)
    assert np.mean(cosines) >= COSINE_MEAN_MIN, np.mean(cosines)


def test_every_op_agrees_with_its_pil_version(real_images):
    im = real_images[0]
    base = CropRecipe(box=(0, 0, min(im.size), min(im.size)), size=96)
    for name in OPS:
        for magnitude in ((0.0,) if name in ("Identity", "AutoContrast", "Equalize", "Invert")
                          else (0.3, -0.3) if name not in ("Posterize", "Solarize", "Rotate", "TranslateX",
                                                           "TranslateY") else
                          {"Posterize": (4.0,), "Solarize": (128.0,), "Rotate": (20.0, -20.0),
                           "TranslateX": (-20.0,), "TranslateY": (20.0,)}[name]):
            r = CropRecipe(box=base.box, size=96, ops=((name, magnitude),))
            got = crop_images([_tensor(im)], [[r]])[0].permute(1, 2, 0).numpy().astype(np.int16)
            ref = np.asarray(materialize(im, r)).astype(np.int16)
            assert np.abs(got - ref).mean() <= CROP_ABS_DIFF_MAX, (name, magnitude, np.abs(got - ref).mean())


def test_batched_ops_equal_each_crop_on_its_own(real_images):
    """Grouping crops by (position, op, magnitude) changes nothing: each crop as if alone."""
    cfg = CropConfig(crops_per_image=10, size=64, num_ops=3)
    images = [_tensor(im) for im in real_images[:4]]
    recipes = [recipes_for(f"b/{k}", (int(t.shape[2]), int(t.shape[1])), 0, cfg) for k, t in enumerate(images)]
    batched = crop_images(images, recipes)
    alone = torch.stack([crop_images([t], [[r]])[0] for t, rs in zip(images, recipes) for r in rs])
    assert torch.equal(batched, alone)
    assert len({op for rs in recipes for r in rs for op in r.ops}) > 5  # several groups were formed


def test_bad_inputs_are_refused():
    t = torch.zeros(3, 10, 10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="does not fit"):
        cut(t, CropRecipe(box=(0, 0, 11, 5), size=8))
    with pytest.raises(ValueError, match="uint8"):
        cut(t.float(), CropRecipe(box=(0, 0, 5, 5), size=8))
    with pytest.raises(ValueError, match="share a size"):
        crop_images([t, t], [[CropRecipe((0, 0, 5, 5), 8)], [CropRecipe((0, 0, 5, 5), 9)]])
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        apply_ops(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), [[("Blur", 1.0)]])


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_jpeg_decode_batch_and_fallback_give_the_cpu_paths_pixels_and_reasons(real_images):
    im = real_images[3]
    good = _jpeg(im, quality=90)
    png = io.BytesIO()
    im.save(png, format="PNG")
    cmyk = _jpeg(im.convert("CMYK"))
    cases = {
        "baseline": good, "progressive": _jpeg(im, progressive=True), "grey": _jpeg(im.convert("L")),
        "png": png.getvalue(), "cmyk": cmyk, "truncated": good[: len(good) // 2], "empty": b"",
        "garbage_scan": good[:300] + bytes(2000) + b"\xff\xd9", "not_image": b"hello world",
    }
    deferred = {k: defer_jpeg(v) for k, v in cases.items()}
    for k in ("baseline", "progressive", "grey", "garbage_scan"):
        assert isinstance(deferred[k][0], EncodedJpeg), k
    for k in ("png", "cmyk"):
        assert isinstance(deferred[k][0], Image.Image), k  # decoded on the CPU at once
    for k in ("truncated", "empty", "not_image"):
        assert deferred[k] == (None, decode_image(cases[k])[1]), k
    kept = [k for k, (v, _) in deferred.items() if v is not None]
    for k, (t, reason) in zip(kept, decode_on([deferred[k][0] for k in kept], "cpu")):
        ref, ref_reason = decode_image(cases[k])
        assert reason == ref_reason, k
        if ref is not None:
            assert torch.equal(t, _tensor(ref)), k  # torchvision's CPU decoder: Pillow's pixels


def test_size_limits_are_judged_from_the_header(real_images):
    data = _jpeg(real_images[0])
    w, h = real_images[0].size
    assert defer_jpeg(data, max_pixels=w * h - 1) == (None, "too_large")
    assert defer_jpeg(data, min_side=min(w, h) + 1) == (None, "too_small")


def test_embed_shard_with_crops_on_device_matches_the_cpu_path(tmp_path):
    gallery = make_gallery(tmp_path / "g")
    specs = (resolve_encoder("test-tiny-timm"),)
    shard = next(s for s in list_shards(str(gallery / "*.tar")) if s.name == "00001")
    out = {}
    for on_device in (False, True):
        task = EmbedTask(shard=shard, out_dir=str(tmp_path / f"out-{on_device}"), encoders=specs, crops=CROPS,
                         batch_size=6)
        out[on_device] = (embed_shard(task, Embedder(specs, "cpu", crops_on_device=on_device)), task.out_dir)
    (ref, ref_dir), (dev, dev_dir) = out[False], out[True]
    assert dev.skipped == ref.skipped == {"corrupt": 1}
    assert dev.num_vectors == ref.num_vectors == 12 and dev.fingerprint == ref.fingerprint
    rows = [(store.shard_dir(d, "00001") / "rows.jsonl").read_text() for d in (ref_dir, dev_dir)]
    assert rows[0] == rows[1]
    a, b = (store.load_features(d, "00001", "test-tiny-timm").astype(np.float32) for d in (ref_dir, dev_dir))
    assert (a * b).sum(1).min() >= COSINE_MIN


def test_cpu_output_is_float32_as_before(real_images):
    """On CPU the encoders run in float32 on the PIL crops exactly as before: the features equal a
    plain forward of the same crops, to the bit."""
    spec = resolve_encoder("test-tiny-timm")
    model = build_encoder(spec)
    crops = np.stack([np.asarray(materialize(real_images[1], r))
                      for r in recipes_for("x/0", real_images[1].size, 0, CropConfig(crops_per_image=4, size=64))])
    with torch.no_grad():
        f = model(prepare(torch.from_numpy(crops), spec))
    ref = torch.nn.functional.normalize(f, dim=-1).numpy().astype(np.float16)
    assert np.array_equal(encode([model], crops, "cpu")[0], ref)
    assert not Embedder((spec,), "cpu").crops_on_device


def test_default_batch_size_depends_on_the_device():
    from index.encode import default_batch_size

    assert default_batch_size("cpu") == 64
    assert default_batch_size("cuda") >= 256
    spec = resolve_encoder("test-tiny-timm")
    task = EmbedTask(shard=None, out_dir="", encoders=(spec,), crops=CROPS)  # type: ignore[arg-type]
    assert Embedder((spec,), "cpu").batch_size(task) == 64
    assert Embedder((spec,), "cpu").batch_size(EmbedTask(**{**task.__dict__, "batch_size": 7})) == 7


@cuda
def test_cuda_decode_and_crops_agree_with_the_cpu_path(real_images):
    cfg = CropConfig(crops_per_image=10, size=224)
    items = [defer_jpeg(_jpeg(im, quality=90))[0] for im in real_images]
    gpu = decode_on(items, "cuda")
    cpu = decode_on(items, "cpu")
    diffs = []
    for k, ((g, _), (c, _)) in enumerate(zip(gpu, cpu)):
        assert g.is_cuda and g.shape == c.shape
        recipes = recipes_for(f"real/{k}", (int(c.shape[2]), int(c.shape[1])), 0, cfg)
        a = crop_images([g], [recipes]).cpu().to(torch.int16)
        b = crop_images([c], [recipes]).to(torch.int16)
        diffs.extend((a - b).abs().float().mean(dim=(1, 2, 3)).tolist())
    assert np.mean(diffs) <= 2 * MEAN_ABS_DIFF_MAX and np.max(diffs) <= 2 * CROP_ABS_DIFF_MAX


@cuda
def test_cuda_bf16_features_agree_with_cpu_float32(real_images):
    spec = resolve_encoder("test-tiny-timm")
    crops = np.stack([np.asarray(materialize(real_images[0], r))
                      for r in recipes_for("x/0", real_images[0].size, 0, CropConfig(crops_per_image=8, size=64))])
    cpu = encode([build_encoder(spec, "cpu")], crops, "cpu")[0].astype(np.float32)
    gpu_model = build_encoder(spec, "cuda").to(memory_format=torch.channels_last)
    gpu = encode([gpu_model], crops, "cuda")[0].astype(np.float32)
    assert (cpu * gpu).sum(1).min() >= 0.99
    assert Embedder((spec,), "cuda").crops_on_device
