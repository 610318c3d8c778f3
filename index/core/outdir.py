"""Owned output directories: a run writes only into a directory that holds nothing but its own files.

`owned_dir(out, owner, inputs)` checks the directory before any work starts, then holds it for the run:

- refuses an ``out`` that is a file, that is equal to or inside one of the run's inputs (``--out`` equal
  to ``--index``, inside the gallery, ...) or that cannot be written;
- refuses an ``out`` holding files the command does not write (they are listed, never touched) or one
  marked as written by another command;
- takes an exclusive lock (``fcntl.flock`` on ``.vfm-owner.lock``): a second run into the same directory
  fails at once, naming the process that holds it;
- removes the old done record (the manifest) before anything new is written, so an interrupted
  rerun never leaves a finished-looking directory over a mix of old and new files;
- removes the temporary files of killed runs (``.<name>.<random>.tmp``, `index.core.atomic.atomic_path`);
- writes ``.vfm-owner.json`` once (the command, the first run's id and process), the marker of what wrote
  the directory; the lock file names the run holding it now;
- removes the directory again when it created it and the run failed before writing anything.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import re
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from index.core.atomic import CODE_VERSION, write_json
from index.core.errors import UserError

MARKER = ".vfm-owner.json"
LOCK = ".vfm-owner.lock"
TEMP_RE = r"\..+\.tmp"          # index.core.atomic.atomic_path's temporary names
MAX_LISTED = 20


class OutputDirError(UserError):
    """An output directory that cannot be used: foreign files, an input, in use, not writable."""


@dataclass(frozen=True)
class Owner:
    """What a command writes at the top of its output directory.

    `names`: regular expressions a top-level entry's whole name must match (a directory's name
    covers everything under it); `done_record`: the file written last, whose presence means the
    output is complete. It is removed when the run takes the directory, or with `lazy` only right
    before the run's first write (`invalidate`), so a run refused before it writes anything (say, a
    rerun with another config) leaves a finished directory finished.
    """
    command: str
    names: tuple[str, ...]
    done_record: str
    lazy: bool = False

    def owns(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.names + (re.escape(MARKER), re.escape(LOCK), TEMP_RE))


def owning_also(owner: Owner, out: str | os.PathLike, paths: Iterable[str | os.PathLike | None]) -> Owner:
    """`owner` that also owns the top-level entries of `out` these paths (a cache directory, say) lie in."""
    root, extra = _resolved(out), []
    for p in paths:
        if p is not None and root in _resolved(p).parents:
            extra.append(re.escape(_resolved(p).relative_to(root).parts[0]))
    return dataclasses.replace(owner, names=owner.names + tuple(extra)) if extra else owner


def pattern_regex(pattern: str) -> str:
    """The regex of a printf-style file pattern (``transfer-%06d.tar`` -> ``transfer-\\d{6}\\.tar``)."""
    parts = re.split(r"%0?(\d*)d", pattern)
    out = []
    for i, part in enumerate(parts):
        out.append(re.escape(part) if i % 2 == 0 else (r"\d{%s,}" % part if part else r"\d+"))
    return "".join(out)


def _resolved(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(p))).resolve()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_out_dir(out: str | os.PathLike, owner: Owner,
                  inputs: Mapping[str, str | os.PathLike | Iterable[str | os.PathLike]] | None = None) -> Path:
    """The resolved output directory, after every check that needs no lock; nothing is created.

    `inputs`: what the run reads, by the name a message should use (``"--index"``, ``"the gallery"``):
    a path or several. ``out`` may be neither equal to nor inside any of them.
    """
    path = _resolved(out)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{owner.command}: output {out} is a file, not a directory")
    for what, paths in (inputs or {}).items():
        for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths):
            root = _resolved(p)
            if _inside(path, root):
                where = "is" if path == root else "is inside"
                raise OutputDirError(f"output {out} {where} {what} ({p}); write the output to a directory of "
                                     "its own, outside every input")
    _check_writable(path, out)
    if path.is_dir():
        _check_contents(path, owner)
    return path


def _check_writable(path: Path, shown: str | os.PathLike) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputDirError(f"output {shown}: {probe} is a file, so the directory cannot be created")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".vfm-write-probe.", suffix=".tmp", dir=probe)
    except OSError as e:
        raise OutputDirError(f"output {shown} is not writable ({probe}: {os.strerror(e.errno or errno.EACCES)})") \
            from None
    os.close(fd)
    os.unlink(tmp)


def _check_contents(path: Path, owner: Owner) -> None:
    marker = read_marker(path)
    if marker is not None and marker.get("command") != owner.command:
        raise OutputDirError(f"{path} was written by {marker.get('command')!r} (run {marker.get('run_id')}); "
                             f"{owner.command} writes only into a new directory or one it wrote itself")
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir() if not owner.owns(p.name))
    if foreign:
        shown = ", ".join(foreign[:MAX_LISTED]) + (f" and {len(foreign) - MAX_LISTED} more"
                                                   if len(foreign) > MAX_LISTED else "")
        raise OutputDirError(f"output {path} holds {len(foreign)} file(s) {owner.command} did not write: {shown}; "
                             "they are left untouched: move them away or choose another output directory")


def read_marker(path: str | os.PathLike) -> dict | None:
    p = Path(path) / MARKER
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"command": None, "run_id": "unreadable marker"}


def invalidate(path: str | os.PathLike, done_record: str) -> None:
    """Remove the directory's done record: from now on its contents are being changed."""
    (Path(path) / done_record).unlink(missing_ok=True)


def clean_temp_files(path: Path) -> list[Path]:
    """Remove the temporary files killed runs left anywhere under `path` (the lock is held)."""
    removed = []
    for d, _, files in os.walk(path):
        for f in files:
            if re.fullmatch(TEMP_RE, f):
                p = Path(d) / f
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


@dataclass
class OwnedDir:
    path: Path
    owner: Owner
    run_id: str
    created: bool
    cleaned: int = 0   # stale temporary files removed


def _lock(path: Path, owner: Owner) -> int:
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            holder = json.loads((path / LOCK).read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        raise OutputDirError(f"{path} is in use by another {owner.command} run (pid {holder.get('pid', '?')} on "
                             f"{holder.get('host', '?')}, run {holder.get('run_id', '?')}); wait for it to finish "
                             "or choose another output directory") from None
    return fd


def _run_info(owner: Owner, run_id: str) -> dict:
    return {"command": owner.command, "run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
            "code_version": CODE_VERSION,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _mark(path: Path, fd: int, owner: Owner, run_id: str) -> None:
    """The lock file says who holds the directory now; the marker (written once, by the first run)
    what wrote it."""
    info = json.dumps(_run_info(owner, run_id)).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    if read_marker(path) is None:
        write_json(path / MARKER, _run_info(owner, run_id))


def _only_bookkeeping(path: Path) -> bool:
    return all(p.name in (MARKER, LOCK) or re.fullmatch(TEMP_RE, p.name) for p in path.iterdir())


@contextlib.contextmanager
def owned_dir(out: str | os.PathLike, owner: Owner,
              inputs: Mapping[str, str | os.PathLike | Iterable[str | os.PathLike]] | None = None
              ) -> Iterator[OwnedDir]:
    """Check, create, lock and mark `out` for one run of `owner.command` (see the module docstring)."""
    path = check_out_dir(out, owner, inputs)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    fd = _lock(path, owner)
    try:
        _check_contents(path, owner)   # again, now that no other run can change it
        if not owner.lazy:
            invalidate(path, owner.done_record)
        cleaned = len(clean_temp_files(path))
        run = OwnedDir(path=path, owner=owner, run_id=uuid.uuid4().hex[:16], created=created, cleaned=cleaned)
        _mark(path, fd, owner, run.run_id)
        try:
            yield run
        except BaseException:
            if created and _only_bookkeeping(path):
                for p in path.iterdir():
                    p.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
    finally:
        os.close(fd)   # releases the lock


def pattern_dirs(patterns: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """The directories a set of paths/globs reads from: a directory itself, a file's or a glob's
    directory (the part before the first wildcard), e.g. the gallery of ``gallery/*.tar``."""
    items = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    out = []
    for p in map(str, items):
        head = re.split(r"[*?\[{]", p, maxsplit=1)[0]
        if head != p:                          # a glob: up to the last separator before the wildcard
            out.append(os.path.dirname(head) or ".")
        elif os.path.isdir(p):
            out.append(p)
        else:
            out.append(os.path.dirname(os.path.abspath(p)))
    return out
