"""Crops materialised from their recipes on image tensors, on any device (the GPU path of indexing).

``crop_images(images, recipes)`` does what ``index.crops.materialize`` does on PIL images, with
``torchvision.transforms.v2.functional`` on uint8 [3, H, W] tensors: the box is cut and resized
(bilinear, antialiased) to the recipe's size, then the recipe's RandAugment ops are applied in order
with their stored magnitudes (nearest interpolation, no fill, as RandAugment applies them). Recipes
stay the only stored form; this module only re-derives pixels from them.

Crops of many images are batched: every crop is resized on its own (boxes differ), then the crops
that share an op at the same position of their op list (same name and magnitude) are transformed as
one batch, so a batch of 10 crops x 50 images costs one call per distinct op, not one per crop.

The tensor ops are torchvision's tensor kernels, not Pillow's: pixels agree with the PIL path
closely but not bit for bit (tests/test_device_crops.py measures and bounds the difference).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

from index.crops import CropRecipe, check_box

_NEAREST = InterpolationMode.NEAREST


def _shear(x: torch.Tensor, mag: float, axis: int) -> torch.Tensor:
    shear = [0.0, 0.0]
    shear[axis] = math.degrees(math.atan(mag))
    return F2.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=_NEAREST,
                     fill=None, center=[0, 0])


def _translate(x: torch.Tensor, mag: float, axis: int) -> torch.Tensor:
    translate = [0, 0]
    translate[axis] = int(mag)
    return F2.affine(x, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], interpolation=_NEAREST,
                     fill=None)


# RandAugment's op space (torchvision.transforms.autoaugment._apply_op), on tensors
OPS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "Identity": lambda x, m: x,
    "ShearX": lambda x, m: _shear(x, m, 0),
    "ShearY": lambda x, m: _shear(x, m, 1),
    "TranslateX": lambda x, m: _translate(x, m, 0),
    "TranslateY": lambda x, m: _translate(x, m, 1),
    "Rotate": lambda x, m: F2.rotate(x, m, interpolation=_NEAREST, fill=None),
    "Brightness": lambda x, m: F2.adjust_brightness(x, 1.0 + m),
    "Color": lambda x, m: F2.adjust_saturation(x, 1.0 + m),
    "Contrast": lambda x, m: F2.adjust_contrast(x, 1.0 + m),
    "Sharpness": lambda x, m: F2.adjust_sharpness(x, 1.0 + m),
    "Posterize": lambda x, m: F2.posterize(x, int(m)),
    "Solarize": lambda x, m: F2.solarize(x, m),
    "AutoContrast": lambda x, m: F2.autocontrast(x),
    "Equalize": lambda x, m: F2.equalize(x),
    "Invert": lambda x, m: F2.invert(x),
}


def _indices(idx: list[int], device: torch.device) -> torch.Tensor:
    """An index tensor on `device`; on CUDA copied from pinned memory, which does not wait for the
    kernels queued before it (a copy from pageable memory would)."""
    t = torch.tensor(idx, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def apply_ops(x: torch.Tensor, ops: Sequence[Sequence[tuple[str, float]]]) -> torch.Tensor:
    """uint8 [N, 3, S, S] crops, each with its own op list -> the augmented crops (a new tensor).

    Op j of every crop is applied before op j + 1 of any, as each crop's ops apply in order; crops
    sharing (name, magnitude) at position j are one batched call."""
    if len(ops) != x.shape[0]:
        raise ValueError(f"apply_ops: {x.shape[0]} crops but {len(ops)} op lists")
    x = x.clone()
    for j in range(max((len(o) for o in ops), default=0)):
        groups: dict[tuple[str, float], list[int]] = defaultdict(list)
        for i, crop_ops in enumerate(ops):
            if j < len(crop_ops):
                groups[tuple(crop_ops[j])].append(i)
        for (name, magnitude), idx in groups.items():
            if name not in OPS:
                raise ValueError(f"unknown RandAugment op {name!r}; valid ops: {', '.join(OPS)}")
            if name == "Identity":
                continue
            sel = _indices(idx, x.device)
            x.index_copy_(0, sel, OPS[name](x.index_select(0, sel), magnitude))
    return x


def cut(image: torch.Tensor, recipe: CropRecipe) -> torch.Tensor:
    """uint8 [3, H, W] -> the recipe's box resized to [3, size, size] (no ops)."""
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 [3, H, W] RGB tensor, got {image.dtype} {tuple(image.shape)}")
    check_box(recipe.box, (int(image.shape[2]), int(image.shape[1])))
    top, left, h, w = recipe.box
    return F2.resized_crop(image, top, left, h, w, [recipe.size, recipe.size],
                           interpolation=InterpolationMode.BILINEAR, antialias=True)


def crop_images(images: Sequence[torch.Tensor], recipes: Sequence[Sequence[CropRecipe]]) -> torch.Tensor:
    """uint8 [N, 3, S, S]: every recipe of every image, in order (image 0's crops first), on the
    images' device. All recipes must share one size."""
    if len(images) != len(recipes):
        raise ValueError(f"crop_images: {len(images)} images but {len(recipes)} recipe lists")
    flat = [(im, r) for im, rs in zip(images, recipes) for r in rs]
    if not flat:
        raise ValueError("crop_images: no recipes")
    sizes = {r.size for _, r in flat}
    if len(sizes) > 1:
        raise ValueError(f"crop_images: recipes of one batch must share a size, got {sorted(sizes)}")
    x = torch.stack([cut(im, r) for im, r in flat])
    return apply_ops(x, [r.ops for _, r in flat])
