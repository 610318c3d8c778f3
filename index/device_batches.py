"""The embedding stage's batches when crops are cut on the device: images in, crops out.

On the CPU path a batch is already pixels (``index.embed``: decode, ``crops.materialize``, stack). Here
the CPU side only reads the shard and keeps JPEG bytes (``image_batches``, with
``index.device_decode.defer_jpeg``); the device side decodes them in one call and cuts every crop of
every image from its recipe (``materialize_batch``). The rows are the same as the CPU path's: recipes
depend on the image id and size only, and an image the device cannot decode is decoded on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from index import store
from index.crops import CropConfig, recipes_for
from index.device_crops import crop_images
from index.device_decode import decode_on, defer_jpeg
from index.gallery import GalleryImage, ShardRef, iter_images
from index.skips import SkipCounts

@dataclass
class ImageBatch:
    """Gallery images whose `image` is an EncodedJpeg or a decoded PIL image, in shard order."""
    images: list[GalleryImage]


def images_per_batch(batch_size: int, crops_per_image: int) -> int:
    """Whole images per batch so that a batch holds about `batch_size` crops (at least one image)."""
    return max(1, batch_size // crops_per_image)


def image_batches(shard: ShardRef, crops: CropConfig, counts: SkipCounts, batch_size: int,
                  on_digest: Callable[[str], None] | None = None) -> Iterator[ImageBatch]:
    """The CPU half: read the shard, keep JPEG bytes, group whole images; `on_digest` as `iter_images`'s."""
    n = images_per_batch(batch_size, crops.crops_per_image)
    batch: list[GalleryImage] = []
    for img in iter_images(shard, counts, decode=defer_jpeg, on_digest=on_digest):
        batch.append(img)
        if len(batch) == n:
            yield ImageBatch(batch)
            batch = []
    if batch:
        yield ImageBatch(batch)


def materialize_batch(batch: ImageBatch, crops: CropConfig, seed: int, device: str | torch.device,
                      counts: SkipCounts) -> tuple[list[store.Row], torch.Tensor | None]:
    """The device half: (rows, uint8 [N, 3, S, S] crops on `device`), None where no image decoded.
    Images that fail to decode are added to `counts` under the CPU decoder's reason."""
    images, recipes, rows = [], [], []
    for img, (pixels, reason) in zip(batch.images, decode_on([g.image for g in batch.images], device)):
        if pixels is None:
            counts.add(reason or "corrupt")
            continue
        rs = recipes_for(img.id, (int(pixels.shape[2]), int(pixels.shape[1])), seed, crops)
        images.append(pixels)
        recipes.append(rs)
        rows.extend(store.Row(img.id, i, r.to_dict(), img.loc, img.hash) for i, r in enumerate(rs))
    return rows, (crop_images(images, recipes) if images else None)
