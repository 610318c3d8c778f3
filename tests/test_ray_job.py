"""The indexing stage as a real Ray job: `ray start --head`, then `ray job submit ... curation/build_index.py`.

The head is started from the project's virtualenv (its bin/ first on PATH), so the job's `python` is
the venv's. The working dir is a minimal copy of the packages the job imports plus its config. The head
runs with `--block` in its own session and is stopped by signalling that session only: `ray stop`
would stop every Ray instance on the machine, not just this one.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from index import store
from index.build import build_gallery_index
from index.config import load_index_config
from index.core import contract

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
JOB_PACKAGES = ("index", "curation", "jobs")

pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}; see {head.args}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"Ray dashboard at {url} did not come up in {timeout} s")


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM the blocking `ray start` (it shuts its node down), then SIGKILL what is left of its session."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=10)


@pytest.fixture
def tiny_job(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_index_build import CROPS, make_gallery
    finally:
        sys.path.pop(0)
    gallery = make_gallery(tmp_path / "gallery")
    cfg = {"gallery": str(gallery / "*.tar"), "encoders": ["test-tiny-timm"], "crops": CROPS.to_dict(),
           "batch_size": 4, "faiss": {"shards_per_group": 2}}
    work = tmp_path / "work"
    for pkg in JOB_PACKAGES:
        shutil.copytree(ROOT / pkg, work / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return work, tmp_path


def test_index_built_by_ray_job_submit(tiny_job):
    work, tmp = tiny_job
    gcs, dash, client, agent_listen, agent_grpc, metrics, runtime_env = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths have a length limit
    # a throw-away cluster on loopback: no token authentication (it would need a token file in $HOME)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    head_log = open(tmp / "ray-head.log", "wb")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
         "--disable-usage-stats", "--temp-dir", temp_dir, "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_listen),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
         "--runtime-env-agent-port", str(runtime_env)],
        env=env, cwd=tmp, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp / "index-ray"
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(url, head)
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(work), "--",
             # Ray quotes each word of the entrypoint, so the `&&` goes through `sh -c`
             "sh", "-c", "python -c 'import sys; print(\"JOB PYTHON\", sys.executable)' && "
             f"python curation/build_index.py --config tiny.yaml --out {shlex.quote(str(out))} --num-workers 2"],
            env=env, cwd=tmp, capture_output=True, text=True, timeout=400)
    finally:
        _stop(head)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-4000:]
    assert f"JOB PYTHON {BIN / 'python'}" in log or f"JOB PYTHON {sys.executable}" in log, log[-2000:]
    assert "Connecting to existing Ray cluster" in log  # the job ran on this cluster's actors, not in-process
    assert "index: 11 images read, skipped 1 (corrupt 1), 33 vectors written" in log

    manifest = json.loads((out / "manifest.json").read_text())
    # The job's driver runs with OMP_NUM_THREADS=1 (set by Ray), so its actors run torch with one thread;
    # a local run with one thread then writes the same bytes.
    local_out = tmp / "index-local"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = build_gallery_index(load_index_config(work / "tiny.yaml"), local_out)
    finally:
        torch.set_num_threads(threads)
    for key in ("num_images", "num_vectors", "skipped", "encoders", "index_factory", "dim"):
        assert manifest[key] == json.loads(json.dumps(local[key])), key
    assert [(s["name"], s["offset"], s["num_vectors"], s["fingerprint"]) for s in manifest["shards"]] == \
        [(s["name"], s["offset"], s["num_vectors"], s["fingerprint"]) for s in local["shards"]]
    # the file says local; under the job RAY_ADDRESS makes Ray the default, and the manifest records what ran
    assert manifest["config"]["executor"] == "ray"
    for s in manifest["shards"]:
        assert store.load_rows(out, s["name"]) == store.load_rows(local_out, s["name"])
        for path in (lambda d: store.features_path(d, s["name"], "test-tiny-timm"),
                     lambda d: store.shard_dir(d, s["name"]) / contract.ROWS_FILE):
            assert path(out).read_bytes() == path(local_out).read_bytes(), path(out)
