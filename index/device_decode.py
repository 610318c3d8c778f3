"""JPEG decode on the device, batched, with the CPU decoder as the fallback (same skip reasons).

Reading a shard with ``iter_images(shard, counts, decode=defer_jpeg)`` keeps the bytes of every
plain JPEG (baseline or progressive, RGB or greyscale, no EXIF rotation, ending in its EOI marker,
within the size limits read from its header) as an ``EncodedJpeg`` instead of decoding it; every
other member (an EXIF-rotated JPEG included, so that it is oriented as the CPU loader orients it) goes
through ``index.core.images.decode_image`` at once, so PNG, WebP, CMYK JPEGs, truncated data and the
size limits are judged exactly as on the CPU path. ``decode_on(items, device)`` then decodes a
batch with ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA); an image the device decoder refuses, or
decodes to a size other than its header's, is decoded on the CPU instead, and counted under the CPU
decoder's skip reason if that fails too.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from index.core.images import DEFAULT_MAX_PIXELS, decode_image, orientation

_SOI = b"\xff\xd8\xff"
_EOI = b"\xff\xd9"


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG member kept as bytes for a batched device decode; `size` = (width, height) as PIL's."""
    data: bytes
    size: tuple[int, int]


def defer_jpeg(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_side: int = 0) -> tuple[EncodedJpeg | Image.Image | None, str | None]:
    """A decoder for ``iter_images``: (EncodedJpeg, None) for a JPEG the device can take, else what
    ``decode_image`` returns for the bytes."""
    if data[:3] == _SOI and data.rstrip(b"\x00")[-2:] == _EOI:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as im:  # reads the header only
                    fmt, mode, (w, h), turned = im.format, im.mode, im.size, orientation(im) != 1
        except Exception:  # noqa: BLE001 - judged by the CPU decoder below
            fmt = None
        if fmt == "JPEG" and mode in ("RGB", "L") and not turned and w * h <= max_pixels and min(w, h) >= min_side:
            return EncodedJpeg(data, (w, h)), None
    return decode_image(data, max_pixels=max_pixels, min_side=min_side)


def pil_to_tensor(image: Image.Image, device: str | torch.device) -> torch.Tensor:
    """RGB PIL image (as the image loader gives it) -> uint8 [3, H, W] on `device`."""
    arr = np.asarray(image)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().to(device)


def _device_decode(items: list[EncodedJpeg], device: str | torch.device) -> list[torch.Tensor | None]:
    data = [torch.frombuffer(bytearray(it.data), dtype=torch.uint8) for it in items]
    with warnings.catch_warnings():
        # torchvision >= 0.29 announces that torchcodec supersedes its image decoders (nvJPEG included)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        return _decode_jpegs(data, device)


def _decode_jpegs(data: list[torch.Tensor], device: str | torch.device) -> list[torch.Tensor | None]:
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad image fails the batch: decode one by one
        out: list[torch.Tensor | None] = []
        for d in data:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def decode_on(items: list[Any], device: str | torch.device) -> list[tuple[torch.Tensor | None, str | None]]:
    """(uint8 [3, H, W] tensor on `device`, None) or (None, skip reason) per item; items are
    EncodedJpegs or already decoded PIL images (those are only moved to the device)."""
    jpegs = [i for i, it in enumerate(items) if isinstance(it, EncodedJpeg)]
    decoded = dict(zip(jpegs, _device_decode([items[i] for i in jpegs], device))) if jpegs else {}
    out: list[tuple[torch.Tensor | None, str | None]] = []
    for i, it in enumerate(items):
        if not isinstance(it, EncodedJpeg):
            out.append((pil_to_tensor(it, device), None))
            continue
        t = decoded[i]
        if t is not None and tuple(t.shape) == (3, it.size[1], it.size[0]):
            out.append((t, None))
            continue
        image, reason = decode_image(it.data)
        out.append((None, reason or "corrupt") if image is None else (pil_to_tensor(image, device), None))
    return out
