"""Reads by byte range: locations recorded at index time, reads equal to the shard scan's decode, the
same skip reasons, stale locations counted, row tables read by line offset, and a many-shard gallery
whose originals are read without reading any shard whole (and old indexes still read, by scanning)."""
from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from curation.shards import materialized_crops, read_originals
from index import ranged, store
from index.build import build_gallery_index
from index.config import IndexConfig
from index.core import contract
from index.crops import CropConfig, CropRecipe, materialize
from index.gallery import ShardRef, iter_images, list_shards
from index.core.errors import MissingInputError
from index.gallery_index import GalleryIndex, check_gallery, recorded_gallery_root
from index.ranged import ReadStats, read_by_id, read_located, read_one
from index.skips import SkipCounts

from fixtures_gallery import build_many_shards
from test_gallery import JPG, PNG, _encode, _write_tar, folder_gallery, messy_tar  # noqa: F401 (fixtures)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_per_module):
    """One torch and one FAISS thread (conftest.one_thread_per_module): on a busy 2-core machine a second
    intra-op thread only waits at barriers."""


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im)


def _tar_locs(path: Path) -> dict[str, dict]:
    """An independent oracle: each key's location from tarfile's random-access reader (first
    occurrence of a key, its first image member in IMAGE_EXTS order)."""
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    done: set[str] = set()
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, _, ext = m.name.partition(".")
            ext = ext.lower()
            group = members.setdefault(key, {})
            if ext in group and key not in done:
                done.add(key)  # a repeated suffix starts a second sample of the key: ignore it
            if key not in done:
                group[ext] = m
    out = {}
    for key, group in members.items():
        ext = next((e for e in contract.IMAGE_EXTS if e in group), None)
        if ext is None:
            continue
        loc = {"offset": group[ext].offset_data, "size": group[ext].size, "ext": ext}
        if "json" in group:
            loc["json"] = [group["json"].offset_data, group["json"].size]
        out[key] = loc
    return out


def _span_bytes(loc: dict) -> int:
    """Bytes a read of this location takes: each member's header block + data; a sample's two members
    within a block of each other are one read, the padding between them included."""
    spans = [(loc["offset"] - 512, loc["offset"] + loc["size"])]
    if "json" in loc:
        spans.append((loc["json"][0] - 512, loc["json"][0] + loc["json"][1]))
    spans.sort()
    if len(spans) == 2 and 0 <= spans[1][0] - spans[0][1] < 512:
        return spans[1][1] - spans[0][0]
    return sum(b - a for a, b in spans)


@pytest.fixture()
def formats_tar(tmp_path: Path) -> Path:
    """jpg, jpeg, png and webp members, an upper-case suffix, a sample without json, a long (pax) name."""
    long_key = "k" * 130
    members = [
        ("a.jpg", _encode("JPEG", 33, 21, seed=1)), ("a.json", b'{"k": "a"}'),
        ("b.png", _encode("PNG", 17, 29, seed=2)), ("b.json", b'{"k": "b"}'), ("b.txt", b"caption b"),
        ("c.webp", _encode("WEBP", 40, 12, seed=3)), ("c.json", b"{}"),
        ("d.jpeg", _encode("JPEG", 20, 20, seed=4)),
        ("E.PNG", _encode("PNG", 9, 11, seed=5, mode="RGBA")), ("E.json", b'{"k": "E"}'),
        (f"{long_key}.webp", _encode("WEBP", 14, 15, seed=6)), (f"{long_key}.json", b'{"long": 1}'),
    ]
    path = tmp_path / "fmt.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------- locations and reads equal the scan


def test_tar_locations_are_the_members_offsets_and_reads_equal_the_scan(formats_tar: Path):
    shard = list_shards(str(formats_tar))[0]
    images = list(iter_images(shard))
    assert [g.key for g in images] == ["a", "b", "c", "d", "E", "k" * 130]
    oracle = _tar_locs(formats_tar)
    assert {g.key: g.loc for g in images} == oracle
    assert images[2].loc["ext"] == "webp" and "json" not in images[3].loc and images[4].loc["ext"] == "png"
    stats = ReadStats()
    for g in images:
        got = read_one(g.id, shard, g.loc, stats=stats)
        assert got is not None and got.mode == "RGB"
        assert np.array_equal(_pixels(got), _pixels(g.image)), g.key
    # each member's header block and bytes (and the padding between a sample's adjacent members)
    members = sum(512 + loc["size"] + (512 + loc["json"][1] if "json" in loc else 0) for loc in oracle.values())
    expected = sum(_span_bytes(loc) for loc in oracle.values())
    assert members <= stats.bytes == expected < members + 512 * len(oracle) < formats_tar.stat().st_size
    assert stats.files == len(images)  # read_one opens per call; a batch opens once:
    batch_stats = ReadStats()
    res = read_located([(g.id, shard, g.loc) for g in reversed(images)], stats=batch_stats)
    assert batch_stats.files == 1 and batch_stats.bytes == expected and not res.unreadable
    # one read a sample (image and json adjacent), except the long name's json: its pax header lies between
    assert batch_stats.reads == len(images) + 1
    assert all(np.array_equal(_pixels(res.images[g.id]), _pixels(g.image)) for g in images)


def test_webdataset_written_tar(tmp_path: Path):
    path = tmp_path / "wds.tar"
    with wds.TarWriter(str(path)) as w:
        for k in range(4):
            ext = ("jpg", "png", "webp", "jpg")[k]
            w.write({"__key__": f"s{k}", ext: _encode({"jpg": "JPEG"}.get(ext, ext.upper()), 20 + k, 18, seed=k),
                     "json": {"k": k}})
    shard = list_shards(str(path))[0]
    images = list(iter_images(shard))
    assert {g.key: g.loc for g in images} == _tar_locs(path)
    res = read_located([(g.id, shard, g.loc) for g in images])
    assert all(np.array_equal(_pixels(res.images[g.id]), _pixels(g.image)) for g in images)


def test_bad_entries_give_the_scans_skip_reasons(messy_tar: Path):
    shard = list_shards(str(messy_tar))[0]
    scan_counts = SkipCounts()
    scanned = {g.key: g for g in iter_images(shard, scan_counts)}
    oracle = _tar_locs(messy_tar)
    assert {k: g.loc for k, g in scanned.items()} == {k: oracle[k] for k in scanned}
    counts = SkipCounts()
    res = read_located([(f"{shard.name}/{k}", shard, loc) for k, loc in oracle.items()], counts)
    assert sorted(k.split("/")[1] for k in res.images) == sorted(scanned)
    for k, g in scanned.items():
        assert np.array_equal(_pixels(res.images[g.id]), _pixels(g.image))
    # the scan's counts less what has no location: the duplicate key and the sample without an image
    assert counts.to_dict() == {"bad_meta": 1, "corrupt": 1, "empty": 1, "not_image": 1, "too_large": 2,
                                "truncated": 1}
    assert {**counts.to_dict(), "duplicate_key": 1, "not_image": 2} == scan_counts.to_dict()
    assert res.unreadable["00007/009"] == "bad_meta" and res.unreadable["00007/002"] == "empty"
    # the limits are the same options as the scan's
    small = SkipCounts()
    limited = read_located([(f"{shard.name}/{k}", shard, oracle[k]) for k in scanned], small, min_side=10)
    assert sorted(limited.images) == ["00007/000", "00007/001", "00007/011"] and small.to_dict() == {"too_small": 1}


def test_folder_gallery_by_range(folder_gallery: Path):
    shards = {s.name: s for s in list_shards(str(folder_gallery))}
    counts = SkipCounts()
    scanned = {g.id: g for s in shards.values() for g in iter_images(s, counts)}
    assert scanned["cats/a"].loc == {"file": "a.jpg", "size": len(JPG), "ext": "jpg", "json": "a.json"}
    assert scanned["cats/sub_b_c"].loc == {"file": "sub/b.c.jpg", "size": len(JPG), "ext": "jpg"}  # nested
    assert scanned["photos/top"].loc["file"] == "top.png"
    stats = ReadStats()
    items = [(iid, shards[iid.split("/")[0]], g.loc) for iid, g in scanned.items()]
    bad = [("cats/zero", shards["cats"], {"file": "zero.jpg", "size": 0, "ext": "jpg"})]
    got_counts = SkipCounts()
    res = read_located(items + bad, got_counts, stats)
    assert sorted(res.images) == sorted(scanned)
    for iid, g in scanned.items():
        assert np.array_equal(_pixels(res.images[iid]), _pixels(g.image)), iid
    assert got_counts.to_dict() == {"empty": 1}
    assert stats.bytes == sum(g.loc["size"] for g in scanned.values()) + len('{"src": "x"}')


# ---------------------------------------------------------------- stale locations


def test_stale_locations_are_counted_not_raised(formats_tar: Path, folder_gallery: Path, tmp_path: Path):
    shard = list_shards(str(formats_tar))[0]
    images = {g.key: g for g in iter_images(shard)}
    a, c = images["a"], images["c"]
    counts = SkipCounts()
    items = [
        ("fmt/a", shard, {**a.loc, "offset": a.loc["offset"] + 512}),        # header is not a's
        ("fmt/a", shard, {**a.loc, "size": a.loc["size"] + 1}),             # size differs from the header
        ("fmt/c", shard, {**c.loc, "json": [a.loc["json"][0], a.loc["json"][1]]}),  # a's json is not c's
        ("fmt/a", shard, {**a.loc, "offset": 10 ** 9}),                      # beyond the end of the file
        ("fmt/a", shard, {**a.loc, "ext": "gif"}),                           # not an image suffix
        ("fmt/a", shard, {**a.loc, "offset": "x"}),                          # malformed
        ("gone/a", ShardRef("gone", str(tmp_path / "gone.tar"), "tar"), a.loc),  # file removed
    ]
    for item in items:
        assert read_located([item], counts).unreadable == {item[0]: "stale_location"}, item[2]
    assert counts.to_dict() == {"stale_location": len(items)}
    # a shard cut after indexing: the members past the cut are stale, those before still read
    cut = tmp_path / "cut" / "fmt.tar"
    cut.parent.mkdir()
    cut.write_bytes(formats_tar.read_bytes()[: c.loc["offset"] + 10])
    cut_shard = ShardRef("fmt", str(cut), "tar")
    res = read_located([(g.id, cut_shard, g.loc) for g in images.values()])
    assert sorted(res.images) == ["fmt/a", "fmt/b"] and set(res.unreadable.values()) == {"stale_location"}
    # folders: a removed file, a file rewritten with another size, a path leaving the shard folder
    cats = next(s for s in list_shards(str(folder_gallery)) if s.name == "cats")
    sub = next(g for g in iter_images(cats) if g.key == "sub_b_c")
    (folder_gallery / "cats" / "a.json").unlink()
    (folder_gallery / "cats" / "sub" / "b.c.jpg").write_bytes(PNG)
    fcounts = SkipCounts()
    res = read_located([("cats/a", cats, {"file": "a.jpg", "size": len(JPG), "ext": "jpg", "json": "a.json"}),
                        ("cats/sub_b_c", cats, sub.loc),
                        ("cats/x", cats, {"file": "../dogs/d.webp", "size": 1, "ext": "webp"})], fcounts)
    assert res.images == {} and fcounts.to_dict() == {"stale_location": 3}


# ---------------------------------------------------------------- row tables by line offset


def test_rows_at_reads_only_the_lines_asked_for(tmp_path: Path):
    rows = [store.Row(f"s/{i // 3}", i % 3, {"box": [i, i + 1]}, {"offset": 512 * (i + 1), "size": i, "ext": "jpg"})
            for i in range(40)]
    rows[7] = store.Row("s/x", 0, {"box": []}, None)
    store.write_shard(tmp_path, "s", {"e": np.zeros((40, 2), np.float32)}, rows, {"fingerprint": "f"})
    assert store.load_rows(tmp_path, "s") == rows
    offsets = np.load(store.shard_dir(tmp_path, "s") / contract.ROWS_OFFSETS_FILE)
    assert offsets.dtype == np.int64 and len(offsets) == 41
    assert offsets[-1] == (store.shard_dir(tmp_path, "s") / contract.ROWS_FILE).stat().st_size
    want = [39, 0, 7, 8, 9, 20, 7, 1]
    assert store.load_rows_at(tmp_path, "s", want) == [rows[i] for i in want]
    assert store.load_rows_at(tmp_path, "s", []) == []
    with pytest.raises(IndexError, match=r"\[0, 40\)"):
        store.load_rows_at(tmp_path, "s", [40])
    (store.shard_dir(tmp_path, "s") / contract.ROWS_OFFSETS_FILE).unlink()   # an old index: whole file
    assert store.load_rows_at(tmp_path, "s", want) == [rows[i] for i in want]
    old = store.shard_dir(tmp_path, "s") / contract.ROWS_FILE                # old rows: no "loc" key
    old.write_text("".join(json.dumps({"id": r.id, "crop": r.crop, "recipe": r.recipe}) + "\n" for r in rows))
    assert [r.loc for r in store.load_rows(tmp_path, "s")] == [None] * 40


# ---------------------------------------------------------------- a many-shard gallery, end to end

SHARDS, PER_SHARD = 12, 5
CROPS = CropConfig(crops_per_image=2, size=32, keep_full_image=True)  # the full image + one crop


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("many")
    gallery = build_many_shards(root / "gallery", SHARDS, PER_SHARD)
    cfg = IndexConfig(gallery=str(gallery / "*.tar"), encoders=("test-tiny-timm",), crops=CROPS, batch_size=32,
                      faiss={"factory": "Flat", "shards_per_group": 4})
    build_gallery_index(cfg, root / "index")
    return gallery, root / "index"


def _member_bytes(gallery: Path, ids: list[str]) -> int:
    total = 0
    for iid in ids:
        shard, key = iid.split("/", 1)
        with tarfile.open(gallery / f"{shard}.tar") as tf:
            total += sum(m.size for m in tf.getmembers() if m.name.startswith(key + "."))
    return total


def _scanned(gallery: Path) -> dict[str, Image.Image]:
    return {g.id: g.image for s in list_shards(str(gallery / "*.tar")) for g in iter_images(s)}


def test_index_rows_carry_locations_and_offsets(many):
    gallery, index = many
    gi = GalleryIndex(index)
    assert gi.num_vectors == SHARDS * PER_SHARD * 2
    for entry in gi.shards:
        assert store.has_row_offsets(index, entry["name"])
        assert store.read_record(index, entry["name"])["store_format"] == contract.STORE_FORMAT
        locs = _tar_locs(gallery / f"{entry['name']}.tar")
        for row in store.load_rows(index, entry["name"]):
            assert row.loc == locs[row.id.split("/", 1)[1]]
    table = [r for entry in gi.shards for r in store.load_rows(index, entry["name"])]
    gids = np.array([117, 3, 64, 65, 3, 0, 119])
    assert gi.rows(gids) == [table[g] for g in gids]
    assert gi.rows(np.zeros(0, np.int64)) == []


def test_curate_reads_only_the_images_it_needs(many):
    gallery, index = many
    gi = GalleryIndex(index)
    # every 4th image (its full-image row), and the random crop of every 8th: images in every shard
    gids = np.r_[np.arange(0, gi.num_vectors, 2 * 4), np.arange(1, gi.num_vectors, 2 * 8)]
    rows = gi.rows(gids)
    ids = sorted({r.id for r in rows})
    assert len(ids) == 15 and len({i.split("/")[0] for i in ids}) == SHARDS
    got = read_originals(gi, ids)
    scanned = _scanned(gallery)
    assert sorted(got) == ids
    for iid in ids:
        assert np.array_equal(_pixels(got[iid]), _pixels(scanned[iid])), iid
    needed = _member_bytes(gallery, ids)
    stats = gi.read_stats
    assert stats.scanned_files == 0
    assert stats.bytes <= 2 * needed, (stats.bytes, needed)
    assert stats.files == len(stats.by_file) == SHARDS   # each shard opened once
    for path, n in stats.by_file.items():                 # no shard read whole: exactly its members
        shard_ids = [i for i in ids if i.startswith(Path(path).stem + "/")]
        assert n == sum(_span_bytes(gi.location(i)) for i in shard_ids) < Path(path).stat().st_size
    assert stats.reads == len(ids)
    # crops go by range too, and equal crops of the scanned originals
    before = stats.bytes
    records = [contract.TransferRecord(key=contract.transfer_key(r.id, r.crop), source_id=r.id, crop=r.crop,
                                       recipe=r.recipe, rank=k) for k, r in enumerate(rows)]
    counts = SkipCounts()
    crops = list(materialized_crops(gi, records, counts))
    assert counts.total == 0 and len(crops) == len(records)
    for rec, crop in crops:
        want = materialize(scanned[rec.source_id], CropRecipe.from_dict(rec.recipe))
        assert np.array_equal(_pixels(crop), _pixels(want))
    assert stats.bytes - before <= 2 * needed and stats.scanned_files == 0


def test_ids_not_returned_by_rows_use_the_shard_row_table(many):
    gallery, index = many
    gi = GalleryIndex(index)
    ids = ["00003/img_003_01", "00010/img_010_04", "00010/not_there", "99999/nope"]
    assert gi.location(ids[0]) == _tar_locs(gallery / "00003.tar")["img_003_01"]
    with pytest.raises(KeyError, match="not in the index"):
        gi.location(ids[2])
    counts = SkipCounts()
    res = read_by_id(gi, ids, counts)
    assert sorted(res.images) == ids[:2] and counts.to_dict() == {"missing": 2}
    assert gi.read_stats.scanned_files == 0


def test_old_index_without_locations_still_reads(many, tmp_path: Path, caplog):
    gallery, index = many
    old = tmp_path / "old-index"
    shutil.copytree(index, old)
    for d in (old / contract.EMBEDDINGS_DIR).iterdir():
        (d / contract.ROWS_OFFSETS_FILE).unlink()
        lines = [json.loads(x) for x in (d / contract.ROWS_FILE).read_text().splitlines()]
        (d / contract.ROWS_FILE).write_text("".join(
            json.dumps({k: v for k, v in x.items() if k != "loc"}, sort_keys=True) + "\n" for x in lines))
    new_gi, old_gi = GalleryIndex(index), GalleryIndex(old)
    gids = np.array([5, 70, 71, 119])
    assert [(r.id, r.crop, r.recipe) for r in old_gi.rows(gids)] == \
        [(r.id, r.crop, r.recipe) for r in new_gi.rows(gids)]
    assert all(r.loc is None for r in old_gi.rows(gids))
    ids = sorted({r.id for r in old_gi.rows(gids)})
    ranged._warned_scan = False
    with caplog.at_level(logging.WARNING, logger="index.ranged"):
        got = read_originals(old_gi, ids)
        read_originals(old_gi, ids)
    assert sum("no byte ranges recorded" in r.message for r in caplog.records) == 1  # warned once
    scanned = _scanned(gallery)
    assert sorted(got) == ids and all(np.array_equal(_pixels(got[i]), _pixels(scanned[i])) for i in ids)
    assert old_gi.read_stats.scanned_files == 2 * len({i.split("/")[0] for i in ids})


def test_folder_gallery_index_reads_by_file(folder_gallery: Path, tmp_path: Path):
    cfg = IndexConfig(gallery=str(folder_gallery), encoders=("test-tiny-timm",), crops=CROPS, batch_size=8,
                      faiss={"factory": "Flat"})
    build_gallery_index(cfg, tmp_path / "index")
    gi = GalleryIndex(tmp_path / "index")
    ids = sorted({r.id for r in gi.rows(np.arange(gi.num_vectors))})
    assert ids == ["cats/a", "cats/sub_b_c", "dogs/d", "photos/top"]
    assert gi.location("cats/sub_b_c")["file"] == "sub/b.c.jpg"
    got = read_originals(gi, ids)
    scanned = {g.id: g.image for s in list_shards(str(folder_gallery)) for g in iter_images(s)}
    assert sorted(got) == ids and all(np.array_equal(_pixels(got[i]), _pixels(scanned[i])) for i in ids)
    assert gi.read_stats.scanned_files == 0 and gi.read_stats.files == len(ids) + 1  # + cats/a.json


def test_a_moved_folder_gallery_reads_from_its_new_root(folder_gallery: Path, tmp_path: Path):
    """The recorded gallery root of a folder gallery (images at its top, and subfolders) is the folder
    itself; moved, its shards are missing until the index is pointed at the new root."""
    cfg = IndexConfig(gallery=str(folder_gallery), encoders=("test-tiny-timm",), crops=CROPS, batch_size=8,
                      faiss={"factory": "Flat"})
    manifest = build_gallery_index(cfg, tmp_path / "index")
    assert recorded_gallery_root(manifest["shards"]) == str(folder_gallery)
    want = read_originals(GalleryIndex(tmp_path / "index"), ["cats/a", "cats/sub_b_c", "dogs/d", "photos/top"])
    new = tmp_path / "moved" / "elsewhere"
    new.parent.mkdir()
    folder_gallery.rename(new)
    with pytest.raises(MissingInputError, match=rf"4 image\(s\) in 3 of 3 shard\(s\) under {folder_gallery} \(the "):
        check_gallery(manifest)
    check_gallery(manifest, str(new))
    gi = GalleryIndex(tmp_path / "index", gallery_root=str(new))
    assert gi.shard_ref("photos").path == str(new) and gi.shard_ref("cats").path == str(new / "cats")
    got = read_originals(gi, sorted(want))
    assert sorted(got) == sorted(want) and all(np.array_equal(_pixels(got[i]), _pixels(want[i])) for i in want)
    # without the new root every read is a stale location, as before
    assert read_originals(GalleryIndex(tmp_path / "index"), sorted(want)) == {}


def test_a_curate_run_reads_no_gallery_shard_whole(many, tmp_path: Path):
    """curate end to end on the many-shard gallery: every gallery read is a range read (no scan), no
    shard is read whole, and each image is read at most twice: every candidate's original once to
    embed it, the written ones again to cut their crops (which also makes the report's thumbnails of
    them), and the report reads only the removed leak / duplicate images it shows."""
    from curation.pipeline import CurateConfig, curate
    from curation.report_data import ReportLimits
    from curation.report_thumbs import read_report_thumbs
    from curation.run.report_items import report_items
    from curation.run.state import Filtered
    from curation.decontam import LeakReport
    from fixtures_gallery import pattern

    gallery, index = many
    task = tmp_path / "task"
    for c in range(2):
        (task / f"class{c}").mkdir(parents=True)
        for i in range(3):
            pattern(20000 + c * 100 + i, 32).save(task / f"class{c}" / f"q{i}.png")
    out = tmp_path / "curated"
    m = curate(CurateConfig(queries=f"folder:{task}:2shot", index=str(index), size=20, out=str(out),
                            cache_dir=str(tmp_path / "cache"), dedup_threshold=0.99, leak_threshold=0.95,
                            verify="none"))
    reads = m["timings"]["gallery_reads"]
    assert reads["scanned_files"] == 0 and reads["bytes"] > 0
    filt = json.loads((out / contract.STAGES_DIR / "filter.json").read_text())["data"]
    originals = filt["originals"]
    records = _records(out)
    sources = sorted({r["source_id"] for r in records})
    assert set(sources) <= set(originals)
    # the images the report shows that were never written: the only ones it reads
    draw = json.loads((out / contract.QUERIES_DRAW_FILE).read_text())
    classes = {q["id"]: draw["classes"][q["label"]] for q in draw["queries"]}
    shown = report_items([contract.TransferRecord.from_dict(r) for r in sorted(records, key=lambda r: r["rank"])],
                         LeakReport.from_dict(filt["leaks"]), Filtered.from_dict(filt["filtered"]), classes,
                         ReportLimits())
    extra = sorted(shown.original_ids() - set(sources))
    # the write stage kept a thumbnail of every written crop and original the report shows
    crops, thumbs = read_report_thumbs(out / contract.REPORT_THUMBS_FILE)
    assert set(crops) == shown.crop_keys() and shown.crop_keys()
    assert set(thumbs) == shown.original_ids() & set(sources)
    # each range read is one image's members (with their tar headers)
    gi = GalleryIndex(index)
    span = {i: _span_bytes(gi.location(i)) for i in set(originals) | set(extra)}
    assert reads["reads"] <= len(originals) + len(sources) + len(extra), (reads, len(originals), len(sources), extra)
    assert reads["bytes"] <= sum(span[i] for i in originals) + sum(span[i] for i in sources) \
        + sum(span[i] for i in extra), reads
    assert reads["bytes"] < sum(p.stat().st_size for p in gallery.glob("*.tar"))
    print(f"gallery reads {reads['reads']} ({reads['bytes']} B) for {len(originals)} originals embedded, "
          f"{len(sources)} written, {len(extra)} removed shown; 3-read bound was "
          f"{len(originals) + 2 * len(sources)} reads ({sum(span[i] for i in originals) + 2 * sum(span[i] for i in sources)} B)")


def _records(out: Path) -> list[dict]:
    recs = []
    for shard in sorted(out.glob("transfer-*.tar")):
        with tarfile.open(shard) as tf:
            recs += [json.load(tf.extractfile(m)) for m in tf if m.name.endswith(".json")]
    return recs
