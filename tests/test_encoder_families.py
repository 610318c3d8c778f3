"""Contract tests generated from the encoder-family registry (as timm tests every model in list_models()).

Every fixed name of every registered family resolves to a spec of that family, builds a model with
the spec's feature size, preprocesses a non-square image by the spec's resize mode exactly as
open_clip's reference transform does, and either gives its own classifier from the same single
build or refuses with a clear error. A newly registered family or name is covered without a new test.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from PIL import Image

from index.encode import embed_images
from index.encoder_family import FAMILIES, NoSourceHead, spec_transform
from index.encoder_spec import RESIZE_MODES, EncoderSpec
from index.encoders import build_encoder, build_encoder_with_head, image_transform, resolve_encoder

NAMES = [(family, name) for family in FAMILIES for name in FAMILIES.get(family).fixed_names]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_per_module):
    """One torch and one FAISS thread (conftest.one_thread_per_module): on a busy 2-core machine a second
    intra-op thread only waits at barriers."""


def _reference_transform(spec: EncoderSpec):
    """open_clip's own eval preprocessing for the spec's PreprocessCfg (size, mean/std, interpolation, resize mode)."""
    cfg = PreprocessCfg(size=spec.image_size, mean=spec.mean, std=spec.std, interpolation=spec.interpolation,
                        resize_mode=spec.resize_mode)
    return image_transform_v2(cfg, is_train=False)


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A non-square RGB image with structure (a gradient plus noise) and a green strip along its left edge."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    arr = np.clip(x * np.array([1.0, 0.3, 0.6]) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    arr[:, : w // 8] = (0, 255, 0)
    return Image.fromarray(arr)


def test_every_family_owns_at_least_one_name_and_names_are_unique():
    names = [n for _, n in NAMES]
    assert len(names) == len(set(names))
    assert {f for f, _ in NAMES} == set(FAMILIES)


@pytest.mark.parametrize("family, name", NAMES)
def test_name_resolves_to_a_spec_of_its_family(family, name):
    spec = resolve_encoder(name)
    assert spec.family == family and spec.name == name
    assert spec.resize_mode in RESIZE_MODES and spec.image_size > 0 and spec.embed_dim > 0
    assert EncoderSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("family, name", NAMES)
def test_preprocessing_follows_the_spec_as_open_clip_does(family, name):
    spec = resolve_encoder(name)
    tf = image_transform(spec)
    for im in (_photo(160, 96), _photo(80, 150, seed=1)):
        x = tf(im)
        assert x.shape == (3, spec.image_size, spec.image_size) and x.dtype == torch.float32
        torch.testing.assert_close(x, _reference_transform(spec)(im), atol=0, rtol=0)


@pytest.mark.parametrize("family, name", NAMES)
def test_model_gives_spec_sized_features_and_its_own_head_from_one_build(family, name):
    spec = resolve_encoder(name)
    enc = build_encoder(spec)
    x = torch.stack([image_transform(spec)(_photo(120, 90, seed=s)) for s in range(2)])
    with torch.no_grad():
        feats = enc(x)
    assert feats.shape == (2, spec.embed_dim) and torch.isfinite(feats).all()
    try:
        with_head, head = build_encoder_with_head(spec)
    except NoSourceHead as e:
        assert "no classifier head" in str(e) and name in str(e)
        return
    assert head.in_features == spec.embed_dim and head.out_features > 1
    with torch.no_grad():
        torch.testing.assert_close(with_head(x), feats)          # the same features as the headless build
        assert head(feats).shape == (2, head.out_features)


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_torchvision_preprocessing_matches_open_clip_for_every_resize_mode(mode, interpolation):
    """The transform of families that do not delegate to open_clip agrees with it for each mode."""
    spec = EncoderSpec(name="t", family="test", arch="colour", embed_dim=12, image_size=48, mean=(0.4, 0.5, 0.6),
                       std=(0.2, 0.25, 0.3), interpolation=interpolation, resize_mode=mode)
    for im in (_photo(160, 96), _photo(81, 150, seed=1), _photo(40, 40, seed=2).convert("L")):
        torch.testing.assert_close(spec_transform(spec)(im), _reference_transform(spec)(im), atol=0, rtol=0)


def test_resize_modes_differ_where_they_should():
    """squash keeps the whole image (the green strip), shortest crops it off, longest pads the short side."""
    base = dict(name="t", family="test", arch="colour", embed_dim=12, image_size=48, mean=(0.0,) * 3, std=(1.0,) * 3)
    im = _photo(192, 96)                       # 2:1, green in the leftmost 24 columns
    squash, shortest, longest = (spec_transform(EncoderSpec(**base, resize_mode=m))(im)
                                 for m in ("squash", "shortest", "longest"))
    green = lambda x: bool(((x[1] > 0.9) & (x[0] < 0.1)).any())   # noqa: E731
    assert green(squash[:, :, :4]) and not green(shortest)
    assert green(longest[:, 12:36, :4])
    assert torch.equal(longest[:, :11], torch.zeros(3, 11, 48))   # padded rows above the image
    with pytest.raises(ValueError, match="resize_mode"):
        EncoderSpec(**base, resize_mode="crop")


def test_squash_model_embeds_whole_images_with_its_own_preprocessing():
    """embed_images (queries, references, originals) uses the spec's resize mode, not shortest + crop."""
    squash, shortest = resolve_encoder("test-tiny-clip-squash"), resolve_encoder("test-tiny-clip")
    assert squash.resize_mode == "squash" and shortest.resize_mode == "shortest"
    assert squash.identity() != shortest.identity()          # an index and its queries must agree on it
    model = build_encoder(squash)
    images = [_photo(160, 80, seed=s) for s in range(3)]
    got = embed_images([model], images)[0]
    with torch.no_grad():
        want = torch.nn.functional.normalize(model(torch.stack([image_transform(squash)(im) for im in images])), dim=-1)
        cropped = torch.nn.functional.normalize(model(torch.stack([image_transform(shortest)(im) for im in images])),
                                                dim=-1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, cropped.numpy(), atol=1e-3)


def test_pretrained_tag_with_squash_preprocessing_is_embedded_as_open_clip_would(tmp_path, monkeypatch):
    """A pretrained tag whose PreprocessCfg is not shortest + centre crop (SigLIP: squash, mean/std 0.5):
    the spec records it and image_transform reproduces open_clip's preprocessing for that tag."""
    import open_clip

    monkeypatch.setenv("VFM_WEIGHTS", str(tmp_path))
    (tmp_path / "ViT-B-16-SigLIP.webli.pt").write_bytes(b"resolving needs the file, not its content")
    spec = resolve_encoder("ViT-B-16-SigLIP.webli")
    assert (spec.resize_mode, spec.mean, spec.interpolation) == ("squash", (0.5, 0.5, 0.5), "bicubic")
    cfg = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(size=spec.image_size),
                                                open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli")))
    im = _photo(300, 120)
    torch.testing.assert_close(image_transform(spec)(im), image_transform_v2(cfg, is_train=False)(im), atol=0, rtol=0)


def test_timm_head_from_a_weights_file_is_read_with_the_model(tmp_path):
    """With a local weights file the source head and the features come from one build of that file."""
    import timm

    spec = resolve_encoder("test-tiny-timm")
    torch.manual_seed(5)
    net = timm.create_model(spec.arch)
    path = tmp_path / "tiny.pth"
    torch.save(net.state_dict(), path)
    spec = resolve_encoder("timm:test_efficientnet", weights=str(path), image_size=64)
    enc, head = build_encoder_with_head(spec)
    torch.testing.assert_close(head.weight, net.get_classifier().weight)
    x = torch.rand(2, 3, 64, 64)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), net.forward_head(net.forward_features(x), pre_logits=True))
        torch.testing.assert_close(enc(x), build_encoder(spec)(x))
