"""Crop recipes: a crop is a pure function of (image id, crop index, seed), so it is stored as a recipe.

``make_recipe`` draws the box exactly as torchvision's ``RandomResizedCrop.get_params`` does (ten
attempts, then a centre fallback) and the ops exactly as ``RandAugment.forward`` does (same op
space, same signed magnitudes), but from a numpy RNG seeded by sha256 of (image id, crop index,
seed), so it is independent of process, platform and Python's hash randomisation.
``materialize`` turns a recipe back into pixels with torchvision's own ``resized_crop`` and
RandAugment op implementation (``autoaugment._apply_op``), so a crop re-materialised later from
its JSON recipe is byte-identical to the one embedded (same torchvision and Pillow versions).

With ``keep_full_image`` crop 0 is the whole image, centre-cropped to a square and resized, with no
ops: the view a query image gets at search time, used to compare original images.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from torchvision.transforms import InterpolationMode, RandAugment, functional as TF
from torchvision.transforms.autoaugment import _apply_op

from index.core import contract
from index.core.errors import ConfigError
from index.core.images import to_rgb

Box = tuple[int, int, int, int]  # (top, left, height, width) in source pixels


@dataclass(frozen=True)
class CropConfig:
    crops_per_image: int = field(default=10, metadata={"help": "random-resized crops per gallery image"})
    size: int = field(default=224, metadata={"help": "crop side in pixels"})
    scale: tuple[float, float] = field(default=(0.08, 1.0), metadata={
        "help": "RandomResizedCrop area range (min, max), as a fraction of the image"})
    ratio: tuple[float, float] = field(default=(3 / 4, 4 / 3), metadata={
        "help": "RandomResizedCrop aspect-ratio range (min, max)"})
    randaugment: bool = field(default=True, metadata={"help": "apply RandAugment ops to every crop"})
    num_ops: int = field(default=2, metadata={"help": "RandAugment ops per crop"})
    magnitude: int = field(default=9, metadata={"help": "RandAugment magnitude, below num_magnitude_bins"})
    num_magnitude_bins: int = field(default=31, metadata={"help": "RandAugment magnitude bins"})
    keep_full_image: bool = field(default=False, metadata={
        "help": "crop 0 is the whole image (centre square, no ops), as queries are seen"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(x) for x in self.scale))
        object.__setattr__(self, "ratio", tuple(float(x) for x in self.ratio))
        problems = []
        if self.crops_per_image < 1:
            problems.append(f"crops_per_image must be >= 1, got {self.crops_per_image}")
        if self.size < 1:
            problems.append(f"size must be >= 1, got {self.size}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            problems.append(f"scale must be (min, max) with 0 < min <= max, got {self.scale}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            problems.append(f"ratio must be (min, max) with 0 < min <= max, got {self.ratio}")
        if self.num_ops < 0:
            problems.append(f"num_ops must be >= 0, got {self.num_ops}")
        if self.num_magnitude_bins < 2:
            problems.append(f"num_magnitude_bins must be >= 2, got {self.num_magnitude_bins}")
        elif not 0 <= self.magnitude < self.num_magnitude_bins:
            problems.append(f"magnitude must be in [0, {self.num_magnitude_bins - 1}], got {self.magnitude}")
        if problems:
            raise ConfigError("invalid CropConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d


@dataclass(frozen=True)
class CropRecipe:
    box: Box
    size: int
    full: bool = False
    ops: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The written form (index.core.contract.recipe_json): ops as {"op", "magnitude"} objects."""
        return contract.recipe_json({"box": self.box, "size": self.size, "full": self.full, "ops": self.ops})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CropRecipe":
        """Either written form: ops as objects, or the [name, magnitude] pairs of older indexes and sets.
        A lone NO_OP reads back as no ops (the same transform), so an op-less recipe round-trips."""
        d = contract.recipe_json(d)
        valid = op_names()
        ops = () if d["ops"] == [contract.NO_OP] else tuple((op["op"], op["magnitude"]) for op in d["ops"])
        for name, _ in ops:
            if name not in valid:
                raise ConfigError(f"unknown RandAugment op {name!r}; valid ops: {', '.join(valid)}")
        return cls(box=tuple(d["box"]), size=d["size"], full=d["full"], ops=ops)  # type: ignore[arg-type]


# ---------------------------------------------------------------- sampling


def crop_rng(image_id: str, crop_index: int, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{image_id}\x00{crop_index}\x00{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def sample_box(rng: np.random.Generator, width: int, height: int,
               scale: tuple[float, float], ratio: tuple[float, float]) -> Box:
    """torchvision RandomResizedCrop.get_params with a numpy RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)  # fallback: central crop
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@functools.lru_cache(maxsize=64)
def _op_space(num_bins: int, size: int) -> tuple[tuple[str, tuple[float, ...] | None, bool], ...]:
    """torchvision's RandAugment op table for a size x size image: (name, magnitudes or None, signed)."""
    space = RandAugment(num_magnitude_bins=num_bins)._augmentation_space(num_bins, (size, size))
    out = []
    for name, (mags, signed) in space.items():
        out.append((name, tuple(float(m) for m in mags.tolist()) if mags.ndim > 0 else None, bool(signed)))
    return tuple(out)


def op_names() -> list[str]:
    return [name for name, _, _ in _op_space(31, 224)]


def sample_ops(rng: np.random.Generator, cfg: CropConfig) -> tuple[tuple[str, float], ...]:
    """RandAugment.forward's op draw with a numpy RNG; magnitudes for a cfg.size x cfg.size crop."""
    space = _op_space(cfg.num_magnitude_bins, cfg.size)
    ops = []
    for _ in range(cfg.num_ops):
        name, mags, signed = space[int(rng.integers(len(space)))]
        magnitude = mags[cfg.magnitude] if mags is not None else 0.0
        if signed and rng.integers(2):
            magnitude *= -1.0
        ops.append((name, magnitude))
    return tuple(ops)


def full_box(width: int, height: int) -> Box:
    """Centre square of side min(w, h), offsets rounded as torchvision's center_crop does."""
    s = min(width, height)
    return int(round((height - s) / 2.0)), int(round((width - s) / 2.0)), s, s


def make_recipe(image_id: str, crop_index: int, seed: int, image_size: tuple[int, int],
                cfg: CropConfig = CropConfig()) -> CropRecipe:
    """The recipe of crop `crop_index` of an image of `image_size` = (width, height)."""
    width, height = image_size
    if width < 1 or height < 1:
        raise ValueError(f"image_size must be positive (width, height), got {image_size}")
    if not 0 <= crop_index < cfg.crops_per_image:
        raise ValueError(f"crop_index must be in [0, {cfg.crops_per_image - 1}], got {crop_index}")
    if cfg.keep_full_image and crop_index == 0:
        return CropRecipe(box=full_box(width, height), size=cfg.size, full=True, ops=())
    rng = crop_rng(image_id, crop_index, seed)
    box = sample_box(rng, width, height, cfg.scale, cfg.ratio)
    ops = sample_ops(rng, cfg) if cfg.randaugment else ()
    return CropRecipe(box=box, size=cfg.size, full=False, ops=ops)


def recipes_for(image_id: str, image_size: tuple[int, int], seed: int,
                cfg: CropConfig = CropConfig()) -> list[CropRecipe]:
    return [make_recipe(image_id, c, seed, image_size, cfg) for c in range(cfg.crops_per_image)]


# ---------------------------------------------------------------- pixels


def check_box(box: Box, image_size: tuple[int, int]) -> None:
    """Raise unless `box` lies inside an image of `image_size` = (width, height)."""
    top, left, h, w = box
    width, height = image_size
    if top < 0 or left < 0 or h < 1 or w < 1 or top + h > height or left + w > width:
        raise ValueError(f"crop box (top, left, height, width) = {tuple(box)} does not fit an image of "
                         f"size {tuple(image_size)} (width, height): was the recipe made for another image?")


def materialize(image: Image.Image, recipe: CropRecipe) -> Image.Image:
    """RGB size x size crop: bilinear antialiased resized_crop, then the ops as RandAugment applies them."""
    img = to_rgb(image)
    check_box(recipe.box, img.size)
    top, left, h, w = recipe.box
    out = TF.resized_crop(img, top, left, h, w, [recipe.size, recipe.size],
                          interpolation=InterpolationMode.BILINEAR, antialias=True)
    for name, magnitude in recipe.ops:
        out = _apply_op(out, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
    return out
