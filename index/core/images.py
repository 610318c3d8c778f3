"""The one image loader: bytes, a file or a PIL image -> the 8-bit RGB image every stage sees.

Every path that turns stored bytes into pixels goes through here (gallery tars and folders, range
reads, the device decoder's CPU fallback, query sets, decontamination references, calibration,
verification, thumbnails, the shard writer, distillation's data), so a target image and its copy in
a gallery made by img2dataset look the same to every stage:

    orientation   EXIF orientation applied (phone photos are stored sideways)
    transparency  RGBA, LA, PA, RGBa/La and palette or grey/RGB images with a transparency entry are
                  composited onto white the way img2dataset does when it re-encodes
                  (``alpha / 255 * colour + 255 - alpha``, rounded), so both give the same pixels
    colour        CMYK / YCCK JPEGs, palette, 1-bit and YCbCr/LAB images converted by PIL
    bit depth     16-bit grey (``I;16*``) scaled by 1/257; 32-bit ``I`` and ``F`` scaled by the
                  smallest nominal range holding every value ([0, 1] for F, [0, 255], [0, 65535]),
                  else stretched from min to max; NaN and infinities become 0. PIL's own
                  ``convert("RGB")`` clips these at 255. 16-bit RGB(A) and grey+alpha PNGs are read
                  by PIL as 8 bits a channel already.
    animation     the first frame of an animated GIF, WebP or PNG

``decode_image`` never raises for bad bytes: it returns a skip reason (``index.skips.SKIP_REASONS``
names them) instead. ``load_image_file`` raises ``InputError`` naming the file.
"""
from __future__ import annotations

import io
import warnings
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from index.core.errors import InputError

# The loader's version: part of every embedding shard's fingerprint and recorded in the index
# manifest ("image_loader"), so an index whose pixels came from another loader is rebuilt, never
# reused. 1 (no manifest field): alpha dropped, EXIF orientation ignored; 2: this module.
LOADER_VERSION = 2

# PIL's own decompression-bomb threshold (about 89.5 Mpx). PIL refuses images above twice this at
# open time whatever max_pixels says; those are counted as too_large too.
DEFAULT_MAX_PIXELS: int = int(Image.MAX_IMAGE_PIXELS or 89_478_485)

SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
WIDE = frozenset({"I", "F"})
_WITH_ALPHA = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
_ORIENTATION = 0x0112  # the EXIF tag


def _scaled(values: np.ndarray, is_float: bool) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(a)
    a = np.where(finite, a, 0.0)
    lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 0.0)
    if lo >= 0 and hi <= 1 and is_float:
        out = a * 255
    elif lo >= 0 and hi <= 255:
        out = a
    elif lo >= 0 and hi <= 65535:
        out = a / 257
    else:
        out = (a - lo) * (255 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def has_alpha(im: Image.Image) -> bool:
    """True when the image carries transparency: an alpha band or a transparency entry."""
    return im.mode in _WITH_ALPHA or "transparency" in im.info


def orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8; 1 when absent or unreadable)."""
    try:
        value = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no orientation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 4] -> uint8 [H, W, 3] composited onto white, as img2dataset rounds it."""
    alpha = rgba[..., 3:4].astype(np.float64)
    out = alpha / 255 * rgba[..., :3] + 255 - alpha
    return np.rint(out.clip(0, 255)).astype(np.uint8)


def to_rgb(im: Image.Image, *, orient: bool = True, alpha: str = "white") -> Image.Image:
    """An RGB image, 8 bits a channel, oriented and flattened (see the module docstring).
    ``orient=False`` and ``alpha="drop"`` give other producers' renderings (`RENDERINGS`)."""
    if orient and orientation(im) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in SIXTEEN_BIT:
        a = np.asarray(im).astype(np.uint32)
        return Image.fromarray(((a + 128) // 257).astype(np.uint8), "L").convert("RGB")
    if im.mode in WIDE:
        return Image.fromarray(_scaled(np.asarray(im), im.mode == "F"), "L").convert("RGB")
    if has_alpha(im):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL's note on palette transparency
            rgba = np.asarray(im.convert("RGBA"))
        # "drop": the colour under the alpha, as convert("RGB") leaves it
        return Image.fromarray(np.ascontiguousarray(rgba[..., :3]) if alpha == "drop" else on_white(rgba), "RGB")
    return im.convert("RGB")


def _decode_error_reason(e: Exception) -> str:
    if isinstance(e, EOFError) or "truncated" in str(e).lower():
        return "truncated"
    return "corrupt"


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 0,
                 **rendering: Any) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None) or (None, skip reason). Never raises for bad bytes. The size limits apply to
    the image as stored (before orientation). `rendering`: `to_rgb`'s options (`RENDERINGS`)."""
    if not data:
        return None, "empty"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            return None, "too_large"
        except UnidentifiedImageError:
            return None, "corrupt" if data.startswith(_IMAGE_MAGIC) or data[8:12] == b"WEBP" else "not_image"
        except Exception as e:  # noqa: BLE001 - any decoder error is a counted skip
            return None, _decode_error_reason(e)
        w, h = im.size
        if w * h > max_pixels:
            return None, "too_large"
        if min(w, h) < min_side:
            return None, "too_small"
        try:
            im.load()
            return to_rgb(im, **rendering), None
        except Image.DecompressionBombError:
            return None, "too_large"
        except Exception as e:  # noqa: BLE001
            return None, _decode_error_reason(e)


def load_image_file(path: str) -> Image.Image:
    """The file's image as `decode_image` gives it; a file that is not a readable image raises
    InputError naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{path}: not readable ({type(e).__name__}: {e}); fix or remove it") from None
    image, reason = decode_image(data)
    if image is None:
        raise InputError(f"{path}: not a readable image ({reason}); fix or remove it")
    return image


# How other producers render the same stored image, where it differs from `to_rgb`'s: img2dataset
# decodes with OpenCV, which ignores EXIF orientation, and re-encodes without it ("as-stored"); a
# producer that calls PIL's convert("RGB") drops the alpha band and shows the colour under it
# ("alpha-dropped", black for most transparent PNGs); img2dataset's center_crop mode keeps the centre
# square only ("centre-square") and its border mode pads to a square with white ("white-square"), both
# for images whose shorter side is under 85% of the longer. Decontamination holds these as references.
RENDERINGS = {"as-stored": {"orient": False}, "alpha-dropped": {"alpha": "drop"}, "centre-square": {},
              "white-square": {}}
_SQUARE_ENOUGH = 0.85


def renderings(data: bytes) -> tuple[str, ...]:
    """The names of `RENDERINGS` whose pixels differ from the loader's for these bytes (from the
    header only); () for bytes that do not open."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                turned, alpha = orientation(im) != 1, has_alpha(im) and im.mode not in SIXTEEN_BIT | WIDE
                long = oblong(im.size)
    except Exception:  # noqa: BLE001 - judged when the image itself is loaded
        return ()
    return tuple(name for name, on in (("as-stored", turned), ("alpha-dropped", alpha),
                                       ("centre-square", long), ("white-square", long)) if on)


def oblong(size: tuple[int, int]) -> bool:
    """Whether an image of this (width, height) is far enough from square that img2dataset's
    center_crop and border modes change its frame beyond the synthetic copies' crops and pads."""
    return min(size) < _SQUARE_ENOUGH * max(size)


def render(data: bytes, rendering: str) -> Image.Image:
    """The image of `data` as the named producer renders it (`RENDERINGS`); InputError if it does not
    decode."""
    if rendering not in RENDERINGS:
        raise ValueError(f"unknown rendering {rendering!r}; valid: {', '.join(RENDERINGS)}")
    out = load_image_bytes(data, "image", **RENDERINGS[rendering])
    w, h = out.size
    if rendering == "centre-square":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        out = out.crop((left, top, left + side, top + side))
    elif rendering == "white-square":   # centred as albumentations' PadIfNeeded places it
        side = max(w, h)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(out, ((side - w) // 2, (side - h) // 2))
        out = square
    return out


def load_image_bytes(data: bytes, what: str = "image", **rendering: Any) -> Image.Image:
    """Stored bytes known to hold an image (a written shard's member, a verified original) -> RGB;
    bytes that do not decode raise InputError naming `what`."""
    image, reason = decode_image(data, **rendering)
    if image is None:
        raise InputError(f"{what}: not a readable image ({reason})")
    return image


# (bytes, max_pixels=, min_side=) -> (image, None) | (None, skip reason)
Decoder = Callable[..., "tuple[object, str | None]"]
