"""EncoderFamily: one registry entry per family of encoders (FAMILIES), and the Encoder module.

A family knows, for the names it owns, how to
    resolve(name, weights) -> EncoderSpec      name (+ local weights) to a frozen spec; no model built
    build(spec, with_head) -> Built            the model, reading its weights once; with_head=True also
                                               returns its own pretrained classifier (or refuses)
    transform(spec) -> callable                PIL image -> normalised [3, S, S] tensor, from the spec
                                               (resize mode, interpolation, crop), as at training time

Families register in index/encoder_families/; index/encoders.py is the public face that
dispatches a name to its family (fixed names first, then each family's name pattern).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from index.core.errors import ConfigError
from index.core.images import to_rgb
from index.core.registry import Registry
from index.encoder_spec import EncoderSpec

Transform = Callable[[Image.Image], torch.Tensor]


class Encoder(nn.Module):
    """model(x) -> features [B, embed_dim]; x is normalised with spec.mean/std at spec.image_size."""

    def __init__(self, spec: EncoderSpec, image_fn: nn.Module, text_model: Any = None, tokenizer: Any = None):
        super().__init__()
        self.spec = spec
        self.image_fn = image_fn
        self.text_model = text_model
        self.tokenizer = tokenizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_fn(x)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if self.text_model is None:
            raise ConfigError(f"encoder {self.spec.name} has no text tower; text queries need a CLIP encoder")
        device = next(self.text_model.parameters()).device
        return self.text_model.encode_text(self.tokenizer(texts).to(device))


@dataclass
class Built:
    """What a family builds from a spec: the encoder, and its own classifier when asked for."""
    encoder: Encoder
    head: nn.Linear | None = None


class NoSourceHead(ConfigError):
    pass


def _resize_longest(size: int, interpolation: Any) -> Transform:
    """Scale so the longer side is `size` (aspect ratio kept), as open_clip's ResizeKeepRatio(longest=1)."""
    def resize(im: Image.Image) -> Image.Image:
        w, h = im.size
        ratio = max(w, h) / size
        return TF.resize(im, [round(h / ratio), round(w / ratio)], interpolation=interpolation)
    return resize


def spec_transform(spec: EncoderSpec) -> Transform:
    """The spec's preprocessing with torchvision: resize by spec.resize_mode, crop (or pad) to a square."""
    interp = T.InterpolationMode(spec.interpolation)
    size = spec.image_size
    geometry = {
        "shortest": [T.Resize(size, interpolation=interp), T.CenterCrop(size)],
        "longest": [T.Lambda(_resize_longest(size, interp)), T.CenterCrop(size)],   # CenterCrop pads with 0
        "squash": [T.Resize((size, size), interpolation=interp)],
    }[spec.resize_mode]
    return T.Compose([T.Lambda(to_rgb), *geometry, T.ToTensor(),
                      T.Normalize(spec.mean, spec.std)])


class EncoderFamily:
    """Base of a registered family; `fixed_names` are the names it owns outright (tested one by one)."""
    name: str = ""
    fixed_names: tuple[str, ...] = ()
    pattern_hint: str = ""          # how its open-ended names are written, for error messages

    def claims(self, name: str) -> bool:
        """Whether an open-ended name (not one of the fixed names of any family) is this family's."""
        return False

    def suggestions(self) -> list[str]:
        """Valid open-ended names offered as the closest match to an unknown name."""
        return []

    def resolve(self, name: str, weights: str | None) -> EncoderSpec:
        raise NotImplementedError

    def build(self, spec: EncoderSpec, with_head: bool = False) -> Built:
        raise NotImplementedError

    def transform(self, spec: EncoderSpec) -> Transform:
        return spec_transform(spec)

    def no_head(self, spec: EncoderSpec) -> NoSourceHead:
        return NoSourceHead(f"encoder {spec.name} ({spec.family}) has no classifier head of its own; "
                            "use teacher_head='probe' (a linear probe on the target labels)")


FAMILIES: Registry[EncoderFamily] = Registry("encoder family")


def checked_head(spec: EncoderSpec, head: nn.Module) -> nn.Linear:
    """A family's own classifier, if it maps the spec's pooled features."""
    if not isinstance(head, nn.Linear) or head.in_features != spec.embed_dim:
        raise NoSourceHead(f"encoder {spec.name}: its classifier {type(head).__name__} does not map the "
                           f"{spec.embed_dim}-d pooled features")
    return head.eval()
