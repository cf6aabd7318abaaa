"""The registry of published numbers (tables/published.yaml): load it and check every entry.

A table has a title, a source (where its numbers come from), a protocol (images, image_size, sigma; seeds
and hardware optional) and rows. A row names its three config files, its published numbers (keys in
NUMBERS, null for a number the source does not give) and optionally dataset, flags, overrides, reference
(numbers shown, not recomputed) and note. A table without rows must say why in its note (the DCDP paper's
own Table 1: to be filled from the PDF). Every problem is a ConfigError naming the table, the row and the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from util.errors import ConfigError
from util.files import load_yaml

REGISTRY = Path(__file__).resolve().parent.parent / "tables" / "published.yaml"
NUMBERS = ("psnr", "psnr_std", "ssim", "ssim_std", "lpips", "lpips_std", "seconds_per_image", "nfe")
PROTOCOL_KEYS = ("images", "image_size", "sigma")
ROW_KEYS = ("name", "task", "purification", "model", "dataset", "flags", "overrides", "published", "reference", "note")
TABLE_KEYS = ("title", "source", "protocol", "note", "rows")


@dataclass(frozen=True)
class Row:
    name: str
    task: str
    purification: str
    model: str
    published: dict             # NUMBERS -> float or None
    dataset: str | None = None
    flags: tuple = ()
    overrides: tuple = ()
    reference: dict = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    source: str
    protocol: dict
    rows: tuple
    note: str = ""


def _check_keys(where: str, data: dict, valid: tuple) -> None:
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")


def _row(where: str, data) -> Row:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a row must be a mapping of {', '.join(ROW_KEYS)}")
    _check_keys(where, data, ROW_KEYS)
    for key in ("name", "task", "purification", "model", "published"):
        if not data.get(key):
            raise ConfigError(f"{where}: '{key}' is missing; every row names its configs and its published numbers")
    published = data["published"]
    if not isinstance(published, dict):
        raise ConfigError(f"{where}: 'published' must map {', '.join(NUMBERS)} to numbers or null")
    _check_keys(f"{where} published", published, NUMBERS)
    for key, value in published.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where} published.{key}: {value!r} is not a number; write the number or null")
    return Row(name=str(data["name"]), task=data["task"], purification=data["purification"], model=data["model"],
               published={k: (None if published.get(k) is None else float(published[k])) for k in NUMBERS},
               dataset=data.get("dataset"), flags=tuple(data.get("flags") or ()),
               overrides=tuple(data.get("overrides") or ()), reference=dict(data.get("reference") or {}),
               note=str(data.get("note") or ""))


def load_registry(path: str | Path = REGISTRY) -> dict[str, Table]:
    """Every table of the registry file, checked; ConfigError naming the file, table and key otherwise."""
    path = Path(path)
    data = load_yaml(path, "registry", fix="fix the file or give another --registry")
    tables = data.get("tables")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"registry '{path}': expected a 'tables:' mapping of table names to entries")
    out = {}
    for name, entry in tables.items():
        where = f"registry '{path}' table '{name}'"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping of {', '.join(TABLE_KEYS)}")
        _check_keys(where, entry, TABLE_KEYS)
        if not str(entry.get("source") or "").strip():
            raise ConfigError(f"{where}: 'source' is missing; every table names where its numbers come from")
        protocol = entry.get("protocol")
        if not isinstance(protocol, dict) or any(k not in protocol for k in PROTOCOL_KEYS):
            raise ConfigError(f"{where}: 'protocol' must give {', '.join(PROTOCOL_KEYS)} (null when the source does not)")
        rows = tuple(_row(f"{where} row {i + 1}", r) for i, r in enumerate(entry.get("rows") or []))
        if not rows and not str(entry.get("note") or "").strip():
            raise ConfigError(f"{where}: no rows and no note; an empty table says why in its note")
        names = [r.name for r in rows]
        if len(set(names)) < len(names):
            raise ConfigError(f"{where}: two rows share a name; give each row its own")
        out[str(name)] = Table(name=str(name), title=str(entry.get("title") or name), source=str(entry["source"]),
                               protocol=dict(protocol), rows=rows, note=str(entry.get("note") or ""))
    return out
