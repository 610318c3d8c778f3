"""One picture in every stored form, through every reader: the same pixels everywhere.

The forms are those users have (transparent PNGs, palette transparency, grey + alpha, CMYK JPEGs, a
phone photo stored sideways with an EXIF orientation, 16-bit PNGs, WebP, an animated WebP). Each form's expected
pixels are computed here without the loader (alpha composited onto white with img2dataset's own
formula, the sideways picture as it is displayed), and every path that turns bytes into pixels must
give them: the loader itself, gallery tars and folders, range reads, the device decoder (on the CPU
here), folder query sets (queries and decontamination references), calibration copies, report
thumbnails, the shard writer, distillation's decoder and tensors, the encoders' transform and the
crop materialiser. Lossless forms must match exactly; JPEG forms within JPEG tolerance.
"""
from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from curation.copies import make_copy
from curation.querysets import build_folder
from curation.report_data import thumbnail
from curation.shards import jpeg_bytes
from distill.data import _decode as distill_decode, to_tensor
from index.core.images import decode_image, load_image_file, orientation
from index.crops import CropConfig, make_recipe, materialize
from index.device_decode import decode_on, defer_jpeg
from index.encoders import image_transform, resolve_encoder
from index.gallery import iter_images, list_shards
from index.ranged import read_located
from index.skips import SkipCounts

W, H = 48, 32
_COLOURS = np.array([[200, 30, 40], [20, 160, 60], [40, 60, 210], [240, 200, 20]], np.uint8)


def _picture() -> tuple[np.ndarray, np.ndarray]:
    """A non-symmetric picture of few colours (so a palette holds it exactly) and its alpha: opaque
    blocks, a transparent border, one half-transparent band."""
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = _COLOURS[((xx // 8) + 2 * (yy // 8) + (xx > 30)) % 4]
    alpha = np.full((H, W), 255, np.uint8)
    alpha[:4, :] = 0
    alpha[:, :5] = 0
    alpha[20:24, 10:40] = 128
    return rgb, alpha


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """img2dataset's compositing (resizer.py), written out here as the reference."""
    a = alpha[..., None].astype(np.float64)
    return np.rint((a / 255 * rgb + 255 - a).clip(0, 255)).astype(np.uint8)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _forms() -> dict[str, tuple[str, bytes, np.ndarray, float]]:
    """form -> (file extension, stored bytes, expected RGB pixels, tolerance in mean grey levels)."""
    rgb, alpha = _picture()
    binary = np.where(alpha > 0, 255, 0).astype(np.uint8)  # palettes hold on/off transparency only
    full = _on_white(rgb, alpha)
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    forms: dict[str, tuple[str, bytes, np.ndarray, float]] = {}

    forms["rgba_png"] = ("png", _save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"), full, 0)
    pal = Image.fromarray(rgb).quantize(colors=5, method=Image.Quantize.MEDIANCUT)
    p = np.asarray(pal).copy()
    p[binary == 0] = 4                                   # index 4 is the transparent entry
    palette = pal.getpalette()[:12] + [0, 0, 0]
    pim = Image.fromarray(p, "P")
    pim.putpalette(palette)
    pal_expected = np.where(binary[..., None] == 0, 255, np.asarray(pim.convert("RGB"))).astype(np.uint8)
    forms["palette_trns_png"] = ("png", _save(pim, "PNG", transparency=4), pal_expected, 0)
    forms["la_png"] = ("png", _save(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG"),
                       np.repeat(_on_white(grey[..., None], alpha), 3, axis=2), 0)
    cmyk = Image.fromarray(full).convert("CMYK")
    forms["cmyk_jpeg"] = ("jpg", _save(cmyk, "JPEG", quality=95), np.asarray(cmyk.convert("RGB")), 4)
    # a phone photo: pixels stored sideways, displayed upright through EXIF orientation 6 (rotate 90 CW)
    stored = Image.fromarray(full).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    forms["exif_rotated_jpeg"] = ("jpg", _save(stored, "JPEG", quality=95, subsampling=0, exif=exif), full, 4)
    g16 = grey.astype(np.uint16) * 257
    forms["grey16_png"] = ("png", _save(Image.frombytes("I;16B", (W, H), g16.astype(">u2").tobytes()), "PNG"),
                           np.repeat(grey[..., None], 3, axis=2), 0)
    forms["webp_alpha"] = ("webp", _save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "WEBP", lossless=True),
                           full, 0)
    first = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    second = Image.fromarray(np.dstack([255 - rgb, alpha]), "RGBA")
    forms["animated_webp"] = ("webp", _save(first, "WEBP", lossless=True, save_all=True, append_images=[second],
                                            duration=100), full, 0)    # the first frame
    return forms


FORMS = _forms()


def _close(got: Image.Image | np.ndarray, expected: np.ndarray, tol: float, what: str) -> None:
    a = np.asarray(got)
    assert a.shape == expected.shape, f"{what}: shape {a.shape} != {expected.shape}"
    diff = np.abs(a.astype(np.int16) - expected.astype(np.int16))
    if tol == 0:
        assert diff.max() == 0, f"{what}: max difference {diff.max()}"
    else:
        assert diff.mean() <= tol, f"{what}: mean difference {diff.mean():.2f} > {tol}"


def test_the_forms_are_what_they_claim():
    modes = {name: Image.open(io.BytesIO(data)).mode for name, (_, data, _, _) in FORMS.items()}
    assert modes == {"rgba_png": "RGBA", "palette_trns_png": "P", "la_png": "LA", "cmyk_jpeg": "CMYK",
                     "exif_rotated_jpeg": "RGB", "grey16_png": "I;16", "webp_alpha": "RGBA",
                     "animated_webp": "RGBA"}
    with Image.open(io.BytesIO(FORMS["exif_rotated_jpeg"][1])) as im:
        assert orientation(im) == 6 and im.size == (H, W)   # stored sideways
    with Image.open(io.BytesIO(FORMS["palette_trns_png"][1])) as im:
        assert "transparency" in im.info
    with Image.open(io.BytesIO(FORMS["animated_webp"][1])) as im:
        assert getattr(im, "n_frames", 1) == 2


@pytest.mark.parametrize("form", sorted(FORMS))
def test_the_loader_gives_the_displayed_pixels(form):
    _, data, expected, tol = FORMS[form]
    image, reason = decode_image(data)
    assert reason is None and image.mode == "RGB"
    _close(image, expected, tol, form)
    # the img2dataset formula, not PIL's alpha_composite, and no alpha dropped onto black
    if form == "rgba_png":
        assert np.asarray(image)[0, 0].tolist() == [255, 255, 255]


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> Path:
    """Every form as a gallery tar, a gallery folder and a class-per-folder query set."""
    root = tmp_path_factory.mktemp("forms")
    (root / "folder" / "s0").mkdir(parents=True)
    with tarfile.open(root / "00000.tar", "w") as tar:
        for form, (ext, data, _, _) in sorted(FORMS.items()):
            info = tarfile.TarInfo(f"{form}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            (root / "folder" / "s0" / f"{form}.{ext}").write_bytes(data)
            for cls in ("a", "b"):
                (root / "queries" / cls).mkdir(parents=True, exist_ok=True)
                (root / "queries" / cls / f"{form}.{ext}").write_bytes(data)
    return root


def _expect(key: str) -> tuple[np.ndarray, float]:
    _, _, expected, tol = FORMS[key]
    return expected, tol


def test_gallery_tars_folders_and_range_reads(stored: Path):
    for path in (stored / "00000.tar", stored / "folder"):
        counts = SkipCounts()
        items = [it for shard in list_shards(str(path)) for it in iter_images(shard, counts)]
        assert counts.total == 0 and sorted(it.key for it in items) == sorted(FORMS)
        for it in items:
            _close(it.image, *_expect(it.key)[:1], _expect(it.key)[1], f"{path.name}: {it.key}")
        shard = list_shards(str(path))[0]
        result = read_located([(it.id, shard, it.loc) for it in items])
        assert len(result.images) == len(FORMS)
        for it in items:
            _close(result.images[it.id], *_expect(it.key), f"range read {path.name}: {it.key}")


def test_device_decode_orients_as_the_cpu_path(stored: Path):
    shard = list_shards(str(stored / "00000.tar"))[0]
    items = list(iter_images(shard, decode=defer_jpeg))
    # the sideways JPEG is not left to the device decoder, which would not orient it
    kept = {it.key for it in items if not isinstance(it.image, Image.Image)}
    assert "exif_rotated_jpeg" not in kept
    for it, (tensor, reason) in zip(items, decode_on([it.image for it in items], "cpu")):
        assert reason is None
        _close(tensor.permute(1, 2, 0).numpy(), *_expect(it.key), f"device decode: {it.key}")


def test_query_sets_and_references(stored: Path):
    qs = build_folder(str(stored / "queries"), k=1, seed=0)
    for item in [*qs.queries, *qs.references]:
        if item.rendering is None:
            _close(item.load(), *_expect(Path(item.id).stem), f"query set: {item.id}")
    # other producers' renderings are references too: a sideways photo as img2dataset stores it, a
    # transparent image with its alpha dropped, the centre square of an oblong image
    rendered = {(Path(it.id.split("#")[0]).stem, it.rendering): it for it in qs.references if it.rendering}
    alpha_forms = {"rgba_png", "palette_trns_png", "la_png", "webp_alpha", "animated_webp"}
    assert {f for f, r in rendered if r == "alpha-dropped"} == alpha_forms
    assert {f for f, r in rendered if r == "as-stored"} == {"exif_rotated_jpeg"}
    assert {f for f, r in rendered if r == "centre-square"} == set(FORMS)       # 48 x 32: oblong
    assert {f for f, r in rendered if r == "white-square"} == set(FORMS)
    assert len(qs.references) == 2 * len(FORMS) + 2 * (len(alpha_forms) + 1 + 2 * len(FORMS))  # two classes
    rgb, _ = _picture()
    _close(rendered["rgba_png", "alpha-dropped"].load(), rgb, 0, "alpha dropped")
    stored_pixels = np.asarray(Image.open(io.BytesIO(FORMS["exif_rotated_jpeg"][1])).convert("RGB"))
    _close(rendered["exif_rotated_jpeg", "as-stored"].load(), stored_pixels, 0, "as stored")
    _close(rendered["rgba_png", "centre-square"].load(), FORMS["rgba_png"][2][:, 8:40], 0, "centre square")
    square = np.full((W, W, 3), 255, np.uint8)
    square[8:40] = FORMS["rgba_png"][2]
    _close(rendered["rgba_png", "white-square"].load(), square, 0, "white square")
    for form, (ext, _, expected, tol) in FORMS.items():
        _close(load_image_file(str(stored / "queries" / "a" / f"{form}.{ext}")), expected, tol, form)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_stages_that_take_decoded_or_raw_images(form):
    """Calibration copies, thumbnails, the shard writer, distillation and the encoders' input: each
    gives the same pixels from the raw PIL image (as PIL opens the bytes) as from the loader's."""
    ext, data, expected, tol = FORMS[form]
    raw = Image.open(io.BytesIO(data))
    loaded = decode_image(data)[0]
    for kind, seed in (("flip", 0), ("jpeg", 0), ("format", 0), ("format", 1), ("format", 3)):  # WebP and GIF
        _close(make_copy(raw, kind, np.random.default_rng(seed)),
               np.asarray(make_copy(loaded, kind, np.random.default_rng(seed))), 0, f"copy {kind} {form}")
    _close(ImageOps.mirror(make_copy(raw, "flip", np.random.default_rng(0))), expected, tol, f"copy {form}")
    _close(thumbnail(raw, 64), expected, tol, f"thumbnail {form}")
    _close(Image.open(io.BytesIO(jpeg_bytes(raw, 95))), np.asarray(Image.open(io.BytesIO(jpeg_bytes(loaded, 95)))),
           0, f"shard writer {form}")
    key, img = distill_decode({"__key__": form, ext: data}, Counter())
    _close(img, expected, tol, f"distill decode {form}")
    t = to_tensor(raw)
    _close((t * 255).round().byte().permute(1, 2, 0).numpy(), expected, tol, f"distill tensor {form}")
    recipe = make_recipe("0/x", 1, 0, loaded.size, CropConfig(crops_per_image=2, size=24))
    _close(materialize(raw, recipe), np.asarray(materialize(loaded, recipe)), 0, f"crop {form}")
    transform = image_transform(resolve_encoder("test-tiny-timm"))
    assert torch.equal(transform(raw), transform(loaded)), f"encoder input {form}"


def test_embeddings_from_another_loader_are_not_reused(monkeypatch):
    """The loader's version is part of every embedding shard's fingerprint: a shard embedded from
    other pixels (alpha dropped, EXIF ignored) is refused by a rerun, never silently reused."""
    from index import embed
    from index.gallery import ShardRef

    task = embed.EmbedTask(shard=ShardRef("00000", "/nowhere/00000.tar", "tar"), out_dir="/nowhere",
                           encoders=(resolve_encoder("test-tiny-timm"),), crops=CropConfig())
    now = task.fingerprint(input_digest="d")
    monkeypatch.setattr(embed, "LOADER_VERSION", 1)
    assert task.fingerprint(input_digest="d") != now
