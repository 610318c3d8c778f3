"""curate checks its inputs by content: a gallery image replaced since indexing is refused (or, with
``changed_images="skip"``, left out and counted), and a target image changed under the same name is
embedded again and caught as a leak, not served from the reference-feature cache."""
from __future__ import annotations

import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from curation import cli
from curation.changed import ChangedImagesError
from curation.pipeline import CurateConfig, curate
from curation.querysets import get_query_set
from index.build import build_gallery_index
from index.config import IndexConfig
from index.crops import CropConfig

from fixtures_gallery import CLASSES, build_task, class_member, pattern, write_tar
from fixtures_hostile import replace_member, stored_png

SIZE = 64
N = 8
FIXED = dict(dedup_threshold=0.99, leak_threshold=0.95, verify="none")   # no calibration: fast


@dataclass
class World:
    root: Path
    task: Path
    gallery: Path
    index: Path


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_per_module):
    """Tiny models gain nothing from intra-op threads (conftest.one_thread_per_module)."""


def _gallery(root: Path) -> Path:
    """Uncompressed PNGs (one size for all), so any image can be swapped for another in place."""
    root.mkdir(parents=True)
    related = [(f"pool_{c}_{i}", "png", stored_png(class_member(c, 5000 + 10 * c + i).resize((SIZE, SIZE))))
               for c in range(len(CLASSES)) for i in range(4)]
    distractors = [(f"dist_{i}", "png", stored_png(pattern(9000 + i, SIZE))) for i in range(6)]
    write_tar(root / "00000.tar", related + distractors)
    return root


def _index(root: Path, gallery: Path) -> Path:
    cfg = IndexConfig(gallery=str(gallery / "*.tar"), encoders=("test-tiny-timm",), batch_size=16,
                      crops=CropConfig(crops_per_image=2, size=64, keep_full_image=True), faiss={"factory": "Flat"})
    build_gallery_index(cfg, root / "idx")
    return root / "idx"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("content")
    task = build_task(root)
    gallery = _gallery(root / "gallery")
    return World(root=root, task=task, gallery=gallery, index=_index(root, gallery))


def _cfg(task: Path, index: Path, out: Path, cache: Path, **kw) -> CurateConfig:
    return CurateConfig(queries=f"folder:{task}:2shot", index=str(index), size=N, out=str(out),
                        cache_dir=str(cache), **FIXED, **kw)


def _swap_related(root: Path, world: World) -> tuple[Path, list[str]]:
    """A copy of the gallery and its index, then half the related pool images replaced by same-size others."""
    gallery = root / "gallery"
    shutil.copytree(world.gallery, gallery)
    index = _index(root, gallery)
    changed = []
    with tarfile.open(gallery / "00000.tar") as tf:
        names = [m.name for m in tf.getmembers() if m.name.startswith("pool_") and m.name.endswith(("_0.png", "_1.png"))]
    for i, name in enumerate(sorted(names)):
        replace_member(gallery / "00000.tar", name, stored_png(pattern(777 + i, SIZE)))
        changed.append(f"00000/{name[:-4]}")
    return index, changed


def test_changed_gallery_images_are_refused_before_writing(world: World, tmp_path: Path):
    index, changed = _swap_related(tmp_path, world)
    out = tmp_path / "out"
    with pytest.raises(ChangedImagesError) as e:
        curate(_cfg(world.task, index, out, tmp_path / "cache"))
    msg = str(e.value)
    assert "changed since the index" in msg and "--changed-images skip" in msg
    named = [i for i in changed if i in msg]
    assert named and all(i in changed for i in msg.split(": ")[-1].split(". ")[0].split(", "))
    assert not list(out.glob("transfer-*.tar")) and not (out / "manifest.json").exists()
    # the command line says the same and exits 2
    rc = cli.main(["--queries", f"folder:{world.task}:2shot", "--index", str(index), "--size", str(N),
                   "--out", str(tmp_path / "out-cli"), "--cache-dir", str(tmp_path / "cache"),
                   "--dedup-threshold", "0.99", "--leak-threshold", "0.95", "--verify", "none"])
    assert rc == 2

    # skip: left out, counted, backfilled
    manifest = curate(_cfg(world.task, index, tmp_path / "skip", tmp_path / "cache", changed_images="skip"))
    c = manifest["counts"]
    assert c["removed_changed"] >= 1 and c["written"] == N
    written = {r for r in _sources(tmp_path / "skip")}
    assert not written & set(changed)
    assert (c["retrieved"] - c["removed_duplicate"] - c["removed_leak"] - c["removed_unreadable"]
            - c["removed_changed"] + c["backfilled"] - c["unreadable_at_write"]) == c["written"]


def _sources(out: Path) -> list[str]:
    import webdataset as wds
    tars = sorted(str(p) for p in out.glob("transfer-*.tar"))
    return [s["json"]["source_id"] for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode()]


def test_a_changed_target_image_under_the_same_name_is_caught_as_a_leak(world: World, tmp_path: Path):
    task = tmp_path / "task"
    shutil.copytree(world.task, task)
    cache = tmp_path / "cache"
    first = curate(_cfg(task, world.index, tmp_path / "out1", cache))
    written = _sources(tmp_path / "out1")
    victim = next(i for i in written if i.startswith("00000/pool_"))
    # a test image of the task (a reference, not a query) becomes that gallery image, same file name
    qs = get_query_set(f"folder:{task}:2shot")
    target = next(t for t in qs.test if t.label == int(victim.split("_")[1]))
    path = task / target.id.split("/", 1)[1]
    key = victim.split("/", 1)[1]
    with tarfile.open(world.gallery / "00000.tar") as tf:
        path.write_bytes(tf.extractfile(f"{key}.png").read())
    assert first["leaks"] is None or victim not in {x["image_id"] for x in first["leaks"]["leaks"]}

    second = curate(_cfg(task, world.index, tmp_path / "out2", cache))   # same cache, same names
    leaked = {x["image_id"]: x for x in second["leaks"]["leaks"]}
    assert victim in leaked and leaked[victim]["neighbor_ids"][0] == target.id
    assert victim not in _sources(tmp_path / "out2")
    assert second["counts"]["removed_leak"] >= 1


def _transfer_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("transfer-*.tar"))}


def test_a_moved_gallery_is_missing_until_curate_is_given_its_new_root(world: World, tmp_path: Path, capsys):
    gallery = tmp_path / "old" / "gallery"
    shutil.copytree(world.gallery, gallery)
    index = _index(tmp_path, gallery)
    cache = tmp_path / "cache"
    before = curate(_cfg(world.task, index, tmp_path / "before", cache))
    moved = tmp_path / "new" / "place"
    moved.parent.mkdir()
    gallery.rename(moved)
    argv = ["--queries", f"folder:{world.task}:2shot", "--index", str(index), "--size", str(N), "--cache-dir",
            str(cache), "--dedup-threshold", "0.99", "--leak-threshold", "0.95", "--verify", "none"]

    # missing, not "changed": one line naming the index's recorded gallery root and the way out
    capsys.readouterr()
    assert cli.main(argv + ["--out", str(tmp_path / "after")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("curate: error: gallery files missing: ")
    assert f"1 of 1 shard(s) under {gallery} (the index's recorded gallery root)" in err
    assert "--gallery-root NEW" in err and "changed" not in err
    assert not (tmp_path / "after").exists()   # refused before any work
    # a --gallery-root that does not hold it is refused the same way, naming both
    assert cli.main(argv + ["--out", str(tmp_path / "after"), "--gallery-root", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert f"are not under --gallery-root {tmp_path / 'new'}" in err and str(gallery / "00000.tar") in err

    # pointed at the new root: the same set as before the move
    assert cli.main(argv + ["--out", str(tmp_path / "after"), "--gallery-root", str(moved)]) == 0
    assert _transfer_bytes(tmp_path / "after") == _transfer_bytes(tmp_path / "before") != {}
    after = json.loads((tmp_path / "after" / "manifest.json").read_text())
    assert after["counts"] == before["counts"] and after["config"]["gallery_root"] == str(moved)
    # where the gallery is read from is no input of any stage: a rerun of the first run reuses them all
    again = curate(_cfg(world.task, index, tmp_path / "before", cache, gallery_root=str(moved)))
    assert {k: v["status"] for k, v in again["timings"]["stages"].items() if k not in ("open", "manifest")} == \
        {s: "reused" for s in ("embed_queries", "retrieve", "references", "filter", "write", "report")}

    # other bytes under the new root are still a changed image, not the indexed one
    victim = _sources(tmp_path / "before")[0]
    replace_member(moved / "00000.tar", f"{victim.split('/', 1)[1]}.png", stored_png(pattern(4242, SIZE)))
    with pytest.raises(ChangedImagesError, match=victim):
        curate(_cfg(world.task, index, tmp_path / "changed", cache, gallery_root=str(moved)))
