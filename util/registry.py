"""Registries: names (as written in a YAML file) to classes, where an entry may be lazy.

A lazy entry is a string "package.module:Class", imported the first time the name is used, so a
registry can list an extension (the nonlinear blur of `bkse/`, the latent and consistency priors)
without its defining module importing it: extensions depend on the registry's module, never the
other way round. A class that registers itself (the decorator) under a name whose lazy entry names
that very class replaces the entry.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping


class Registry(Mapping):
    """`registry[name]` is the class (importing a lazy entry); iteration gives the names in registration order."""

    def __init__(self, kind: str, lazy: Mapping[str, str] | None = None):
        self.kind = kind
        self._entries: dict[str, type | str] = dict(lazy or {})

    def register(self, name: str) -> Callable[[type], type]:
        """Decorator: `@registry.register("name")` on a class; sets `cls.name`."""

        def wrapper(cls: type) -> type:
            existing = self._entries.get(name)
            if existing is not None and existing is not cls and existing != f"{cls.__module__}:{cls.__qualname__}":
                raise NameError(f"{self.kind} '{name}' is already registered")
            cls.name = name
            self._entries[name] = cls
            return cls

        return wrapper

    def __getitem__(self, name: str) -> type:
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            cls = getattr(importlib.import_module(module), attr)
            cls.name = name
            self._entries[name] = entry = cls
        return entry

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def build(self, name: str, params: dict):
        """`cls(**params)` for the class registered as `name`; unknown names or parameters raise ValueError
        listing the valid ones (parameters are those of the class's `__init__`)."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} '{name}'; valid names: {', '.join(sorted(self))}")
        cls = self[name]
        valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
        unknown = [k for k in params if k not in valid]
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for {self.kind} '{name}'; "
                             f"valid parameters: {', '.join(valid)}")
        return cls(**params)
