"""Fault tests: what each command refuses before any work, and what a crash, a full disk, a second run
or a user's files in the output leave behind, and what a rerun makes of it.

One tiny gallery and index (`fixtures_gallery`, the random-init `test-tiny-timm` encoder) serve every
test; curate runs with the paper's fixed thresholds and no verification, so no calibration runs.
Crashes are real: a subprocess kills itself with SIGKILL at a named commit (``VFM_KILL_AT``, see
`index.core.atomic.kill_point`).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from curation import cli as curate_cli
from curation.build_index import main as build_index_main
from curation.pipeline import OWNER
from curation.querysets import get_query_set
from distill import cli as distill_cli
from index.core import contract
from index.core.atomic import KILL_AT_ENV
from index.cli import download_main
from index.core.outdir import LOCK, MARKER
from index.gallery_index import GalleryIndex

from fixtures_gallery import SHOTS, Fixture, build_fixture, curated_outputs, write_index_config

REPO = Path(__file__).resolve().parents[1]
FIXED = ("--dedup-threshold", "0.99", "--leak-threshold", "0.95", "--verify", "none")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class World:
    root: Path
    fx: Fixture
    config: Path
    index: Path
    cache: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("faults")
    fx = build_fixture(root)
    config = write_index_config(root / "idx.yaml", str(fx.gallery / "*.tar"), ["test-tiny-timm"], crop_size=32)
    old = os.umask(0o022)
    try:
        assert build_index_main(["--config", str(config), "--out", str(root / "idx"), "--threads", "1"]) == 0
    finally:
        os.umask(old)
    return World(root, fx, config, root / "idx", root / "cache")


def curate_args(w: World, out: Path, *extra: str, index: Path | None = None) -> list[str]:
    return ["--queries", w.fx.query_set, "--index", str(index or w.index), "--size", "12", "--out", str(out),
            "--cache-dir", str(w.cache), "--shard-size", "5", "--threads", "1", *FIXED, *extra]


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra,
            "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}


def run_module(module: str, args: list[str], preexec=None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          env=subprocess_env(**env), preexec_fn=preexec, timeout=600)


@pytest.fixture(scope="module")
def reference(world: World) -> Path:
    """An uninterrupted curate run, written under umask 022."""
    out = world.root / "reference"
    old = os.umask(0o022)
    try:
        assert curate_cli.main(curate_args(world, out)) == 0
    finally:
        os.umask(old)
    return out


def listing(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    at = err.rfind(f"{prog}: error: ")   # progress bars may come first
    assert at >= 0 and "Traceback" not in err, err
    return err[at:].split("\n")[0]


# ---------------------------------------------------------------- output directories are owned

def test_user_files_in_out_are_refused_and_left_untouched(world: World, capsys):
    out = world.root / "users-dir"
    out.mkdir()
    (out / "transfer-my-hand-labelled-set.tar").write_bytes(b"my labels")
    (out / "notes.txt").write_text("keep me")
    before = listing(out)
    assert curate_cli.main(curate_args(world, out)) == 2
    err = error_line(capsys, "curate")
    assert "transfer-my-hand-labelled-set.tar" in err and "notes.txt" in err and "did not write" in err
    assert listing(out) == before


def test_out_equal_to_or_inside_an_input_is_refused_and_the_index_still_works(world: World, capsys):
    before = listing(world.index)
    assert curate_cli.main(curate_args(world, world.index)) == 2
    assert "is --index" in error_line(capsys, "curate")
    assert listing(world.index) == before
    gindex = GalleryIndex(world.index)
    assert gindex.search(torch.randn(1, gindex.manifest["dim"]).numpy(), 3)[1].shape == (1, 3)
    inside = world.fx.gallery / "curated"
    assert curate_cli.main(curate_args(world, inside)) == 2
    assert "inside the gallery" in error_line(capsys, "curate") and not inside.exists()
    assert build_index_main(["--config", str(world.config), "--out", str(world.fx.gallery / "idx")]) == 2
    assert "inside the gallery" in error_line(capsys, "build-index")


def test_a_second_run_into_a_dir_in_use_fails_at_once(world: World, reference: Path, capsys):
    out = world.root / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from curation.pipeline import OWNER; from index.core.outdir import owned_dir\n"
         f"with owned_dir({str(out)!r}, OWNER):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        assert curate_cli.main(curate_args(world, out)) == 2
        err = error_line(capsys, "curate")
        assert "in use by another curate run" in err and f"pid {holder.pid}" in err
        assert not (out / contract.MANIFEST_FILE).exists() and not list(out.glob("*.tar"))
    finally:
        holder.communicate("")
    assert curate_cli.main(curate_args(world, out)) == 0
    assert curated_outputs(out) == curated_outputs(reference)


def test_a_killed_rerun_with_other_settings_leaves_no_stale_manifest(world: World, reference: Path):
    out = world.root / "rerun-other"
    shutil.copytree(reference, out)
    proc = run_module("curation.cli", curate_args(world, out, "--seed", "1"),
                      **{KILL_AT_ENV: "after:transfer-*.tar"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / contract.MANIFEST_FILE).exists(), "the old manifest must not describe the new tars"
    assert curate_cli.main(curate_args(world, out)) == 0
    assert curated_outputs(out) == curated_outputs(reference)
    drawn = {q["id"] for q in json.loads((out / contract.QUERIES_DRAW_FILE).read_text())["queries"]}
    for tar in out.glob("transfer-*.tar"):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    assert {h["query"] for h in json.load(tf.extractfile(m))["queries"]} <= drawn


def test_files_are_created_with_the_umask_mode(reference: Path, world: World):
    for p in [reference / contract.MANIFEST_FILE, reference / contract.REPORT_FILE,
              reference / contract.QUERIES_DRAW_FILE, *reference.glob("*.tar"), world.index / contract.MANIFEST_FILE,
              *world.index.glob("faiss/*.index")]:
        assert p.stat().st_mode & 0o777 == 0o644, p


# ---------------------------------------------------------------- kill -9, then rerun

@pytest.mark.parametrize("point", ["after:filter.json", "before:transfer-*.tar#2"])
def test_curate_killed_then_rerun_equals_an_uninterrupted_run(world: World, reference: Path, point: str):
    out = world.root / f"killed-{point.split(':')[1].replace('*', 'x').replace('#', '-')}"
    proc = run_module("curation.cli", curate_args(world, out), **{KILL_AT_ENV: point})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / contract.MANIFEST_FILE).exists()
    assert curate_cli.main(curate_args(world, out)) == 0
    assert curated_outputs(out) == curated_outputs(reference)
    assert not [p for p in out.rglob("*.tmp")], "stale temporary files are cleaned"


def _index_files(d: Path) -> dict[str, object]:
    files: dict[str, object] = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name not in (MARKER, LOCK):
            rel = str(p.relative_to(d))
            files[rel] = p.read_bytes() if p.suffix != ".json" else _no_seconds(json.loads(p.read_text()))
    return files


def _no_seconds(o):
    if isinstance(o, dict):
        return {k: _no_seconds(v) for k, v in o.items() if k not in ("seconds", "timings")}
    return [_no_seconds(v) for v in o] if isinstance(o, list) else o


@pytest.mark.parametrize("point", ["after:done.json#2", "before:group-*.index"])
def test_build_index_killed_then_rerun_equals_an_uninterrupted_run(world: World, point: str, tmp_path):
    out = tmp_path / "idx"
    proc = run_module("curation.build_index", ["--config", str(world.config), "--out", str(out)],
                      **{KILL_AT_ENV: point})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / contract.MANIFEST_FILE).exists()
    assert build_index_main(["--config", str(world.config), "--out", str(out), "--threads", "1"]) == 0
    got, want = _index_files(out), _index_files(world.index)
    got[contract.MANIFEST_FILE].pop("config"), want[contract.MANIFEST_FILE].pop("config")
    assert got == want


def distill_args(w: World, transfer: Path, out: Path, *extra: str) -> list[str]:
    return ["--method", "kd", "--transfer", str(transfer), "--queries", w.fx.query_set, "--out", str(out),
            "--teacher", "test-tiny-timm", "--student", "test-tiny-student", "--resolution", "16",
            "--batch-size", "4", "--transfer-epochs", "2", "--finetune-epochs", "2", "--probe-steps", "10",
            "--checkpoint-every", "1", "--no-progress", "--threads", "1", *extra]


def test_distill_killed_then_rerun_equals_an_uninterrupted_run(world: World, reference: Path, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert distill_cli.main(distill_args(world, reference, ref)) == 0
    proc = run_module("distill.cli", distill_args(world, reference, out), **{KILL_AT_ENV: "after:last.pt#3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "metrics.json").exists()
    assert distill_cli.main(distill_args(world, reference, out)) == 0
    a, b = (torch.load(d / "student.pt", weights_only=True) for d in (ref, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- Ctrl-C

def test_ctrl_c_prints_one_line_and_exits_130(world: World, reference: Path, tmp_path):
    out = tmp_path / "interrupted"
    args = distill_args(world, reference, out, "--transfer-epochs", "100000", "--log-level", "warning")
    proc = subprocess.Popen([sys.executable, "-m", "distill.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=subprocess_env())
    try:
        deadline = time.monotonic() + 300
        while not list(out.rglob("last.pt")):   # training: a periodic checkpoint is committed
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert err == "distill: stopped; rerun the same command to resume\n", err[-2000:]
    # the stack unwound: no temporary file is left, and the checkpoint a rerun resumes from is whole
    assert not (out / "metrics.json").exists() and not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))
    assert torch.load(next(out.rglob("last.pt")), weights_only=False)["step"] >= 1


# ---------------------------------------------------------------- a full disk

def test_a_full_disk_fails_cleanly_and_a_rerun_completes(world: World, reference: Path):
    out = world.root / "full-disk"
    limit = 8_000   # bytes per file: the query shards and the report are larger

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = run_module("curation.cli", curate_args(world, out), preexec=small_files)
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr[proc.stderr.rfind("curate: error: "):]   # after the progress bars
    assert err.startswith("curate: error: ") and "File too large" in err and "Traceback" not in proc.stderr, err
    assert not (out / contract.MANIFEST_FILE).exists() and not list(out.rglob("*.tmp"))
    for tar in out.glob("*.tar"):   # whatever was committed is complete
        with tarfile.open(tar) as tf:
            assert tf.getmembers()
    assert curate_cli.main(curate_args(world, out)) == 0
    assert curated_outputs(out) == curated_outputs(reference)


# ---------------------------------------------------------------- clear errors before any work

def _bad_index_config(w: World, tmp: Path, change: dict | list) -> Path:
    cfg = yaml.safe_load(w.config.read_text())
    if isinstance(change, list):
        cfg = change
    else:
        for k, v in change.items():
            if k.startswith("faiss."):
                cfg["faiss"][k.split(".", 1)[1]] = v
            else:
                cfg[k] = v
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("change,message", [
    (["a", "list"], "mapping of config fields"),
    ({"gallery": None}, "gallery must be"),
    ({"faiss.shards_per_group": 0}, "shards_per_group must be an integer >= 1"),
    ({"image_size": "big"}, "image_size must be an integer"),
    ({"device": "gpu0"}, "unknown device"),
    ({"faiss.factory": "IVF16,Bogus"}, "invalid faiss factory string"),
    ({"faiss.memory_budget_gb": -1}, "memory_budget_gb must be > 0"),
    ({"faiss.factory": "IVF65536,Flat"}, "needs at least 65536 training vectors"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"seed": "zero"}, "seed must be an integer"),
    ({"faiss.nprobe": 0}, "nprobe must be an integer >= 1"),
])
def test_build_index_config_errors(world: World, tmp_path, capsys, change, message):
    out = tmp_path / "idx"
    assert build_index_main(["--config", str(_bad_index_config(world, tmp_path, change)), "--out", str(out)]) == 2
    assert message in error_line(capsys, "build-index")
    assert not out.exists()


def _index_copy(w: World, tmp: Path, damage) -> Path:
    idx = tmp / "idx-copy"
    shutil.copytree(w.index, idx)
    damage(idx)
    return idx


def _rotate_row_tables(d: Path) -> None:
    """Every shard gets the next shard's row table (and line offsets), as a botched copy would."""
    shards = sorted(p for p in (d / "embeddings").iterdir())
    tables = {s: {f: (s / f).read_bytes() for f in ("rows.jsonl", "rows.offsets.npy")} for s in shards}
    for s, nxt in zip(shards, shards[1:] + shards[:1]):
        for f, data in tables[nxt].items():
            (s / f).write_bytes(data)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage,message", [
    (lambda d: _truncate(d / contract.MANIFEST_FILE), "manifest.json is not a complete index manifest"),
    (lambda d: [_truncate(p) for p in d.glob("embeddings/*/rows.jsonl")], "rows.jsonl is shorter than"),
    (lambda d: _rotate_row_tables(d), "belongs to another shard"),
    (lambda d: [p.write_bytes(b"not a faiss index" * 10) for p in d.glob("faiss/group-*.index")],
     "is not a readable faiss index"),
])
def test_curate_damaged_index_errors_name_the_file(world: World, reference: Path, tmp_path, capsys, damage, message):
    out = tmp_path / "out"
    assert curate_cli.main(curate_args(world, out, index=_index_copy(world, tmp_path, damage))) == 2
    assert message in error_line(capsys, "curate")


def test_curate_input_errors_come_before_any_work(world: World, tmp_path, capsys):
    out = tmp_path / "out"
    assert curate_cli.main(curate_args(world, out, "--leak-review", str(tmp_path / "missing.json"))) == 2
    assert "missing.json does not exist" in error_line(capsys, "curate") and not out.exists()
    assert curate_cli.main(curate_args(world, out, "--shard-size", "0")) == 2
    assert "shard_size must be an integer >= 1" in error_line(capsys, "curate")
    (tmp_path / "a-file").write_text("x")
    assert curate_cli.main(curate_args(world, tmp_path / "a-file")) == 2
    assert "is a file" in error_line(capsys, "curate")
    task = tmp_path / "task"
    shutil.copytree(world.fx.task, task)
    name = f"folder:{task}:{SHOTS}shot"
    bad = Path(get_query_set(name).queries[0].loader.args[0])   # a query image: read by the first stage
    bad.write_bytes(b"\x89PNG broken")
    args = curate_args(world, out)
    args[args.index("--queries") + 1] = name
    assert curate_cli.main(args) == 2
    assert f"{bad}: not a readable image" in error_line(capsys, "curate")
    assert not out.exists(), "a run that failed before writing anything leaves no directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_curate_read_only_out_is_refused(world: World, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert curate_cli.main(curate_args(world, ro / "out")) == 2
    assert "not writable" in error_line(capsys, "curate")


@pytest.mark.parametrize("extra,message", [
    (("--student", "no-such-student"), "unknown student 'no-such-student'"),
    (("--teacher", "no-such-teacher"), "no-such-teacher"),
    (("--resolution", "0"), "resolution must be an integer >= 8"),
    (("--transfer-steps", "0"), "transfer_steps must be an integer >= 1"),
    (("--lr", "-1"), "lr must be a finite number > 0"),
    (("--method", "kdd"), "Did you mean 'kd'"),
])
def test_distill_config_errors(world: World, reference: Path, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert distill_cli.main(distill_args(world, reference, out, *extra)) == 2
    assert message in error_line(capsys, "distill") and not out.exists()


def test_distill_refuses_a_query_set_other_than_the_curated_sets(world: World, reference: Path, tmp_path, capsys):
    args = distill_args(world, reference, tmp_path / "run")
    args[args.index("--queries") + 1] = f"folder:{world.fx.task}:2shot"
    assert distill_cli.main(args) == 2
    assert "differs from the query set the curated set" in error_line(capsys, "distill")
    assert distill_cli.main(distill_args(world, reference, reference / "run")) == 2
    assert "is inside --transfer" in error_line(capsys, "distill")


def test_download_errors(tmp_path, capsys):
    assert download_main(["--url-list", str(tmp_path / "urls.parquet"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in error_line(capsys, "download-gallery")


def test_a_second_owner_command_is_refused(world: World, reference: Path, capsys):
    """An index directory is not curate's: --out naming one (not the --index) is refused."""
    other = world.root / "other-index"
    shutil.copytree(world.index, other)
    assert curate_cli.main(curate_args(world, other)) == 2
    assert "written by 'build_index'" in error_line(capsys, "curate")
    assert OWNER.command == "curate"
