"""Typed configuration keys: a schema of `Key`s checks a YAML mapping (types, ranges, choices, unknown
keys) and fills defaults; every error is one line naming where the value came from (`Origins`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from util.errors import ConfigError

REQUIRED = object()


@dataclass(frozen=True)
class Key:
    """One config key: its kind (int, float, bool, str, choice, size), default and allowed range."""

    kind: str
    default: Any = None
    lo: Optional[float] = None          # inclusive lower bound
    hi: Optional[float] = None          # inclusive upper bound
    lo_open: bool = False               # lower bound exclusive
    hi_open: bool = False               # upper bound exclusive
    choices: tuple = ()
    nullable: bool = False

    def allowed(self) -> str:
        if self.kind == "bool":
            return "true or false (YAML booleans, unquoted)"
        if self.kind == "choice":
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind == "size":
            return "an image size: an integer >= 8, or [1, 3, H, W] with H = W"
        if self.kind == "str":
            return "a string"
        noun = "an integer" if self.kind == "int" else "a number"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return noun + (" " + " and ".join(parts) if parts else "") + (" or null" if self.nullable else "")

    def check(self, value: Any) -> Any:
        """The value, converted; raises ValueError (with no location) when it is not allowed."""
        if value is None:
            if self.nullable:
                return None
            raise ValueError
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if self.kind in ("int", "float"):
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, str):  # YAML 1.1 reads 1e4 as a string
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError from None
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError
            if self.kind == "int":
                if float(value) != int(value):
                    raise ValueError
                value = int(value)
            else:
                value = float(value)
            if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
                raise ValueError
            if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
                raise ValueError
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError
            return value
        if self.kind == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
        if self.kind == "size":
            if isinstance(value, int) and not isinstance(value, bool) and value >= 8:
                return value
            if (isinstance(value, list) and len(value) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                    for v in value)
                    and value[2] == value[3] and value[2] >= 8):
                return value[-1]
            raise ValueError
        raise AssertionError(self.kind)


def int_key(default=REQUIRED, lo=None, hi=None, nullable=False):
    return Key("int", default, lo=lo, hi=hi, nullable=nullable)


def float_key(default=REQUIRED, lo=None, hi=None, lo_open=False, hi_open=False, nullable=False):
    return Key("float", default, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, nullable=nullable)


def bool_key(default):
    return Key("bool", default)


def choice_key(choices, default=REQUIRED, nullable=False):
    return Key("choice", default, choices=tuple(choices), nullable=nullable)


class Origins:
    """Where each value came from: a file, or an override given on the command line."""

    def __init__(self, default: str):
        self.default = default
        self.by_path: dict[tuple, str] = {}

    def of(self, *path) -> str:
        for n in range(len(path), 0, -1):
            if path[:n] in self.by_path:
                return self.by_path[path[:n]]
        return self.default


def bad_value(where: str, key: str, value: Any, spec: Key) -> ConfigError:
    return ConfigError(f"{where}: {key} = {value!r} is not allowed; use {spec.allowed()}")


def check_block(block: Any, schema: dict, origins: Origins, path: tuple, label: str) -> dict:
    """Check a mapping against `schema`: unknown keys, required keys, types and ranges; fills defaults."""
    where = origins.of(*path)
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: '{label}' must be a mapping of keys (key: value lines indented under "
                          f"'{label}:'), got {type(block).__name__} {block!r}; valid keys: {', '.join(schema)}")
    unknown = [k for k in block if k not in schema]
    if unknown:
        where = origins.of(*path, unknown[0])
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} in '{label}'; "
                          f"valid keys: {', '.join(schema)}")
    out = {}
    for key, spec in schema.items():
        if key not in block:
            if spec.default is REQUIRED:
                raise ConfigError(f"{where}: '{label}' is missing the key '{key}' ({spec.allowed()})")
            out[key] = spec.default
            continue
        try:
            out[key] = spec.check(block[key])
        except ValueError:
            raise bad_value(origins.of(*path, key), f"{label}.{key}", block[key], spec) from None
    return out
