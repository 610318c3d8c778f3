"""The indexing stage as a real Ray job, as README's "A Ray cluster" runs it: `ray start --head --block`
with token authentication, then `ray job submit ... -- <venv python> curation/build_index.py`.

The head is started by the virtualenv's `ray` without the virtualenv on PATH, as a user who did not
activate it would, so the job finds the project's python only because the entrypoint names it. The
token is a file of the test's own (RAY_AUTH_TOKEN_PATH), never ~/.ray/auth_token. The working dir is a
minimal copy of the packages the job imports plus its config. The head is stopped by SIGTERM to its own
`ray start --block` process (it runs in a session of its own, killed too should anything be left):
`ray stop` would stop every Ray instance on the machine, not just this one.
"""
from __future__ import annotations

import json
import os
import secrets
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


def _wait_for_dashboard(url: str, head: subprocess.Popen, token: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}; see {head.args}")
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
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
    token = tmp / "ray-token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != BIN)
    env = {**os.environ, "PATH": path, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token)}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "VIRTUAL_ENV"):
        env.pop(name, None)
    head_log = open(tmp / "ray-head.log", "wb")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
         "--disable-usage-stats", "--temp-dir", temp_dir, "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_listen),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
         "--runtime-env-agent-port", str(runtime_env)],
        # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM the head shuts down at once instead of draining
        # (which waits out its 30 s for the job's idle workers to return their leases)
        env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}, cwd=tmp, stdout=head_log,
        stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp / "index-ray"
    url = f"http://127.0.0.1:{dash}"
    python = shlex.quote(str(BIN / "python"))
    try:
        _wait_for_dashboard(url, head, token.read_text())
        # a client without RAY_AUTH_MODE=token sends no token, and is refused
        bare = subprocess.run([str(BIN / "ray"), "job", "list", "--address", url],
                              env={k: v for k, v in env.items() if not k.startswith("RAY_AUTH")},
                              cwd=tmp, capture_output=True, text=True, timeout=120)
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(work), "--",
             # Ray quotes each word of the entrypoint, so the `&&` goes through `sh -c`; a bare `python`
             # is the head's PATH's, so the entrypoint names the virtualenv's
             "sh", "-c", "python -c 'import sys; print(\"BARE PYTHON\", sys.executable)'; "
             f"{python} -c 'import sys; print(\"JOB PYTHON\", sys.executable)' && "
             f"{python} curation/build_index.py --config tiny.yaml --out {shlex.quote(str(out))} --num-workers 2"],
            env=env, cwd=tmp, capture_output=True, text=True, timeout=400)
    finally:
        _stop(head)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert bare.returncode != 0 and "AuthenticationError" in bare.stdout + bare.stderr, bare.stderr[-2000:]
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-4000:]
    assert f"JOB PYTHON {BIN / 'python'}\n" in log, log[-2000:]
    assert f"BARE PYTHON {BIN / 'python'}\n" not in log, log[-2000:]   # the head's PATH has no venv
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
