"""Where files are: the repository root, the one path resolver and the one YAML reader.

A relative path is looked up in the working directory, then under the repository root (so the
shipped configs work from anywhere); a path found in neither is returned as given, so that the
error about it names the path the user wrote.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from util.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(path: str | os.PathLike) -> Path:
    """`path` (`~` expanded) if absolute or present relative to the cwd, else under the repository root if
    there, else as given."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.is_absolute() or p.exists():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


class _Loader(yaml.SafeLoader):
    """YAML's safe loader that also reads the official files' `!!python/tuple` tags, as lists."""


_Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))


def load_yaml(path: str | os.PathLike, what: str = "config", fix: str = "", empty_ok: bool = False) -> dict:
    """The mapping in the YAML file `path` (resolved as `resolve_path`); a ConfigError of one line
    (`what`, the file, the problem, then `fix` when given) when it is missing, unreadable, not YAML or
    not a mapping. An empty file is {} with `empty_ok`."""
    hint = f"; {fix}" if fix else ""
    p = resolve_path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file '{path}' not found" + (" (it is a folder)" if p.is_dir() else "") + hint)
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file '{path}' is not a text (YAML) file{hint or '; give a .yaml file'}") from None
    except OSError as exc:
        raise ConfigError(f"{what} file '{path}' cannot be read ({exc.strerror or exc}){hint}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"{what} file '{path}' is not valid YAML{at} ({problem}); fix the syntax") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file '{path}' must be a mapping of key: value lines, got a "
                          f"{type(data).__name__}{hint}")
    return data
