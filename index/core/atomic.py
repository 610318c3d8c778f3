"""Commit records: write under a temporary name, then rename; fingerprints for resume.

A reader never sees a truncated file under a final name. A stage writes its outputs first and its
`done` record last, so the presence of the record means the outputs are complete.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import signal
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

from index.core.errors import UserError

PACKAGE = "vfm-curate"


def code_version() -> str:
    """The installed package's version; from a source tree that is not installed (a `ray job submit
    --working-dir .` worker), the version in pyproject.toml, so fingerprints agree either way."""
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return found.group(1) if found else "0+unknown"


CODE_VERSION = code_version()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(obj: Any) -> str:
    """sha256 over the canonical JSON of a config/inputs description."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:32]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """Cheap stable digest of a large file: its size + sha256 of its first and last MiB. For files this
    project writes or weights it names; gallery shards are hashed whole (index.gallery.shard_digest)."""
    size = os.stat(path).st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:24]


KILL_AT_ENV = "VFM_KILL_AT"   # tests: "before:<glob>[#n]" / "after:<glob>[#n]" (see kill_point)
_commits: dict[str, int] = {}


def kill_point(when: str, final: Path) -> None:
    """Crash tests: with ``VFM_KILL_AT=after:last.pt#2`` the process kills itself with SIGKILL right
    after its 2nd commit of a file named like the glob (``before:``: with the data written under the
    temporary name, not yet renamed), as a power cut or ``kill -9`` there would."""
    spec = os.environ.get(KILL_AT_ENV)
    if not spec or not spec.startswith(when + ":"):
        return
    glob, _, nth = spec[len(when) + 1:].partition("#")
    if fnmatch.fnmatch(final.name, glob):
        _commits[spec] = _commits.get(spec, 0) + 1
        if _commits[spec] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def current_umask() -> int:
    """The process umask, read without changing it where /proc says it (Linux), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.fchmod(fd, 0o666 & ~current_umask())   # mkstemp's 0600 would ignore the umask
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        kill_point("before", final)
        os.replace(tmp_path, final)
        kill_point("after", final)
    except OSError as e:
        if e.filename is None:   # a failed write() names no file: say which output it was
            e.filename = str(final)
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


class FingerprintMismatch(UserError, RuntimeError):
    pass


def check_done(done_path: str | os.PathLike, expected_fingerprint: str) -> dict | None:
    """Return the done record if it exists and matches; None if absent; raise if it differs.

    A rerun must never silently reuse outputs made from other inputs, nor silently recompute them.
    """
    done_path = Path(done_path)
    if not done_path.exists():
        return None
    record = read_json(done_path)
    if record.get("fingerprint") != expected_fingerprint:
        raise FingerprintMismatch(
            f"{done_path} was written with a different configuration "
            f"(fingerprint {record.get('fingerprint')} != {expected_fingerprint}); "
            f"use a new output directory or delete {done_path.parent} to rebuild it"
        )
    return record
