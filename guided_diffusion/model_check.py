"""Check every checkpoint the shipped configs name: present, size, SHA-256, expected keys, where to get it.

Configs scanned (paths relative to the repository root):
- `model_configurations/*.yaml`: keys `model_path` and `first_stage_path`, at any depth;
- `bkse/options/**/*.yml`: key `pretrained` inside a `KernelWizard` section (`null` means none).

The expected layout of a file comes from `models/manifests/*.json` ({"checkpoint", "aliases",
"download", "state_dict": [[key, shape, ...], ...], ...}). A configured file is matched to the manifest
whose `checkpoint` or `aliases` path shares the longest trailing run of path components with it (the
basename at least). Run `python -m guided_diffusion.model_check` for the table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from util.checkpoints import CheckpointError, describe_mismatch, read_state_dict

CHUNK = 1 << 20  # bytes read at a time for SHA-256
_CKPT_TOKEN = re.compile(r"[^\s(),;]+\.(?:pt|pth|ckpt|bin|safetensors)\b")


@dataclass
class Manifest:
    name: str  # file stem in models/manifests
    names: list[str]  # checkpoint file names / relative paths it describes
    download: str
    layout: dict[str, tuple[int, ...]]


@dataclass
class Entry:
    configured: str  # the path as the config spells it
    path: Path  # where it is looked for
    named_by: list[str] = field(default_factory=list)  # "config_file:key"


# ----------------------------------------------------------------------------------------------
# Reading configs and manifests
# ----------------------------------------------------------------------------------------------

class _TolerantLoader(yaml.SafeLoader):
    """Safe loading that turns unknown tags (e.g. !!python/tuple) into plain lists/dicts/strings."""


def _construct_unknown(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> object:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)


_TolerantLoader.add_multi_constructor("", _construct_unknown)


def _find_keys(obj: object, keys: tuple[str, ...], inside: str | None = None, _within: bool = False) -> list[tuple[str, object]]:
    """All (key, value) pairs for `keys` at any depth; with `inside`, only within a mapping of that name."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in keys and (inside is None or _within):
                found.append((k, v))
            found += _find_keys(v, keys, inside, _within or (inside is not None and k == inside))
    elif isinstance(obj, list):
        for v in obj:
            found += _find_keys(v, keys, inside, _within)
    return found


def _config_files(root: Path) -> list[tuple[Path, tuple[str, ...], str | None]]:
    """(config file, keys naming checkpoints, enclosing section or None)."""
    files = [(p, ("model_path", "first_stage_path"), None) for p in sorted((root / "model_configurations").glob("*.yaml"))]
    files += [(p, ("pretrained",), "KernelWizard") for p in sorted((root / "bkse" / "options").glob("**/*.yml"))]
    return files


def _named_checkpoints(root: Path) -> tuple[list[Entry], list[str]]:
    """The checkpoints named by the configs (one Entry per file) and the configs that could not be read."""
    entries: dict[Path, Entry] = {}
    errors = []
    for cfg, keys, inside in _config_files(root):
        rel_cfg = cfg.relative_to(root).as_posix()
        try:
            data = yaml.load(cfg.read_text(encoding="utf-8"), Loader=_TolerantLoader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            errors.append(f"{rel_cfg}: cannot parse ({str(exc).splitlines()[0]})")
            continue
        for key, value in _find_keys(data, keys, inside):
            if not isinstance(value, str) or not value.strip():
                continue  # null: the config asks for random weights
            path = Path(os.path.expanduser(value))
            path = path if path.is_absolute() else root / path
            entry = entries.setdefault(path.resolve(), Entry(value, path))
            entry.named_by.append(f"{rel_cfg}:{key}")
    return list(entries.values()), errors


def _checkpoint_names(text: object) -> list[str]:
    """File names / relative paths mentioned in a manifest's checkpoint or alias string."""
    return _CKPT_TOKEN.findall(text) if isinstance(text, str) else []


def _download_text(manifest: dict) -> str:
    d = manifest.get("download")
    if isinstance(d, str) and d:
        return d
    if isinstance(d, dict) and d.get("url"):
        return str(d["url"])
    src = manifest.get("source")
    if isinstance(src, dict) and src.get("repo"):
        return f"see https://github.com/{src['repo']}"
    return "unknown"


def load_manifests(root: str | os.PathLike) -> list[Manifest]:
    """Every models/manifests/*.json under `root`; a malformed one raises ValueError naming it."""
    manifests = []
    for p in sorted((Path(root) / "models" / "manifests").glob("*.json")):
        try:
            m = json.loads(p.read_text(encoding="utf-8"))
            layout = {str(item[0]): tuple(int(n) for n in item[1]) for item in m["state_dict"]}
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"manifest '{p}' is malformed ({type(exc).__name__}: {exc}); fix or regenerate it") from None
        aliases = m.get("aliases", m.get("checkpoint_aliases", [])) or []
        names = [n for t in [m.get("checkpoint")] + list(aliases) for n in _checkpoint_names(t)]
        manifests.append(Manifest(p.stem, names, _download_text(m), layout))
    return manifests


def _suffix_match(a: str, b: str) -> int:
    """Number of trailing path components two paths share."""
    pa, pb = Path(a).parts[::-1], Path(b).parts[::-1]
    n = 0
    while n < min(len(pa), len(pb)) and pa[n] == pb[n]:
        n += 1
    return n


def match_manifest(configured: str, manifests: list[Manifest]) -> tuple[Manifest | None, str]:
    """The manifest describing `configured` and a note ('' or why there is none)."""
    scores = [(max([_suffix_match(configured, n) for n in m.names], default=0), m) for m in manifests]
    best = max((s for s, _ in scores), default=0)
    if best == 0:
        return None, "no manifest names this file"
    winners = [m for s, m in scores if s == best]
    if len(winners) > 1:
        return None, f"ambiguous: manifests {', '.join(m.name for m in winners)} all name this file"
    return winners[0], ""


# ----------------------------------------------------------------------------------------------
# Checking files
# ----------------------------------------------------------------------------------------------

def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _locate(entry: Entry, manifest: Manifest | None) -> Path:
    """The configured path, or a file next to it under one of the manifest's alias names."""
    if entry.path.is_file() or manifest is None:
        return entry.path
    for name in manifest.names:
        candidate = entry.path.parent / Path(name).name
        if candidate.is_file():
            return candidate
    return entry.path


def _check_entry(entry: Entry, manifests: list[Manifest], with_sha256: bool) -> dict:
    manifest, note = match_manifest(entry.configured, manifests)
    path = _locate(entry, manifest)
    row = {
        "file": entry.configured, "path": str(path), "configs": entry.named_by, "present": path.is_file(),
        "size": None, "sha256": None, "manifest": manifest.name if manifest else None,
        "layout": "missing", "detail": note, "download": manifest.download if manifest else "unknown",
    }
    if not row["present"]:
        return row
    row["size"] = path.stat().st_size
    if with_sha256:
        row["sha256"] = sha256_file(path)
    if manifest is None:
        row["layout"] = "unknown"
        return row
    try:
        sd = read_state_dict(path, what=f"checkpoint '{entry.configured}'", source=manifest.download)
    except CheckpointError as exc:
        row.update(layout="unreadable", detail=str(exc))
        return row
    diff = describe_mismatch({k: tuple(v.shape) for k, v in sd.items()}, manifest.layout)
    alias_note = "" if path == entry.path else f"found under the alias name {path.name}"
    row.update(layout="mismatch" if diff else "match", detail=diff or alias_note)
    return row


def check_models(repo_root: str | os.PathLike, with_sha256: bool = True) -> list[dict]:
    """One row per checkpoint that the configs under `repo_root` name.

    Row keys: file (as configured), path (where it was looked for or found), configs (config:key that
    name it), present, size (bytes or None), sha256 (hex or None), manifest (name or None), layout
    ('match' | 'mismatch' | 'unreadable' | 'unknown' | 'missing' | 'config error'), detail (one line),
    download. A config that cannot be parsed gives a 'config error' row.
    """
    root = Path(repo_root)
    manifests = load_manifests(root)
    entries, errors = _named_checkpoints(root)
    rows = [_check_entry(e, manifests, with_sha256) for e in entries]
    rows += [
        {"file": "-", "path": "", "configs": [], "present": False, "size": None, "sha256": None, "manifest": None,
         "layout": "config error", "detail": err, "download": ""}
        for err in errors
    ]
    return rows


def _size_text(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**20:.1f} MiB"


def format_check_table(rows: list[dict]) -> str:
    """A fixed-width table of `check_models` rows, then one line per problem with its fix."""
    header = ("checkpoint", "present", "size", "layout", "sha256")
    body = [
        (r["file"], "yes" if r["present"] else "no", _size_text(r["size"]), r["layout"], r["sha256"] or "-")
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(header), line("-" * w for w in widths)] + [line(b) for b in body]
    notes = []
    for r in rows:
        if r["layout"] == "missing":
            notes.append(f"{r['file']}: not found at {r['path']}; download: {r['download']}")
        elif r["layout"] in ("mismatch", "unreadable"):
            notes.append(f"{r['file']}: {r['layout']}: {r['detail']}; re-download: {r['download']}")
        elif r["detail"]:
            notes.append(f"{r['file']}: {r['detail']}")
    if not rows:
        out.append("(no checkpoints named by model_configurations/*.yaml or bkse/options/**/*.yml)")
    return "\n".join(out + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the checkpoints that dcdp's configs name.")
    parser.add_argument("--repo-root", default=Path(__file__).resolve().parent.parent, type=Path)
    parser.add_argument("--no-sha256", action="store_true", help="skip hashing (faster for multi-GB files)")
    args = parser.parse_args(argv)
    rows = check_models(args.repo_root, with_sha256=not args.no_sha256)
    print(format_check_table(rows))
    return 1 if any(r["layout"] in ("mismatch", "unreadable", "config error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
