"""Named query sets: draws, references, test splits, folder layouts and error messages."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation.datasets import (EUROSAT_CLASSES, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, DatasetNotFoundError,
                               load_fashion_mnist)
from curation.querysets import QUERY_SETS, draw_per_class, get_query_set, holdout_mask, iter_images, list_query_sets
from index.core.registry import UnknownNameError

PER_CLASS = 15  # -> 3 held out for test, 12 available for the draw


def _make_folder(root: Path, classes, per_class: int, size: int = 8) -> None:
    for c, cls in enumerate(classes):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(per_class):
            colour = (20 * c % 256, 17 * i % 256, 100)
            Image.new("RGB", (size, size), colour).save(d / f"{cls}_{i + 1}.jpg")


@pytest.fixture
def eurosat(tmp_path: Path) -> Path:
    _make_folder(tmp_path / "2750", EUROSAT_CLASSES, PER_CLASS)
    (tmp_path / "2750" / "Forest" / "notes.txt").write_text("not an image")
    return tmp_path


def _ids(items) -> list[str]:
    return [it.id for it in items]


def test_eurosat_draw_has_k_per_class_with_matching_labels(eurosat):
    qs = get_query_set("eurosat_10shot", data_root=str(eurosat), seed=3)
    assert qs.name == "eurosat_10shot" and qs.shots == 10 and qs.seed == 3
    assert qs.classes == list(EUROSAT_CLASSES)
    counts = np.bincount([q.label for q in qs.queries], minlength=len(EUROSAT_CLASSES))
    assert counts.tolist() == [10] * len(EUROSAT_CLASSES)
    for q in qs.queries:  # the label is the class folder the file sits in
        assert q.id.split("/")[1] == qs.classes[q.label]
    assert len(set(_ids(qs.queries))) == len(qs.queries)
    assert qs.skipped == {"not an image file": 1}


def test_eurosat_draw_is_deterministic_nested_and_seed_dependent(eurosat):
    a = get_query_set("eurosat_10shot", data_root=eurosat, seed=0)
    b = get_query_set("eurosat_10shot", data_root=eurosat, seed=0)
    c = get_query_set("eurosat_10shot", data_root=eurosat, seed=1)
    five = get_query_set("eurosat_5shot", data_root=eurosat, seed=0)
    assert _ids(a.queries) == _ids(b.queries)
    assert _ids(a.queries) != _ids(c.queries)
    assert set(_ids(five.queries)) <= set(_ids(a.queries))


def test_eurosat_references_are_every_image_and_test_is_fixed_and_disjoint(eurosat):
    all_ids = {f"eurosat/{p.relative_to(eurosat / '2750').as_posix()}"
               for p in (eurosat / "2750").rglob("*.jpg")}
    assert len(all_ids) == PER_CLASS * len(EUROSAT_CLASSES)
    tests = []
    for name, seed in [("eurosat_5shot", 0), ("eurosat_10shot", 0), ("eurosat_10shot", 7)]:
        qs = get_query_set(name, data_root=eurosat, seed=seed)
        assert set(_ids(qs.references)) == all_ids
        assert len(qs.references) == len(all_ids)
        assert not set(_ids(qs.test)) & set(_ids(qs.queries))
        assert np.bincount([t.label for t in qs.test]).tolist() == [3] * len(EUROSAT_CLASSES)
        tests.append(_ids(qs.test))
    assert tests[0] == tests[1] == tests[2]  # the held-out split moves with neither k nor seed


def test_eurosat_root_forms_and_env_var(eurosat, monkeypatch):
    via_parent = get_query_set("eurosat_5shot", data_root=eurosat)
    via_2750 = get_query_set("eurosat_5shot", data_root=eurosat / "2750")
    monkeypatch.setenv("EUROSAT_ROOT", str(eurosat))
    via_env = get_query_set("eurosat_5shot")
    assert _ids(via_parent.queries) == _ids(via_2750.queries) == _ids(via_env.queries)


def test_eurosat_zenodo_layout(tmp_path):
    _make_folder(tmp_path / "EuroSAT_RGB", EUROSAT_CLASSES, 7)
    qs = get_query_set("eurosat_5shot", data_root=tmp_path)
    assert len(qs.queries) == 50 and len(qs.references) == 70


def test_eurosat_loader_returns_rgb_pil(eurosat):
    qs = get_query_set("eurosat_5shot", data_root=eurosat)
    im = qs.queries[0].load()
    assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (8, 8)


def test_missing_eurosat_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("EUROSAT_ROOT", raising=False)
    for kwargs in [{}, {"data_root": tmp_path / "nowhere"}]:
        with pytest.raises(DatasetNotFoundError) as e:
            get_query_set("eurosat_10shot", **kwargs)
        msg = str(e.value)
        for needle in ("EuroSAT_RGB.zip", "EUROSAT_ROOT", "--data-root", "unzip", "2750"):
            assert needle in msg


def test_incomplete_eurosat_lists_missing_classes(tmp_path):
    _make_folder(tmp_path / "2750", EUROSAT_CLASSES[:9], 7)
    with pytest.raises(DatasetNotFoundError, match="SeaLake"):
        get_query_set("eurosat_5shot", data_root=tmp_path)


def test_too_few_images_for_k_raises(tmp_path):
    _make_folder(tmp_path / "2750", EUROSAT_CLASSES, 7)  # 1 held out, 6 drawable
    with pytest.raises(ValueError, match="fewer than k=10"):
        get_query_set("eurosat_10shot", data_root=tmp_path)


def test_folder_form(tmp_path):
    root = tmp_path / "task"
    _make_folder(root, ["cat", "dog", "emu"], 10)
    Image.new("L", (5, 6), 128).save(root / "emu" / "grey.png")
    qs = get_query_set(f"folder:{root}:3shot", seed=2)
    assert qs.name == f"folder:{root}:3shot"
    assert qs.classes == ["cat", "dog", "emu"]
    assert np.bincount([q.label for q in qs.queries]).tolist() == [3, 3, 3]
    own = [r for r in qs.references if r.rendering is None]
    assert len(own) == 31  # every image of the folder
    # and the oblong 5 x 6 image also as img2dataset's center_crop and border modes render it
    assert sorted(r.id for r in qs.references if r.rendering) == [
        f"task/emu/grey.png#{r}" for r in ("centre-square", "white-square")]
    grey = next(r for r in qs.references if r.id.endswith("grey.png"))
    assert grey.load().mode == "RGB" and grey.label == 2
    assert _ids(get_query_set(f"folder:{root}:3shot", seed=2).queries) == _ids(qs.queries)


def test_bad_names_list_the_valid_ones(tmp_path):
    with pytest.raises(UnknownNameError) as e:
        get_query_set("eurosat_10shots")
    msg = str(e.value)
    assert "eurosat_10shot" in msg and "fashion_mnist_10shot" in msg and "folder:<path>:<k>shot" in msg
    with pytest.raises(ValueError, match=r"folder:<path>:<k>shot"):
        get_query_set(f"folder:{tmp_path}")
    with pytest.raises(ValueError, match="data root"):
        get_query_set(f"folder:{tmp_path}:5shot", data_root=tmp_path)
    with pytest.raises(DatasetNotFoundError):
        get_query_set(f"folder:{tmp_path / 'missing'}:5shot")
    assert "folder:<path>:<k>shot" in list_query_sets()
    assert {f"{d}_{k}shot" for d in ("eurosat", "fashion_mnist") for k in (5, 10, 25)} == set(QUERY_SETS.names())


def test_draw_dict_is_json_and_matches_queries(eurosat):
    qs = get_query_set("eurosat_5shot", data_root=eurosat, seed=4)
    d = json.loads(json.dumps(qs.to_draw_dict()))
    assert d["name"] == "eurosat_5shot" and d["seed"] == 4 and d["classes"] == list(EUROSAT_CLASSES)
    assert d["queries"] == [{"id": q.id, "label": q.label} for q in qs.queries]


def test_iter_images_batches_in_order(eurosat):
    qs = get_query_set("eurosat_5shot", data_root=eurosat)
    for workers in (0, 2):
        batches = list(iter_images(qs.queries[:7], batch_size=3, num_workers=workers))
        assert [len(items) for items, _ in batches] == [3, 3, 1]
        assert [it.id for items, _ in batches for it in items] == _ids(qs.queries[:7])
        assert all(im.mode == "RGB" for _, ims in batches for im in ims)
    with pytest.raises(ValueError):
        next(iter_images(qs.queries, batch_size=0))


def test_pure_draws_over_sizes():
    for n in range(1, 40):
        labels = np.repeat(np.arange(3), n)
        mask = holdout_mask(labels)
        per_class = np.bincount(labels[mask], minlength=3)
        assert (per_class == max(1, round(0.2 * n))).all()
        k = n - per_class[0]
        if k >= 1:
            drawn = draw_per_class(labels, k, seed=n, eligible=~mask)
            assert not mask[drawn].any()
            assert np.bincount(labels[drawn], minlength=3).tolist() == [k] * 3
            assert np.array_equal(drawn, draw_per_class(labels, k, seed=n, eligible=~mask))


# ---------------------------------------------------------------- Fashion-MNIST (installed by the Makefile)


def _require_fashion_mnist() -> None:
    assert Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file(), (
        "Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")


def test_fashion_mnist_raw_reader():
    _require_fashion_mnist()
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6000] * 10
    test_images, test_labels = load_fashion_mnist("test")
    assert test_images.shape == (10000, 28, 28) and np.bincount(test_labels).tolist() == [1000] * 10
    assert len(FASHION_MNIST_CLASSES) == 10
    with pytest.raises(ValueError, match="train, test"):
        load_fashion_mnist("val")


def test_fashion_mnist_query_set():
    _require_fashion_mnist()
    qs = get_query_set("fashion_mnist_10shot", seed=5)
    assert qs.classes == list(FASHION_MNIST_CLASSES)
    assert np.bincount([q.label for q in qs.queries]).tolist() == [10] * 10
    assert all(q.id.startswith("fashion_mnist/train/") for q in qs.queries)
    assert len(qs.test) == 10000 and all(t.id.startswith("fashion_mnist/test/") for t in qs.test)
    assert _ids(qs.references) == _ids(qs.queries) + _ids(qs.test)
    images, labels = load_fashion_mnist("train")
    q = qs.queries[13]
    idx = int(q.id.rsplit("/", 1)[1])
    assert labels[idx] == q.label
    im = q.load()
    assert im.mode == "RGB" and im.size == (28, 28)
    assert np.array_equal(np.asarray(im)[..., 0], images[idx])
    five = get_query_set("fashion_mnist_5shot", seed=5)
    assert set(_ids(five.queries)) <= set(_ids(qs.queries))
    assert _ids(get_query_set("fashion_mnist_10shot", seed=6).queries) != _ids(qs.queries)


def test_fashion_mnist_missing_says_apt_get(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        get_query_set("fashion_mnist_10shot", data_root=tmp_path)
