"""timm models as encoders (`timm:NAME`, pooled features), and test-tiny-timm (a tiny random-init one).

Random-init models are built under a fixed seed, so they are the same everywhere; a local weights
file (weights=PATH) is loaded by timm itself (pretrained_cfg_overlay), never downloaded.
"""
from __future__ import annotations

import difflib

import torch

from index.core.atomic import file_digest
from index.core.errors import ConfigError
from index.encoder_family import FAMILIES, Built, Encoder, EncoderFamily, checked_head
from index.encoder_spec import EncoderSpec, existing_file

PREFIX = "timm:"
TINY = {"test-tiny-timm": ("test_efficientnet", 64)}   # name: (timm model, image size)


def _timm():
    import timm  # lazy: timm

    return timm


def _create(spec: EncoderSpec, **kwargs):
    timm = _timm()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        weights = dict(pretrained=True, pretrained_cfg_overlay=dict(file=spec.weights)) if spec.weights else {}
        return timm.create_model(spec.arch, **weights, **kwargs)


class TimmFamily(EncoderFamily):
    name = "timm"
    fixed_names = tuple(TINY)
    pattern_hint = "timm:<model name>"

    def claims(self, name: str) -> bool:
        return name.startswith(PREFIX)

    def resolve(self, name: str, weights: str | None) -> EncoderSpec:
        timm = _timm()
        model_name, size = TINY[name] if name in TINY else (name[len(PREFIX):], None)
        base = model_name.split(".")[0]
        if base not in timm.list_models():
            close = difflib.get_close_matches(base, timm.list_models(), n=3)
            raise ConfigError(f"unknown timm model {model_name!r}; closest: {close}. See timm.list_models().")
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
        cfg = timm.data.resolve_data_config({}, model=model)
        path = existing_file(weights) if weights else None
        return EncoderSpec(name=name if name in TINY else f"{PREFIX}{model_name}", family=self.name,
                           arch=model_name, embed_dim=int(model.num_features),
                           image_size=size or int(cfg["input_size"][-1]), mean=tuple(cfg["mean"]),
                           std=tuple(cfg["std"]), interpolation=cfg.get("interpolation", "bicubic"),
                           pretrained="file" if path else None, weights=path,
                           weights_digest=file_digest(path) if path else None)

    def build(self, spec: EncoderSpec, with_head: bool = False) -> Built:
        if not with_head:
            return Built(Encoder(spec, _create(spec, num_classes=0)))
        if spec.weights is None:
            # random init: the features are those of the headless build (the same under the fixed seed),
            # the head that of the full model; there is no weights file to read twice
            return Built(Encoder(spec, _create(spec, num_classes=0)), checked_head(spec, _create(spec).get_classifier()))
        net = _create(spec)            # the weights file is read once, classifier included
        head = checked_head(spec, net.get_classifier())
        net.reset_classifier(0)        # the encoder gives the pooled features
        return Built(Encoder(spec, net), head)


FAMILIES.register(TimmFamily.name, TimmFamily())
