"""End to end: build a tiny index, run `curate`, read the curated set back.

The gallery and task come from `fixtures_gallery` (planted duplicates, planted copies of task images,
a look-alike, distractors); the index is built once per session with the random-init `test-tiny-timm`
encoder (conftest.gallery_world, which test_ecosystem_readers curates from too; a CLIP-tower variant
with `test-tiny-clip` for text queries). Similarities the tests rely on
are checked on the fixture first, so a change of encoder or fixture fails loudly, not vaguely.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from curation import cli
from curation.copies import COPY_KINDS
from curation.pipeline import CurateConfig, curate
from curation.shards import write_transfer_shards
from index.core import contract
from index.core.registry import UnknownNameError
from index.crops import CropRecipe, materialize
from index.encode import embed_images
from index.encoders import EncoderMismatch, build_encoder, resolve_encoder
from index.gallery import iter_images, list_shards
from index.gallery_index import GalleryIndex

from fixtures_gallery import (CLASSES, SHOTS, SMALL_SHARD_SIZE, SMALL_SHARDS_SIZE, WORLD_CROP, WORLD_CROPS_PER_IMAGE,
                              IndexedWorld as World, build_index, curate_argv, curated_outputs)

CROP = WORLD_CROP  # crop size in the index config (the contract's default is 224)
CROPS_PER_IMAGE = WORLD_CROPS_PER_IMAGE
N = 30


def _build_index(root: Path, gallery: Path, encoders: list[str], name: str) -> Path:
    return build_index(root, gallery, encoders, name, crop_size=CROP, crops_per_image=CROPS_PER_IMAGE)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_per_module):
    """Tiny models gain nothing from intra-op threads (conftest.one_thread_per_module)."""


@pytest.fixture(scope="module")
def world(gallery_world) -> World:
    return gallery_world


def _argv(w: World, out: Path, size: int = N, seed: int = 0, index: Path | None = None, *extra: str) -> list[str]:
    return curate_argv(w, out, size, *extra, seed=seed, index=index)


def _run(w: World, out: Path, *extra: str, size: int = N, seed: int = 0, index: Path | None = None) -> dict:
    rc = cli.main(_argv(w, out, size, seed, index, *extra))
    assert rc == 0
    return json.loads((out / contract.MANIFEST_FILE).read_text())


@pytest.fixture(scope="module")
def base(world: World) -> tuple[Path, dict, str]:
    """The reference run, through the installed `curate` console script."""
    out = world.root / "base"
    exe = Path(sys.executable).with_name("curate")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "curation.cli"]
    repo = str(Path(__file__).resolve().parents[1])  # this source tree, whatever is installed
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([repo] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.run(cmd + _argv(world, out), capture_output=True, text=True, timeout=600, env=env,
                          cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / contract.MANIFEST_FILE).read_text()), proc.stdout


def _transfer(out: Path) -> list[dict]:
    tars = sorted(str(p) for p in out.glob("transfer-*.tar"))
    assert tars, f"no transfer shards in {out}"
    return list(wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("pil"))


def _records(out: Path) -> list[dict]:
    return [s["json"] for s in _transfer(out)]


def _section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.S)
    assert m, f"report has no section {sid!r}"
    return m.group(1)


def _features(images: list[Image.Image], encoder: str = "test-tiny-timm") -> np.ndarray:
    return embed_images([build_encoder(resolve_encoder(encoder))], images, 16)[0]


def _gallery_images(w: World) -> dict[str, Image.Image]:
    out = {}
    for shard in list_shards(str(w.fx.gallery / "*.tar")):
        for g in iter_images(shard):
            out[g.id] = g.image
    return out


# ---------------------------------------------------------------- the fixture itself


def test_fixture_similarities_make_the_planted_cases_meaningful(world: World):
    gallery = _gallery_images(world)
    assert len(gallery) == world.fx.num_images
    refs = {p.relative_to(world.fx.task.parent).as_posix(): Image.open(p).convert("RGB")
            for p in sorted(world.fx.task.rglob("*.png"))}
    dup = _features([gallery[i] for i in world.fx.duplicates])
    assert (dup @ dup.T).min() > 0.99, "planted duplicates must be above the dedup threshold"
    for gid, rid in world.fx.leaks.items():
        f = _features([gallery[gid], refs[rid]])
        assert float(f[0] @ f[1]) > 0.95, f"planted leak {gid} must be above the leak threshold"
    gid, rid = world.fx.look_alike
    f = _features([gallery[gid]] + list(refs.values()))
    sims = f[1:] @ f[0]
    assert 0.7 < float(sims[list(refs).index(rid)]) < 0.95 and sims.max() < 0.95, \
        "the look-alike must resemble its task image but stay below the leak threshold"
    # every other gallery image is neither a leak nor a duplicate: the expected counts are exact
    others = [i for i in gallery if i not in world.fx.leaks and i not in world.fx.duplicates[1:]]
    g = _features([gallery[i] for i in others])
    r = _features(list(refs.values()))
    assert (g @ r.T).max() < 0.95
    s = g @ g.T
    np.fill_diagonal(s, -1)
    assert s.max() < 0.99


# ---------------------------------------------------------------- the curated set


def test_cli_writes_exactly_n_readable_samples_with_provenance(world: World, base):
    out, manifest, stdout = base
    samples = _transfer(out)
    assert len(samples) == N == manifest["counts"]["written"]
    assert f"curate: {N}/{N} written" in stdout
    draw = json.loads((out / contract.QUERIES_DRAW_FILE).read_text())
    query_ids = {q["id"] for q in draw["queries"]}
    gindex = GalleryIndex(world.index)
    rows = {(r.id, r.crop): r.recipe for p in range(len(gindex.shards)) for r in gindex._rows(p)}
    originals = _gallery_images(world)
    for s in samples:
        assert s["jpg"].size == (CROP, CROP)
        rec = s["json"]
        assert s["__key__"] == rec["key"] == contract.transfer_key(rec["source_id"], rec["crop"])
        assert 0 <= rec["crop"] < CROPS_PER_IMAGE
        assert rec["recipe"] == rows[(rec["source_id"], rec["crop"])]
        assert rec["queries"], "every transfer sample names the queries that retrieved it"
        for hit in rec["queries"]:
            assert set(hit) == {"query", "similarity", "rank"}
            assert hit["query"] in query_ids and hit["rank"] >= 0 and -1 <= hit["similarity"] <= 1
        assert rec["similarity"] == max(h["similarity"] for h in rec["queries"])
        crop = materialize(originals[rec["source_id"]], CropRecipe.from_dict(rec["recipe"]))
        buf = io.BytesIO()
        crop.convert("RGB").save(buf, "JPEG", quality=manifest["config"]["jpeg_quality"])
        assert np.array_equal(np.asarray(Image.open(buf).convert("RGB")), np.asarray(s["jpg"].convert("RGB"))), \
            "the written crop must be the re-materialised recipe"
    assert sorted(r["rank"] for r in (s["json"] for s in samples)) == list(range(N))
    # dedup works on original images: at most one crop of any image survives
    sources = [s["json"]["source_id"] for s in samples]
    assert len(set(sources)) == len(sources)


def test_query_shards_hold_every_query_with_its_label(base):
    out, manifest, _ = base
    draw = json.loads((out / contract.QUERIES_DRAW_FILE).read_text())
    assert draw["classes"] == list(CLASSES) and draw["seed"] == 0
    assert len(draw["queries"]) == SHOTS * len(CLASSES)
    tars = sorted(str(p) for p in out.glob("queries-*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("pil"))
    got = [(s["json"]["id"], s["json"]["label"]) for s in samples]
    assert got == [(q["id"], q["label"]) for q in draw["queries"]]
    for s in samples:
        assert int(s["cls"]) == s["json"]["label"]
        assert s["json"]["class_name"] == CLASSES[s["json"]["label"]]
        assert s["json"]["id"].split("/")[1] == s["json"]["class_name"]  # task/<class>/<file>
        assert s["png"].size == (96, 96)
    assert manifest["query_set"]["num_queries"] == len(samples)


def test_manifest_counts_add_up_and_backfill_reaches_n(base):
    out, m, stdout = base
    c = m["counts"]
    assert (c["retrieved"] - c["removed_duplicate"] - c["removed_leak"] - c["removed_unreadable"]
            + c["backfilled"] - c["unreadable_at_write"]) == c["written"] == c["requested"] == N
    assert c["retrieved"] == N and not c["exhausted"]
    assert c["removed_leak"] > 0 and c["removed_duplicate"] > 0, "the fixture plants both"
    assert c["backfilled"] == c["removed_leak"] + c["removed_duplicate"] > 0
    assert c["rounds"] >= 2
    assert (f"removed {c['removed_duplicate']} duplicate / {c['removed_leak']} leak / 0 unreadable, "
            f"backfilled {c['backfilled']}") in stdout
    assert m["strategy"] == "query_balanced" and m["seed"] == 0
    th, cal = m["thresholds"], m["calibration"]
    assert th["source"] == "calibrated" and th["verifier"] == "align"
    assert (th["dedup"], th["leak"], th["verify"]) == (cal["dedup_threshold"], cal["leak_threshold"],
                                                       cal["verify_threshold"])
    assert th["max_residual"] == cal["verify_max_residual"]
    assert set(cal["recall"]) == set(COPY_KINDS) and cal["num_images"] == 6 * len(CLASSES)
    assert (f"thresholds (calibrated) dedup {th['dedup']:.4g} leak {th['leak']:.4g} "
            f"verify align {th['verify']:.4g}") in stdout
    assert "None" not in stdout and "<=-" not in stdout
    # items per query and per class add up to the items written
    histograms = _section((out / contract.REPORT_FILE).read_text(), "histograms")
    assert f"the {N} items written" in histograms and histograms.count(f"total {N}</p>") == 2
    assert [e["name"] for e in m["encoders"]] == ["test-tiny-timm"]
    assert m["shards"] == ["transfer-000000.tar"]


def test_same_seed_gives_byte_identical_shards(world: World, base):
    out0, m0, _ = base
    again = world.root / "seed0-again"
    m = _run(world, again)
    assert m["counts"] == m0["counts"]
    for name in ["transfer-000000.tar", "queries-000000.tar", contract.QUERIES_DRAW_FILE]:
        assert (again / name).read_bytes() == (out0 / name).read_bytes(), name
    other = world.root / "seed1"
    m1 = _run(world, other, seed=1)
    assert m1["counts"]["written"] == N
    assert (other / contract.QUERIES_DRAW_FILE).read_bytes() != (out0 / contract.QUERIES_DRAW_FILE).read_bytes()
    assert (other / "transfer-000000.tar").read_bytes() != (out0 / "transfer-000000.tar").read_bytes()


def test_small_shard_size_splits_the_set(curated_in_small_shards):
    out, m = curated_in_small_shards          # N items in shards of 7 (shared with test_ecosystem_readers)
    assert (SMALL_SHARDS_SIZE, SMALL_SHARD_SIZE) == (N, 7) and m["config"]["shard_size"] == 7
    assert m["shards"] == [f"transfer-{i:06d}.tar" for i in range(-(-N // 7))]
    assert sorted(p.name for p in out.glob("transfer-*.tar")) == m["shards"]
    assert len(_records(out)) == N


# ---------------------------------------------------------------- dedup and decontamination


def _clusters(html: str) -> list[list[tuple[str, bool]]]:
    """(image id, kept) of each cluster in the report's dedup section."""
    blocks = _section(html, "dedup-clusters").split('<div class="cluster">')[1:]
    return [[(i, bool(k)) for k, i in re.findall(r'<div class="small">(kept: )?([^<]+)</div></div>', b)]
            for b in blocks]


def test_planted_duplicates_keep_one_and_the_report_lists_the_cluster(world: World, base):
    out, m, _ = base
    sources = {r["source_id"] for r in _records(out)}
    assert len(sources & set(world.fx.duplicates)) == 1
    clusters = _clusters((out / contract.REPORT_FILE).read_text())
    assert clusters, "the report lists the duplicate clusters"
    planted = [c for c in clusters if {i for i, _ in c} & set(world.fx.duplicates)]
    assert len(planted) == 1, "all planted copies form one cluster"
    ids = [i for i, _ in planted[0]]
    assert len(ids) >= 2 and set(ids) <= set(world.fx.duplicates), "the cluster holds planted copies only"
    kept = [i for i, k in planted[0] if k]
    assert len(kept) == 1 and kept[0] in sources
    for c in clusters:  # a cluster lists distinct images; crops of one image are not a cluster
        assert len({i for i, _ in c}) == len(c) >= 2
    # the first screen counts the removed duplicates as the duplicates section shows them
    html = (out / contract.REPORT_FILE).read_text()
    lede = re.search(r'<p class="lede">(.*?)</p>', html).group(1)
    total = re.search(r"(\d+) as duplicates \((.*)\)[,.]", lede)
    assert total and int(total.group(1)) == m["counts"]["removed_duplicate"], lede
    others = re.search(r"(\d+) crop\(s\) of (\d+) duplicate image\(s\)", total.group(2))
    crops = re.search(r"(\d+) further crop\(s\) of images already in the set", total.group(2))
    assert others, lede   # the planted copies are other images
    n_crops = int(crops.group(1)) if crops else 0
    assert int(others.group(1)) + n_crops == m["counts"]["removed_duplicate"]
    section = _section(html, "dedup-clusters")
    assert "duplicate image(s) removed" in section and \
        f"; {others.group(2)} duplicate image(s) removed" in section, section[:300]
    assert (f"{n_crops} item(s) removed as duplicates were further crops" in section) == (n_crops > 0)


def test_decontamination_removes_planted_copies_and_keeps_the_look_alike(world: World, base):
    out, m, _ = base
    sources = {r["source_id"] for r in _records(out)}
    flagged = {x["image_id"]: x for x in m["leaks"]["leaks"]}
    assert set(flagged) == set(world.fx.leaks), "exactly the planted copies are flagged"
    for gid, rid in world.fx.leaks.items():
        assert gid not in sources
        assert rid in flagged[gid]["neighbor_ids"]
        assert len(flagged[gid]["neighbor_ids"]) == m["thresholds"]["neighbours"] >= 5
        assert flagged[gid]["max_similarity"] > m["thresholds"]["leak"]
        # confirmed by verification against the planted source
        assert flagged[gid]["verified_reference"] == rid
        rule = m["leaks"]["verify_rule"]
        assert flagged[gid]["verify_score"] > rule["min_score"] == m["thresholds"]["verify"]
        assert rule["max_residual"] is None or flagged[gid]["verify_residual"] <= rule["max_residual"]
    alike, alike_ref = world.fx.look_alike
    assert alike in sources, "a look-alike is a legitimate retrieval"
    # the random-init encoder puts it above the loose candidate threshold; verification keeps it
    rejected = {x["image_id"]: x for x in m["leaks"]["rejected"]}
    limit = m["thresholds"]["max_residual"] or np.inf
    assert alike in rejected and (rejected[alike]["verify_score"] <= m["thresholds"]["verify"]
                                  or rejected[alike]["verify_residual"] > limit)
    assert m["leaks"]["num_references"] == 6 * len(CLASSES)
    leaks_html = _section((out / contract.REPORT_FILE).read_text(), "leaks")
    for gid, rid in world.fx.leaks.items():
        assert gid in leaks_html and rid in leaks_html
    assert "not a copy by verification: kept" in leaks_html and "verification score" in leaks_html
    assert "pixel key " in leaks_html
    calibration = _section((out / contract.REPORT_FILE).read_text(), "calibration")
    assert f"leak threshold <b>{m['calibration']['leak_threshold']:.4g}</b>" in calibration
    assert calibration.count('<img class="plot"') == 5      # four curves and the recall per kind


def test_pixel_keys_find_leaks_the_embedding_does_not(world: World, capsys):
    # a leak threshold no embedding similarity exceeds: only the pixel keys make candidates
    m = _run(world, world.root / "keys-only", "--leak-threshold", "1")
    th = m["thresholds"]
    assert th["key"] == m["calibration"]["pixel_threshold"] is not None and m["leaks"]["key_threshold"] == th["key"]
    assert f"key {th['key']:.4g}" in capsys.readouterr().out
    flagged = {x["image_id"]: x for x in m["leaks"]["leaks"]}
    assert set(flagged) == set(world.fx.leaks)
    for gid, rid in world.fx.leaks.items():
        assert flagged[gid]["key_similarity"] > th["key"] and flagged[gid]["verified_reference"] == rid
    none = _run(world, world.root / "no-keys", "--leak-threshold", "1", "--key-threshold", "1")
    assert none["thresholds"]["key"] == 1.0 and not none["leaks"]["leaks"] and none["counts"]["removed_leak"] == 0


def test_leak_review_unflags_an_image_and_its_crops_come_back(world: World, base):
    _, m0, _ = base
    reviewed = "00001/leak_train"
    review = world.root / "review.json"
    review.write_text(json.dumps({"not_leaks": [reviewed]}))
    out = world.root / "reviewed"
    m = _run(world, out, "--leak-review", str(review))
    assert reviewed in {r["source_id"] for r in _records(out)}
    assert [x["image_id"] for x in m["leaks"]["cleared"]] == [reviewed]
    assert {x["image_id"] for x in m["leaks"]["leaks"]} == set(world.fx.leaks) - {reviewed}
    assert m["counts"]["written"] == N
    assert m["counts"]["removed_leak"] < m0["counts"]["removed_leak"]
    assert "un-flagged by review" in _section((out / contract.REPORT_FILE).read_text(), "leaks")
    # a review naming an image that was never flagged is refused
    review.write_text(json.dumps(["00002/dist_00"]))
    with pytest.raises(ValueError, match="00002/dist_00"):
        curate(CurateConfig(queries=world.fx.query_set, index=str(world.index), size=N,
                            out=str(world.root / "bad-review"), cache_dir=str(world.cache),
                            leak_review=str(review)))


# ---------------------------------------------------------------- shortfalls


def test_gallery_too_small_writes_everything_and_says_so(world: World, capsys):
    out = world.root / "too-big"
    m = _run(world, out, size=500)
    c = m["counts"]
    # one crop per image survives dedup; the planted duplicates collapse to one; the leaks go
    expected = world.fx.num_images - (len(world.fx.duplicates) - 1) - len(world.fx.leaks)
    assert c["written"] == expected == len(_records(out))
    assert c["exhausted"] and c["requested"] == 500
    assert c["retrieved"] == GalleryIndex(world.index).num_vectors
    assert "exhausted" in m["message"] and f"only {expected} " in m["message"]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"curate: {expected}/500 written") and m["message"] in line


def _corrupt_member(tar_path: Path, member: str) -> None:
    """Overwrite a member's bytes in place: the tar stays well-formed, the image cannot be decoded."""
    with tarfile.open(tar_path) as tf:
        info = tf.getmember(member)
    with open(tar_path, "r+b") as f:
        f.seek(info.offset_data)
        f.write(b"\0" * info.size)


def test_unreadable_gallery_images_are_counted_and_n_still_reached(world: World, base):
    base_out, _, _ = base
    root = world.root / "broken"
    gallery = root / "gallery"
    shutil.copytree(world.fx.gallery, gallery)
    index = _build_index(root, gallery, ["test-tiny-timm"], "idx")
    # an image the reference run wrote, from a shard written as PNGs
    records = _records(base_out)
    victim = next(r["source_id"] for r in records if r["source_id"].startswith("00000/"))
    shard, key = contract.split_image_id(victim)
    _corrupt_member(gallery / f"{shard}.tar", f"{key}.png")

    # the writer alone counts what it cannot read
    gi = GalleryIndex(index)
    res = write_transfer_shards(root / "write-only", gi, [contract.TransferRecord.from_dict(r) for r in records],
                                shard_size=100)
    assert res.unreadable == sum(r["source_id"] == victim for r in records) == 1
    assert res.written == len(records) - 1 and sum(res.skipped.values()) == 1

    out = root / "out"
    m = _run(world, out, "--changed-images", "skip", index=index)   # its bytes changed since indexing
    c = m["counts"]
    assert c["removed_changed"] + c["unreadable_at_write"] >= 1
    assert c["written"] == N == len(_records(out))
    assert victim not in {r["source_id"] for r in _records(out)}
    assert (c["retrieved"] - c["removed_duplicate"] - c["removed_leak"] - c["removed_unreadable"]
            - c["removed_changed"] + c["backfilled"] - c["unreadable_at_write"]) == c["written"]


def test_when_every_image_is_flagged_nothing_is_written_and_the_manifest_says_so(world: World):
    out = world.root / "all-leaks"
    m = _run(world, out, "--leak-threshold", "-1", "--verify", "none", size=N)
    assert m["thresholds"]["leak"] == -1.0 and m["thresholds"]["verify"] is None
    assert m["thresholds"]["source"] == "mixed"   # the dedup threshold is still calibrated
    c = m["counts"]
    assert c["written"] == 0 and not list(out.glob("transfer-*.tar")) and c["exhausted"]
    assert c["removed_leak"] == c["retrieved"] == N and c["backfilled"] == 0
    assert len(m["leaks"]["leaks"]) == world.fx.num_images
    assert "only 0 " in m["message"]
    assert (out / contract.REPORT_FILE).is_file()


# ---------------------------------------------------------------- strategies and refusals


@pytest.fixture(scope="module")
def clip_index(world: World) -> Path:
    return _build_index(world.root, world.fx.gallery, ["test-tiny-clip"], "idx-clip")


def test_paper_thresholds_without_verification(world: World, capsys):
    out = world.root / "paper"
    m = _run(world, out, "--dedup-threshold", "0.99", "--leak-threshold", "0.95", "--verify", "none")
    assert m["thresholds"] == {"dedup": 0.99, "leak": 0.95, "verify": None, "max_residual": None, "key": None,
                               "verifier": "none", "neighbours": 5, "key_neighbours": 5, "source": "given"}
    assert m["calibration"] is None
    assert "thresholds (given) dedup 0.99 leak 0.95 verify off," in capsys.readouterr().out
    numbers = _section((out / contract.REPORT_FILE).read_text(), "summary")
    for limit in ("verify", "max_residual", "key"):
        assert re.search(rf'<th>threshold: {limit}</th><td class="n">off</td>', numbers), limit


@pytest.mark.parametrize("field,value,valid", [("dedup_threshold", "high", "'auto' or a number"),
                                               ("leak_threshold", 1.5, "'auto' or a number"),
                                               ("verify_threshold", "x", "'auto' or a number"),
                                               ("verify", "orb", "align, none"),
                                               ("verify_max_residual", -3, "grey levels >= 0")])
def test_bad_threshold_settings_list_the_valid_choices(field: str, value, valid: str):
    with pytest.raises(ValueError, match=valid):
        CurateConfig(queries="x", index="y", size=1, out="z", **{field: value})
    assert CurateConfig(queries="x", index="y", size=1, out="z", leak_threshold="0.9").leak_threshold == 0.9
    assert CurateConfig(queries="x", index="y", size=1, out="z", verify_max_residual="12").verify_max_residual == 12.0


def test_text_strategy_with_a_clip_encoder(world: World, clip_index: Path):
    # the random-init tiny CLIP maps every image within ~0.002 of every other: thresholds go up to match
    out = world.root / "text"
    m = _run(world, out, "--strategy", "text", "--dedup-threshold", "0.99995", "--leak-threshold", "0.99995",
             size=12, index=clip_index)
    assert m["counts"]["written"] == 12 and m["strategy"] == "text"
    hits = {h["query"] for r in _records(out) for h in r["queries"]}
    assert hits and hits <= {f"text:{c}" for c in CLASSES}


def test_text_strategy_without_a_text_tower_is_refused(world: World, capsys):
    rc = cli.main(_argv(world, world.root / "text-timm", 12, 0, None, "--strategy", "text"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "text tower" in err and "test-tiny-timm" in err
    assert not (world.root / "text-timm" / contract.MANIFEST_FILE).exists()


def test_unknown_strategy_lists_the_valid_names(world: World, capsys):
    rc = cli.main(_argv(world, world.root / "nope", 12, 0, None, "--strategy", "query_balance"))
    assert rc == 2
    err = capsys.readouterr().err
    for name in ("query_balanced", "best_matches", "random", "text"):
        assert name in err
    with pytest.raises(UnknownNameError, match="query_balanced"):
        CurateConfig(queries="x", index="y", size=1, out="z", strategy="bogus")


@pytest.mark.parametrize("strategy", ["best_matches", "random"])
def test_baseline_strategies_write_n(world: World, strategy: str):
    out = world.root / strategy
    m = _run(world, out, "--strategy", strategy, size=15)
    assert m["counts"]["written"] == 15 == len(_records(out))
    assert not {r["source_id"] for r in _records(out)} & set(world.fx.leaks)


def test_encoder_mismatch_is_refused(world: World, capsys):
    tampered = world.root / "idx-tampered"
    shutil.copytree(world.index, tampered)
    path = tampered / contract.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["encoders"][0]["weights_digest"] = "0" * 64
    path.write_text(json.dumps(manifest))
    out = world.root / "mismatch"
    with pytest.raises(EncoderMismatch, match="differ from the index"):
        curate(CurateConfig(queries=world.fx.query_set, index=str(tampered), size=N, out=str(out),
                            cache_dir=str(world.cache)))
    assert cli.main(_argv(world, out, N, 0, tampered)) == 2
    assert "differ from the index" in capsys.readouterr().err
    assert not (out / contract.MANIFEST_FILE).exists() and not list(out.glob("transfer-*.tar"))


def test_missing_index_is_a_clear_error(world: World, capsys):
    assert cli.main(_argv(world, world.root / "noidx", N, 0, world.root / "no-such-index")) == 2
    assert "build the index first" in capsys.readouterr().err


# ---------------------------------------------------------------- report


def test_report_has_every_section(world: World, base):
    from curation.report import SECTION_IDS

    out, m, _ = base
    html = (out / contract.REPORT_FILE).read_text()
    for sid in SECTION_IDS:
        _section(html, sid)
    per_query = _section(html, "per-query")
    draw = json.loads((out / contract.QUERIES_DRAW_FILE).read_text())
    assert any(q["id"] in per_query for q in draw["queries"])
    assert str(m["counts"]["written"]) in _section(html, "summary")


@pytest.mark.slow
def test_report_of_a_real_run_reads_well_in_headless_chromium(world: World, base, tmp_path):
    """Every thumbnail of a real run's report loads (removed leaks and duplicates included), the
    first screen shows the curated crops, and every section is one click from the contents."""
    from browser import assert_readable_report, inspect_page

    out, m, _ = base
    check = inspect_page(out / contract.REPORT_FILE, tmp_path / "curate-report.png")
    assert m["counts"]["unreadable_at_write"] == 0 and m["counts"]["removed_unreadable"] == 0
    assert_readable_report(check, min_first_screen=8, placeholders=0)
    assert check.first_screen_thumbnails >= 8
    html = (out / contract.REPORT_FILE).read_text()
    assert "gallery, aligned" in _section(html, "leaks")          # the verification evidence of each leak
    assert _section(html, "calibration").count('<img class="plot"') >= 4 or m["calibration"] is None


# ---------------------------------------------------------------- stages, resume, executors

class _Killed(BaseException):
    """Raised right after a stage is committed, as a crash there would stop the run."""


_outputs = curated_outputs


def _statuses(out: Path) -> dict[str, str]:
    return {k: v["status"] for k, v in json.loads((out / contract.MANIFEST_FILE).read_text())["timings"]["stages"].items()}


@pytest.mark.parametrize("stage", ["open", "embed_queries", "retrieve", "references", "filter", "write", "report"])
def test_a_run_killed_after_each_stage_resumes_byte_identical(world: World, base, monkeypatch, stage: str):
    from curation.run import stages

    base_out, _, _ = base
    out = world.root / f"killed-{stage}"
    cfg = cli.parse(_argv(world, out))

    def kill(name: str) -> None:
        if name == stage:
            raise _Killed(name)

    monkeypatch.setattr(stages, "after_stage", kill)
    with pytest.raises(_Killed):
        curate(cfg)
    assert not (out / contract.MANIFEST_FILE).exists()
    done = [s.name for s in stages.STAGES][:stages.STAGE_NAMES.index(stage)]
    assert sorted(p.stem for p in (out / contract.STAGES_DIR).glob("*.json")) == sorted(done)
    monkeypatch.undo()
    curate(cfg)
    status = _statuses(out)
    assert sorted(k for k, v in status.items() if v == "reused") == sorted(done)
    assert all(v == "computed" for k, v in status.items() if k not in done)
    got, want = _outputs(out), _outputs(base_out)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs after resuming from {stage}"


def test_killed_process_resumes_byte_identical(world: World, base):
    """A real crash: the process exits (no cleanup) right after the filter stage is committed."""
    from curation.run.stages import KILL_ENV, KILL_EXIT_CODE

    base_out, _, _ = base
    out = world.root / "killed-process"
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", KILL_ENV: "filter",
           "PYTHONPATH": os.pathsep.join([repo] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.run([sys.executable, "-m", "curation.cli"] + _argv(world, out), capture_output=True,
                          text=True, timeout=600, env=env, cwd=repo)
    assert proc.returncode == KILL_EXIT_CODE, proc.stderr[-3000:]
    assert not (out / contract.MANIFEST_FILE).exists() and not list(out.glob("transfer-*.tar"))
    _run(world, out)
    assert _statuses(out)["filter"] == "reused" and _statuses(out)["write"] == "computed"
    assert _outputs(out) == _outputs(base_out)


def test_a_changed_setting_recomputes_from_the_first_stage_it_affects(world: World, base):
    base_out, _, _ = base
    out = world.root / "rerun-settings"
    _run(world, out)
    assert set(_statuses(out).values()) == {"computed"}
    _run(world, out)   # nothing changed: every recorded stage is reused
    assert {k for k, v in _statuses(out).items() if v != "reused"} == {"open", "manifest"}
    assert _outputs(out) == _outputs(base_out)
    m = _run(world, out, "--shard-size", "7")
    status = _statuses(out)
    assert status["filter"] == "reused" and status["write"] == "recomputed (stale record)"
    assert status["report"] == "recomputed (stale record)"
    assert m["shards"] == sorted(p.name for p in out.glob("transfer-*.tar")) and len(m["shards"]) == -(-N // 7)
    # an output changed behind the run's back is rewritten, not trusted
    _run(world, out)
    (out / m["shards"][0]).write_bytes(b"truncated")
    _run(world, out)
    assert _statuses(out)["write"] == "recomputed (outputs changed record)"
    assert len(_records(out)) == N
    # so are the report thumbnails the write stage keeps, missing or changed
    thumbs = (out / contract.REPORT_THUMBS_FILE).read_bytes()
    for damage in (lambda p: p.unlink(), lambda p: p.write_bytes(thumbs[:-1024])):
        damage(out / contract.REPORT_THUMBS_FILE)
        _run(world, out)
        assert _statuses(out)["write"] == "recomputed (outputs changed record)"
        assert _statuses(out)["report"] == "reused"
        assert (out / contract.REPORT_THUMBS_FILE).read_bytes() == thumbs


def test_a_set_written_in_an_older_format_is_rewritten_by_a_rerun(world: World, base, monkeypatch):
    """The write stage's fingerprint covers contract.CURATED_FORMAT: shards an earlier version wrote in
    another format are rewritten, the search and the filtering reused."""
    from curation.run import stages

    base_out, _, _ = base
    out = world.root / "older-format"
    shutil.copytree(base_out, out)
    current = stages.STAGES
    with monkeypatch.context() as m:   # the stage table as a version writing format 1 had it
        m.setattr(stages, "STAGES", tuple(dataclasses.replace(s, output_format=1) if s.output_format else s
                                          for s in current))
        _run(world, out)
    _run(world, out)
    status = _statuses(out)
    assert status["filter"] == "reused" and status["write"] == "recomputed (stale record)"
    assert status["report"] == "recomputed (stale record)"
    assert _outputs(out) == _outputs(base_out)
    assert json.loads((out / contract.MANIFEST_FILE).read_text())["format"] == contract.CURATED_FORMAT


def test_summary_and_manifest_report_stage_timings_and_verification_rate(base):
    _, m, stdout = base
    stages = m["timings"]["stages"]
    assert set(stages) == {"open", "embed_queries", "retrieve", "references", "filter", "write", "report",
                           "manifest"}
    assert all(v["seconds"] >= 0 for v in stages.values())
    assert m["verified_pairs"] > 0 and m["timings"]["verify_pairs_per_s"] > 0
    assert f"verified {m['verified_pairs']} pairs" in stdout and "[open " in stdout
    parts = m["timings"]["parts"]      # finer than the stages; the summary names the three largest
    assert {"embed references", "calibrate", "embed originals", "verify pairs", "write"} <= set(parts)
    assert parts["verify pairs"] == pytest.approx(m["timings"]["verify"], abs=1e-3)
    top = sorted(parts, key=lambda k: -parts[k])[:3]
    assert re.search(r"most time: " + ", ".join(rf"{re.escape(k)} [\d.]+ s" for k in top), stdout)
    assert set(m["stages"]) == set(stages) - {"open", "manifest"}


def test_the_search_recall_is_recorded_and_summarised(base):
    """An exact (Flat) index: recall 1 without a sample, said in the manifest, summary and report."""
    out, m, stdout = base
    est, point = m["search"]["recall"], m["search"]["operating_point"]
    assert est["recall"] == 1.0 and est["sample"] is None and est["k"] >= 1
    assert point["recall"] == 1.0 and "Flat" in point["why"]
    assert f"search recall@{est['k']} 1.000 (exact index)" in stdout
    assert f"search recall@{est['k']}" in (out / contract.REPORT_FILE).read_text()


def test_a_ray_executor_without_one_passed_in_is_refused(world: World):
    cfg = CurateConfig(queries=world.fx.query_set, index=str(world.index), size=N, out=str(world.root / "no-ray"),
                       executor="ray")
    with pytest.raises(ValueError, match="make_executor"):
        curate(cfg)


# Every map of the Ray executor starts its actors anew (seconds each), and a run maps its tasks once a backfill
# round: the executors are compared on a smaller run than N, with fewer rounds but the same kinds of task
RAY_N = 18


@pytest.mark.slow
def test_local_and_ray_executors_write_identical_shards(world: World, local_ray):
    from jobs.executors import RayExecutor

    local, out = world.root / f"local-{RAY_N}", world.root / "ray"
    m = _run(world, local, size=RAY_N)
    c = m["counts"]   # what the run does on the actors: retrieve, remove a planted duplicate and a leak, backfill
    assert c["removed_duplicate"] >= 1 and c["removed_leak"] >= 1 and c["backfilled"] >= 2 and c["rounds"] >= 3
    assert m["verified_pairs"] > 0 and c["written"] == RAY_N
    curate(cli.parse(_argv(world, out, RAY_N)), executor=RayExecutor(num_workers=2))
    assert _outputs(out) == _outputs(local)


def test_the_cli_builds_the_executor_the_config_names():
    from jobs.executors import LocalExecutor, RayExecutor

    cfg = cli.parse(["--queries", "q", "--index", "i", "--size", "1", "--out", "o"])
    assert isinstance(cli.build_executor(cfg), LocalExecutor)
    cfg = cli.parse(["--queries", "q", "--index", "i", "--size", "1", "--out", "o", "--executor", "ray",
                     "--num-workers", "3"])
    ex = cli.build_executor(cfg)
    assert isinstance(ex, RayExecutor) and ex.num_workers == 3 and cfg.num_workers == 3
