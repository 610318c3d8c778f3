"""One generic name -> object registry, used for encoders, query sets, selectors and methods.

A duplicate name raises (silently overwriting a key hides bugs); an unknown name raises with the
valid names and the closest match.
"""
from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

from index.core.errors import ConfigError, UserError

T = TypeVar("T")


class UnknownNameError(UserError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """`reg.register("a", obj)` or as a decorator `@reg.register("a")`."""
        if obj is None:
            def deco(o: T) -> T:
                self.register(name, o)
                return o
            return deco
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self._items), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Valid names: {', '.join(sorted(self._items))}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def choice(kind: str, value: str, valid: list[str] | tuple[str, ...]) -> str:
    """Validate a plain option value, raising with the valid choices."""
    if value not in valid:
        raise ConfigError(f"unknown {kind} {value!r}; valid choices: {', '.join(valid)}")
    return value

