"""One lazy registry for everything chosen by name: importance metrics, compensations, model
families, runtimes and exporters.

A registry maps a name to a `"module:object"` string and imports the module only when the name
is asked for, so listing the names (for `compress --help`) imports no torch. Unknown names fail
with one sentence that lists the known ones.

    IMPORTANCE = Registry("importance metric", {"flap": "compressor.prune.importance:flap"})
    IMPORTANCE.get("flap")   # imports compressor.prune.importance, returns its `flap`
    IMPORTANCE.names()       # ["flap"], nothing imported
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

from .errors import UserError


class Registry:
    def __init__(self, kind: str, entries: dict[str, str] | None = None, aliases: dict[str, str] | None = None):
        self.kind = kind  # what the names are, for error messages ("importance metric")
        self._entries: dict[str, str] = dict(entries or {})
        self._aliases: dict[str, str] = dict(aliases or {})  # e.g. "auto" -> the benchmark winner
        self._loaded: dict[str, Any] = {}

    def add(self, name: str, target: str) -> None:
        """Register `name` as the object at `target` ("package.module:object")."""
        if ":" not in target:
            raise ValueError(f"A registry entry is 'module:object', got '{target}'.")
        self._entries[name] = target
        self._loaded.pop(name, None)

    def names(self) -> list[str]:
        """The registered names, sorted (aliases excluded); imports nothing."""
        return sorted(self._entries)

    def resolve(self, name: str) -> str:
        """The registered name `name` stands for (an alias resolved), or one sentence listing the known names."""
        name = self._aliases.get(name, name)
        if name not in self._entries:
            known = ", ".join([*self._aliases, *self.names()])
            raise UserError(f"Unknown {self.kind} '{name}' (known: {known}).")
        return name

    def get(self, name: str) -> Any:
        name = self.resolve(name)
        if name not in self._loaded:
            module, _, attr = self._entries[name].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), attr)
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
