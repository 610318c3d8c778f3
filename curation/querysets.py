"""Named query sets: the few labelled target images, the decontamination references, the test split.

``get_query_set("eurosat_10shot", data_root, seed)`` returns a `QuerySet`:

- ``queries``: k images per class drawn with the seed (the labelled few-shot set);
- ``references``: the target's own images that a curated set must not contain (DESIGN.md, "What
  counts as the target's own images");
- ``test``: the evaluation split.

Registered names (`QUERY_SETS`, plus the parametrised ``folder:<path>:<k>shot``):

``eurosat_{5,10,25}shot``
    A local EuroSAT RGB copy (`curation.datasets.eurosat_root`). The test split is a fixed 20% of
    each class (`TEST_FRACTION`), chosen by a constant seed so that it is the same for every k and
    every draw seed; the k queries per class are drawn from the other 80%, so test and queries
    never overlap. References: every image of the dataset.
``fashion_mnist_{5,10,25}shot``
    The Debian ``dataset-fashion-mnist`` package. Queries are drawn from the official train split;
    the test split is the official test split. References: the query images plus the whole test
    split; the other train images serve the demo gallery as its in-domain pool and are legitimate
    retrievals, not leaks.
``folder:<path>:<k>shot``
    Any class-per-folder image tree, split as EuroSAT; references: every image.

In folder query sets (EuroSAT and ``folder:``), an image that another producer renders differently
(an EXIF-rotated photo, which img2dataset stores sideways; a transparent image with its alpha
dropped; an oblong image that img2dataset's center_crop or border mode makes square) is also a
reference in that rendering, with the id ``<id>#<rendering>`` (`rendered_references`), so its copy in
a gallery made by that producer is found.

Draws are nested: for one seed the 5-shot queries of a class are the first 5 of its 10-shot queries.
Images load lazily through each item's `loader` (a picklable callable returning a PIL RGB image); its
`content` (another, returning the stored bytes: the file, or the dataset's pixel array) gives the
content hash (`content_hashes`) that keys every cache of reference features, so an image changed under
the same name is never served from a cache.
"""
from __future__ import annotations

import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from curation.datasets import (EUROSAT_CLASSES, FASHION_MNIST_CLASSES, eurosat_root, fashion_mnist_root,
                               load_fashion_mnist, load_fashion_mnist_labels, scan_image_folder)
from index.core.images import load_image_file, render, renderings, to_rgb
from index.content import image_hash
from index.core.errors import ConfigError, InputError
from index.core.registry import Registry, UnknownNameError

TEST_FRACTION = 0.2
_HOLDOUT_ENTROPY = 0x7E57  # fixed: the held-out test split must not move with the draw seed
SHOTS = (5, 10, 25)
FOLDER_FORM = "folder:<path>:<k>shot"


@dataclass(frozen=True)
class LabeledImage:
    id: str
    label: int  # index into QuerySet.classes; -1 where unknown
    loader: Callable[[], Image.Image] = field(compare=False, repr=False)
    content: Callable[[], bytes] | None = field(default=None, compare=False, repr=False)
    rendering: str | None = None  # another producer's rendering of the image (index.core.images.RENDERINGS)

    def load(self) -> Image.Image:
        return self.loader()

    def content_hash(self) -> str:
        """blake2b-128 of the stored bytes (of the decoded pixels where no `content` is given)."""
        return content_hash(self)


def content_hash(item: Any) -> str:
    """The content hash of a labelled image: any object with ``load()`` (and optionally ``content``)."""
    get = getattr(item, "content", None)
    if get is None:
        im = item.load()
        return image_hash(f"{im.mode}{im.size}".encode() + im.tobytes())
    return image_hash(get())


def content_hashes(items: Sequence[Any], num_workers: int = 4) -> list[str]:
    """Content hashes of labelled images, in order (files read in `num_workers` threads)."""
    if num_workers < 1 or len(items) < 64:
        return [content_hash(it) for it in items]
    with ThreadPoolExecutor(num_workers) as pool:
        return list(pool.map(content_hash, items, chunksize=64))


@dataclass(frozen=True)
class QuerySet:
    name: str
    classes: list[str]
    seed: int
    shots: int
    queries: list[LabeledImage]
    references: list[LabeledImage]
    test: list[LabeledImage]
    source: str = ""                                       # where the images were read from
    skipped: dict[str, int] = field(default_factory=dict)  # {reason: count} of files not used

    def class_name(self, label: int) -> str:
        return self.classes[label]

    def to_draw_dict(self) -> dict[str, Any]:
        """The draw as curate writes it to queries.json."""
        return {
            "name": self.name, "seed": self.seed, "classes": list(self.classes),
            "queries": [{"id": q.id, "label": q.label} for q in self.queries],
        }


def iter_images(items: Sequence[LabeledImage], batch_size: int,
                num_workers: int = 0) -> Iterator[tuple[list[LabeledImage], list[Image.Image]]]:
    """Yield (items, RGB images) in batches, in order; `num_workers` > 0 decodes in threads."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        for start in range(0, len(items), batch_size):
            chunk = list(items[start:start + batch_size])
            images = list(pool.map(LabeledImage.load, chunk)) if pool else [it.load() for it in chunk]
            yield chunk, images
    finally:
        if pool:
            pool.shutdown()


# ---------------------------------------------------------------- pure draws


def holdout_mask(labels: np.ndarray, fraction: float = TEST_FRACTION) -> np.ndarray:
    """Boolean mask of a fixed `fraction` of each class (at least one image of each class).

    Depends only on the labels (in dataset order), not on any draw seed.
    """
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = max(1, int(round(fraction * len(idx))))
        perm = np.random.default_rng([_HOLDOUT_ENTROPY, int(c)]).permutation(len(idx))
        mask[idx[perm[:n_test]]] = True
    return mask


def draw_per_class(labels: np.ndarray, k: int, seed: int, eligible: np.ndarray | None = None,
                   class_names: Sequence[str] | None = None) -> np.ndarray:
    """Indices of k eligible items per class, class by class, ascending within a class.

    Each class draws from its own generator seeded by (seed, class), so classes are independent
    and draws are nested in k. A class with fewer than k eligible items raises.
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    labels = np.asarray(labels)
    eligible = np.ones(len(labels), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    out: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero((labels == c) & eligible)
        if len(idx) < k:
            name = class_names[int(c)] if class_names is not None else int(c)
            raise ConfigError(f"class {name!r} has {len(idx)} images available for the query draw, "
                             f"fewer than k={k}")
        perm = np.random.default_rng([int(seed), int(c)]).permutation(len(idx))
        out.append(np.sort(idx[perm[:k]]))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------- loaders (picklable)


def read_file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def load_fashion_mnist_image(split: str, root: str, index: int) -> Image.Image:
    images, _ = load_fashion_mnist(split, root)
    return to_rgb(Image.fromarray(images[index]))


def fashion_mnist_bytes(split: str, root: str, index: int) -> bytes:
    images, _ = load_fashion_mnist(split, root)
    return images[index].tobytes()


def load_rendering(path: str, rendering: str) -> Image.Image:
    return render(read_file_bytes(path), rendering)


def rendering_bytes(path: str, rendering: str) -> bytes:
    """The content a rendering's features are keyed by: the file's bytes and the rendering's name."""
    return read_file_bytes(path) + f"#{rendering}".encode()


def _renderings_of(path: str) -> tuple[str, ...]:
    try:
        with open(path, "rb") as f:
            return renderings(f.read(1 << 16))  # orientation and alpha are in the header
    except OSError:
        return ()   # refused by the loader when the image itself is read


def rendered_references(items: Sequence[LabeledImage], paths: Sequence[str]) -> list[LabeledImage]:
    """Extra references for the target images (files at `paths`) that another producer renders
    differently (`index.core.images.RENDERINGS`): a phone photo as img2dataset stores it (EXIF
    orientation not applied), a transparent image with its alpha dropped, an oblong image cut or
    padded to a square. Their ids are the image's id with ``#<rendering>``; the one loader's
    rendering stays the image's own reference."""
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(_renderings_of, paths, chunksize=256))
    return [LabeledImage(f"{it.id}#{r}", it.label, functools.partial(load_rendering, path, r),
                         functools.partial(rendering_bytes, path, r), rendering=r)
            for it, path, names in zip(items, paths, found) for r in names]


# ---------------------------------------------------------------- builders


def _folder_query_set(name: str, root: Path, id_prefix: str, k: int, seed: int,
                      classes: Sequence[str] | None = None) -> QuerySet:
    scan = scan_image_folder(root)
    if classes is not None and tuple(classes) != scan.classes:
        raise InputError(f"{root}: class folders {list(scan.classes)} differ from the expected {list(classes)}")
    labels = np.array([label for _, label in scan.files], dtype=np.int64)
    present = set(labels.tolist())
    empty = [c for i, c in enumerate(scan.classes) if i not in present]
    if empty:
        raise InputError(f"{root}: class folders without images: {empty}")
    paths = [str(root / rel) for rel, _ in scan.files]
    items = [LabeledImage(f"{id_prefix}/{rel}", label, functools.partial(load_image_file, path),
                          functools.partial(read_file_bytes, path))
             for (rel, label), path in zip(scan.files, paths)]
    test = holdout_mask(labels)
    queries = draw_per_class(labels, k, seed, eligible=~test, class_names=scan.classes)
    return QuerySet(
        name=name, classes=list(scan.classes), seed=seed, shots=k,
        queries=[items[i] for i in queries], references=items + rendered_references(items, paths),
        test=[it for it, t in zip(items, test) if t], source=str(root), skipped=dict(scan.skipped),
    )


def build_eurosat(k: int, data_root: str | None = None, seed: int = 0) -> QuerySet:
    return _folder_query_set(f"eurosat_{k}shot", eurosat_root(data_root), "eurosat", k, seed,
                             classes=EUROSAT_CLASSES)


def build_fashion_mnist(k: int, data_root: str | None = None, seed: int = 0) -> QuerySet:
    root = str(fashion_mnist_root(data_root))
    train_labels = load_fashion_mnist_labels("train", root)
    test_labels = load_fashion_mnist_labels("test", root)

    def item(split: str, i: int, label: int) -> LabeledImage:
        return LabeledImage(f"fashion_mnist/{split}/{i:05d}", int(label),
                            functools.partial(load_fashion_mnist_image, split, root, i),
                            functools.partial(fashion_mnist_bytes, split, root, i))

    drawn = draw_per_class(train_labels, k, seed, class_names=FASHION_MNIST_CLASSES)
    queries = [item("train", int(i), train_labels[i]) for i in drawn]
    test = [item("test", i, int(label)) for i, label in enumerate(test_labels)]
    return QuerySet(
        name=f"fashion_mnist_{k}shot", classes=list(FASHION_MNIST_CLASSES), seed=seed, shots=k,
        queries=queries, references=queries + test, test=test, source=root,
    )


def build_folder(path: str, k: int, seed: int = 0) -> QuerySet:
    root = Path(path)
    return _folder_query_set(f"folder:{path}:{k}shot", root, root.resolve().name or "folder", k, seed)


QUERY_SETS: Registry[Callable[..., QuerySet]] = Registry("query set")
for _k in SHOTS:
    QUERY_SETS.register(f"eurosat_{_k}shot", functools.partial(build_eurosat, _k))
    QUERY_SETS.register(f"fashion_mnist_{_k}shot", functools.partial(build_fashion_mnist, _k))

_FOLDER_RE = re.compile(r"^folder:(?P<path>.+):(?P<k>\d+)shot$")


def list_query_sets() -> list[str]:
    return QUERY_SETS.names() + [FOLDER_FORM]


def query_set_dirs(name: str, data_root: str | os.PathLike | None = None) -> list[str]:
    """The directories a query set's images are read from, where the name or `data_root` says them."""
    m = _FOLDER_RE.match(name)
    return [m["path"]] if m else ([str(data_root)] if data_root is not None else [])


def get_query_set(name: str, data_root: str | os.PathLike | None = None, seed: int = 0) -> QuerySet:
    """Resolve a query set name; `data_root` overrides the dataset's default location."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if name.startswith("folder:"):
        m = _FOLDER_RE.match(name)
        if not m or int(m["k"]) < 1:
            raise ConfigError(f"bad folder query set {name!r}; the form is {FOLDER_FORM}, "
                             f"e.g. folder:/data/mytask:10shot")
        if data_root is not None:
            raise ConfigError(f"{name!r} names its own folder; do not also give a data root ({data_root})")
        return build_folder(m["path"], int(m["k"]), int(seed))
    try:
        builder = QUERY_SETS.get(name)
    except UnknownNameError as e:
        raise UnknownNameError(f"{e}, or the form {FOLDER_FORM}") from None
    return builder(data_root=None if data_root is None else str(data_root), seed=int(seed))
