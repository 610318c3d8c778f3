"""Raw readers for the target datasets behind the named query sets.

- Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx files, gzip), read whole
  into uint8 arrays once per process (60k + 10k images of 28x28 = 55 MB).
- EuroSAT RGB from a local copy: the class-per-folder layout of the official zip, found under a
  root that is the folder holding ``2750/`` (old DFKI zip) or ``EuroSAT_RGB/`` (Zenodo zip), or
  that folder itself.
- Any class-per-folder image tree (``<root>/<class>/**/<image>``).

Missing data raises `DatasetNotFoundError` saying how to obtain it; nothing is downloaded.
"""
from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index.core.contract import IMAGE_EXTS
from index.core.errors import ConfigError, InputError, UserError


class DatasetNotFoundError(UserError, FileNotFoundError):
    pass


# ---------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "FASHION_MNIST_ROOT"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_SPLITS = ("train", "test")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """`root`, else $FASHION_MNIST_ROOT, else the Debian package's directory; checked to exist."""
    path = Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    missing = [f for pair in _FASHION_FILES.values() for f in pair if not (path / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {path} (missing {', '.join(missing)}). Install it with "
            f"`apt-get install dataset-fashion-mnist` (files land in {FASHION_MNIST_DIR}), or point "
            f"${FASHION_MNIST_ENV} / --data-root at a folder holding the four idx .gz files."
        )
    return path


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data, dtype=">i4", count=1 + ndim)
    if int(header[0]) != magic:
        raise InputError(f"{path} is not an idx file with magic {magic} (found {int(header[0])})")
    shape = tuple(int(d) for d in header[1:])
    offset = 4 * (1 + ndim)
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if arr.size != int(np.prod(shape)):
        raise InputError(f"{path} is truncated: {arr.size} bytes of data for shape {shape}")
    return arr.reshape(shape)


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist_cached(split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = _FASHION_FILES[split]
    images = _read_idx(Path(root) / images_file, 2051, 3)
    labels = _read_idx(Path(root) / labels_file, 2049, 1).astype(np.int64)
    if len(images) != len(labels):
        raise InputError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels int64 [n]) of the official 'train' or 'test' split.

    Arrays are read-only and cached per process; label i names `FASHION_MNIST_CLASSES[i]`.
    """
    if split not in FASHION_MNIST_SPLITS:
        raise ConfigError(f"unknown Fashion-MNIST split {split!r}; valid choices: {', '.join(FASHION_MNIST_SPLITS)}")
    return _load_fashion_mnist_cached(split, str(fashion_mnist_root(root)))


def load_fashion_mnist_labels(split: str, root: str | os.PathLike | None = None) -> np.ndarray:
    """Labels only (the 30 kB label file), without decoding the image file."""
    if split not in FASHION_MNIST_SPLITS:
        raise ConfigError(f"unknown Fashion-MNIST split {split!r}; valid choices: {', '.join(FASHION_MNIST_SPLITS)}")
    path = fashion_mnist_root(root) / _FASHION_FILES[split][1]
    return _read_idx(path, 2049, 1).astype(np.int64)


# ---------------------------------------------------------------- image folders

EUROSAT_ENV = "EUROSAT_ROOT"
EUROSAT_CLASSES = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)
EUROSAT_SUBDIRS = ("2750", "EuroSAT_RGB")
EUROSAT_HOWTO = (
    "Download the EuroSAT RGB zip from its official source (https://github.com/phelber/EuroSAT, "
    "which links Zenodo record 10.5281/zenodo.7711810, file EuroSAT_RGB.zip; the older "
    "EuroSAT.zip unpacks to 2750/), unzip it, and set EUROSAT_ROOT (or pass --data-root) to the "
    "folder holding 2750/ or EuroSAT_RGB/, or to that folder itself."
)


@dataclass(frozen=True)
class FolderScan:
    """A class-per-folder dataset: sorted class names and sorted (relative path, label) files."""
    root: Path
    classes: tuple[str, ...]
    files: tuple[tuple[str, int], ...]
    skipped: dict[str, int] = field(default_factory=dict)  # {reason: count} of non-image files


def scan_image_folder(root: str | os.PathLike) -> FolderScan:
    """Every image under ``root/<class>/`` (recursively), classes = sorted sub-folder names.

    Files whose extension is not an image extension are counted in `skipped`, not dropped silently.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetNotFoundError(f"image folder {root} has no class sub-folders (expected <root>/<class>/<image>)")
    files: list[tuple[str, int]] = []
    skipped: dict[str, int] = {}
    for label, cls in enumerate(classes):
        for p in sorted((root / cls).rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.suffix.lower().lstrip(".") in IMAGE_EXTS + ("tif", "tiff", "bmp"):
                files.append((p.relative_to(root).as_posix(), label))
            else:
                skipped["not an image file"] = skipped.get("not an image file", 0) + 1
    return FolderScan(root=root, classes=tuple(classes), files=tuple(files), skipped=skipped)


def eurosat_root(data_root: str | os.PathLike | None = None) -> Path:
    """The folder holding the 10 EuroSAT class folders, from `data_root` or $EUROSAT_ROOT."""
    given = data_root or os.environ.get(EUROSAT_ENV)
    if not given:
        raise DatasetNotFoundError(f"EuroSAT location not given (no --data-root and ${EUROSAT_ENV} is unset). {EUROSAT_HOWTO}")
    base = Path(given)
    for candidate in [base / sub for sub in EUROSAT_SUBDIRS] + [base]:
        if candidate.is_dir() and any((candidate / c).is_dir() for c in EUROSAT_CLASSES):
            present = {p.name for p in candidate.iterdir() if p.is_dir() and not p.name.startswith(".")}
            missing = [c for c in EUROSAT_CLASSES if c not in present]
            extra = sorted(present - set(EUROSAT_CLASSES))
            if missing or extra:
                raise DatasetNotFoundError(
                    f"{candidate} is not a complete EuroSAT RGB copy: missing class folders "
                    f"{missing or 'none'}, unexpected folders {extra or 'none'}; expected exactly "
                    f"{', '.join(EUROSAT_CLASSES)}. {EUROSAT_HOWTO}"
                )
            return candidate
    raise DatasetNotFoundError(f"EuroSAT not found at {base}: no class folders in it or in "
                               f"{' or '.join(EUROSAT_SUBDIRS)}/ under it. {EUROSAT_HOWTO}")
