"""Parameter-free test encoders for the synthetic data: test-colour (label signal), test-noise (none)."""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from index.encoder_family import FAMILIES, Built, Encoder, EncoderFamily
from index.encoder_spec import EncoderSpec


class _QuarterColours(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 2).flatten(1)


class _PixelHashNoise(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = []
        for img in x.detach().float().cpu():
            seed = int(hashlib.sha256((img * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()[:15], 16)
            rows.append(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(rows).to(x.device)


# name: (arch, dim). test-colour: mean colour of each quarter of the image (12-d); on the synthetic data,
# whose classes are colours, it carries the label signal (the informative member of a synthetic zoo).
# test-noise: 16-d features drawn from a generator seeded by a hash of the pixels, a deterministic
# function of the image that holds no information about its class (the uninformative member).
MODELS = {"test-colour": ("colour", 12), "test-noise": ("noise", 16)}


class SyntheticFamily(EncoderFamily):
    name = "test"
    fixed_names = tuple(MODELS)

    def resolve(self, name: str, weights: str | None) -> EncoderSpec:
        arch, dim = MODELS[name]
        return EncoderSpec(name=name, family=self.name, arch=arch, embed_dim=dim, image_size=32,
                           mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def build(self, spec: EncoderSpec, with_head: bool = False) -> Built:
        if with_head:
            raise self.no_head(spec)
        return Built(Encoder(spec, _QuarterColours() if spec.arch == "colour" else _PixelHashNoise(spec.embed_dim)))


FAMILIES.register(SyntheticFamily.name, SyntheticFamily())
