"""Configs as frozen dataclasses, built from mappings by plain field names.

    from_mapping(IndexConfig, yaml.safe_load(...), "jobs/demo.yaml")
    read_mapping("jobs/demo.yaml")          # a YAML/JSON file's top-level mapping, with clear errors

One loader for every config dataclass (IndexConfig, CropConfig, FaissConfig, CurateConfig,
DistillConfig): unknown keys raise with the valid ones before any work starts; a field whose type is
a dataclass takes a nested mapping; lists become tuples (YAML and JSON have no tuples, and frozen
configs keep sequences as tuples so they hash and compare). Validation of values stays in each
config's ``__post_init__``, so a config built in code is checked the same way.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from index.core.errors import ConfigError, MissingInputError

C = TypeVar("C")


def from_mapping(cls: type[C], data: Mapping[str, Any] | None, where: str = "config") -> C:
    """Build the dataclass ``cls`` from ``data``, refusing unknown keys (and naming the valid ones)."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of field names to values; got a {type(data).__name__}")
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, v in data.items():
        nested = hints.get(name)
        if dataclasses.is_dataclass(nested) and isinstance(v, Mapping):
            v = from_mapping(nested, v, f"{where}.{name}")
        elif isinstance(v, list):
            v = tuple(v)
        values[name] = v
    return cls(**values)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML (or JSON) config file holds; an empty file is an empty mapping."""
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of config fields; it holds a YAML {type(data).__name__}")
    return data


def check_fraction(name: str, v: Any, optional: bool = False) -> None:
    """Refuse a value that is not a number in (0, 1] (None allowed when optional); bools are not numbers."""
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise ConfigError(f"{name} must be a number in (0, 1]{' or null' if optional else ''}; got {v!r}")


def check_integer(name: str, v: Any, low: int, optional: bool = False) -> None:
    """Refuse a value that is not an integer >= low (None allowed when optional); bools are not integers."""
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"{name} must be an integer >= {low}{' or null' if optional else ''}; got {v!r}")
