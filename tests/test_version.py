"""CODE_VERSION (in every manifest and fingerprint) is the package's version, installed or not."""
from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import index.core.atomic as atomic

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _declared() -> str:
    return re.search(r'^version\s*=\s*"([^"]+)"', PYPROJECT.read_text(), re.M).group(1)


def test_code_version_is_the_declared_package_version():
    assert atomic.CODE_VERSION == atomic.code_version() == _declared()


def test_code_version_from_pyproject_when_the_package_is_not_installed(monkeypatch):
    def not_installed(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(atomic, "version", not_installed)
    assert atomic.code_version() == _declared()
    monkeypatch.setattr(atomic, "version", lambda name: "9.9.9")
    assert atomic.code_version() == "9.9.9"
