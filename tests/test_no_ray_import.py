"""Library first, cluster second: every module of index/, curation/ and distill/ imports without Ray."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("index", "curation", "distill")

SCRIPT = r"""
import importlib, importlib.abc, json, pkgutil, sys, traceback

BLOCK = sys.argv[1] == "block"  # "free": nothing blocked (to debug a failure by hand)
attempts = []

class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            attempts.append("".join(traceback.format_stack(limit=8)[:-1]))
            raise ImportError(f"ray is blocked in this test (import of {name!r})")
        return None

if BLOCK:
    sys.meta_path.insert(0, NoRay())
    try:
        import ray  # noqa: F401
        block_works = False
    except ImportError:
        block_works = True
    attempts.clear()
else:
    block_works = None

imported, failures = [], {}
for pkg in sys.argv[2:]:
    mod = importlib.import_module(pkg)
    imported.append(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        try:
            importlib.import_module(info.name)
            imported.append(info.name)
        except BaseException:  # noqa: BLE001 - reported to the test
            failures[info.name] = traceback.format_exc(limit=4)
print(json.dumps({"block_works": block_works, "imported": imported, "failures": failures,
                  "ray_attempts": attempts, "ray_loaded": "ray" in sys.modules and sys.modules["ray"] is not None}))
"""


def _run(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode, *LIBRARY], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _library_modules() -> set[str]:
    names = set()
    for pkg in LIBRARY:
        for p in (ROOT / pkg).rglob("*.py"):
            rel = p.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            names.add(".".join(parts))
    return names


@pytest.mark.slow
def test_library_imports_with_ray_blocked():
    report = _run("block")
    assert report["block_works"] is True  # `import ray` really fails in the subprocess
    assert report["failures"] == {}, "\n\n".join(f"{m}:\n{tb}" for m, tb in report["failures"].items())
    assert set(report["imported"]) == _library_modules()
    assert {"index.embed", "index.build", "curation.build_index"} <= set(report["imported"])
    # no module even tried (a guarded `try: import ray` would load ray whenever it is installed)
    assert report["ray_attempts"] == [], "tried to import ray:\n" + report["ray_attempts"][0]
