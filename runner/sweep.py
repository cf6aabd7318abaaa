"""Grid sweeps: `python dcdp.py ... --sweep purification.lr=1e3,1e4 purification.csgm_num_iterations=50,100`.

Each grid point is an ordinary run of dcdp.py with the point's `key=value` overrides appended after the
command's own overrides, so it gets its ordinary run folder (identity hash), `--resume` skips its finished
images and collect_results.py sees it. A point that fails (a bad value: exit 2; failed or diverged images:
exit 3; any other error) becomes a row with its reason and the sweep goes on. Ctrl-C stops after the
current point's images are written (the run's own handling), every finished point stays intact, and the
table of the points done so far is written. The sweep folder `{save_dir}/sweeps/{name}_{hash}/` holds
sweep.json (the points, their run folders and results), sweep.csv, sweep.md and the plots
(util/sweep_report.py).

Axes are `KEY=V1,V2,...` (dotted keys as the overrides; values split at commas outside brackets, so
`others.img_size=[1,3,32,32],[1,3,64,64]` is two values) or a YAML file with a `sweep:` block:

    sweep:
      purification.lr: [1.0e3, 1.0e4, 1.0e5]
      purification.csgm_num_iterations: [50, 100]

An axis with one value is an ordinary override (no column).
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from guided_diffusion.config import parse_overrides
from util.cli import EXIT_BAD_INPUT, EXIT_FAILED_IMAGES, EXIT_INTERRUPTED
from util.errors import ConfigError, DCDPError
from util.files import load_yaml

log = logging.getLogger("dcdp")

# Flags that change no point's numbers or folder: left out of the sweep folder's hash.
NOT_IN_HASH = ("sweep", "resume", "quiet", "lpips", "no_curves", "batch_size", "run_root")


@dataclass(frozen=True)
class Axis:
    key: str            # dotted override key, e.g. purification.lr
    values: tuple       # the values as override text, e.g. ("1e3", "1e4")


def split_values(raw: str) -> list[str]:
    """'1e3,1e4' -> ['1e3', '1e4']; commas inside [] or {} do not split."""
    parts, depth, current = [], 0, ""
    for ch in raw:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts]


def _value_text(value) -> str:
    """A YAML value of a sweep file as override text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _axes_from_file(path: Path) -> list[Axis]:
    data = load_yaml(path, "--sweep", fix="give a YAML file with a 'sweep:' block mapping keys to lists of values")
    block = data.get("sweep")
    if not isinstance(block, dict) or not block:
        raise ConfigError(f"--sweep '{path}': expected a 'sweep:' block mapping keys to lists of values, e.g. "
                          f"sweep: {{purification.lr: [1.0e3, 1.0e4]}}")
    axes = []
    for key, values in block.items():
        if isinstance(values, str):
            values = split_values(values)
        elif not isinstance(values, list):
            values = [values]
        axes.append(Axis(str(key), tuple(_value_text(v) for v in values)))
    return axes


def parse_axes(items: list[str]) -> tuple[list[Axis], list[str]]:
    """The --sweep items as grid axes (two or more values) and fixed overrides (one value), all checked.

    Raises ConfigError naming the item for a malformed axis, an empty value, a repeated key or a value
    that is not a valid override."""
    axes: list[Axis] = []
    for item in items:
        if "=" not in item and item.endswith((".yaml", ".yml")):
            path = Path(item)
            if not path.is_file():
                raise ConfigError(f"--sweep '{item}': no such file; give KEY=V1,V2 or a YAML file with a 'sweep:' block")
            axes += _axes_from_file(path)
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--sweep '{item}': expected KEY=V1,V2,... (e.g. purification.lr=1e3,1e4) or a "
                              f"YAML file with a 'sweep:' block")
        axes.append(Axis(key, tuple(split_values(raw))))
    seen = set()
    for axis in axes:
        if axis.key in seen:
            raise ConfigError(f"--sweep: the key '{axis.key}' is given twice; give each key once with all its values")
        seen.add(axis.key)
        if any(v == "" for v in axis.values):
            raise ConfigError(f"--sweep {axis.key}={','.join(axis.values)}: an empty value; remove the extra comma")
        if len(set(axis.values)) < len(axis.values):
            raise ConfigError(f"--sweep {axis.key}={','.join(axis.values)}: a value is repeated; give each once")
        parse_overrides([f"{axis.key}={v}" for v in axis.values])  # ConfigError naming a bad key or value
    fixed = [f"{a.key}={a.values[0]}" for a in axes if len(a.values) == 1]
    return [a for a in axes if len(a.values) > 1], fixed


def grid(axes: list[Axis]) -> list[dict]:
    """Every point of the grid, the first axis varying slowest: [{key: value text}, ...]."""
    return [dict(zip([a.key for a in axes], combo)) for combo in itertools.product(*[a.values for a in axes])]


def sweep_folder(args, axes: list[Axis], fixed: list[str]) -> Path:
    """{save_dir}/sweeps/{last parts of the swept keys}_{hash8}: the hash of the command's settings
    (configs, overrides, seed, images, flags) and the axes, so the same sweep finds its folder again."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_IN_HASH}
    settings["fixed"] = fixed
    settings["axes"] = [[a.key, list(a.values)] for a in axes]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    name = "_".join(a.key.split(".")[-1] for a in axes)
    return Path(args.save_dir) / "sweeps" / f"{name}_{digest}"


def point_label(point: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())


def _failed_reason(summary: dict) -> str:
    failures = summary.get("failures") or []
    first = failures[0].get("reason") if failures else ""
    return f"{summary.get('failed')} of {summary.get('images')} image(s) failed: {first}".rstrip(": ")


def point_result(run_root, code: int, error: str = "") -> dict:
    """A point's row from its run folder's summary.json and metrics.csv (or the error that stopped it)."""
    from util.sweep_report import metrics_of_run

    row = {"run_dir": str(run_root) if run_root else "", "exit": code}
    if run_root is None or not (Path(run_root) / "summary.json").is_file():
        row.update(status="error", reason=error or f"exit {code}: no summary.json")
        return row
    summary, metrics = metrics_of_run(Path(run_root))
    row.update(metrics)
    if code == EXIT_INTERRUPTED or summary.get("missing"):
        row.update(status="interrupted", reason=f"{summary.get('missing')} of {summary.get('images')} image(s) not "
                                                f"done; rerun the sweep with --resume")
    elif summary.get("failed"):
        row.update(status="failed" if not summary.get("ok") else "partial", reason=_failed_reason(summary))
    else:
        row.update(status="ok", reason="")
    return row


def run_sweep(args, run) -> int:
    """Run the grid of `args.sweep` with `run(point_args) -> exit code` (dcdp.run); write the sweep folder.

    Returns 0 when every point succeeded, 3 when some failed, 130 when interrupted."""
    from util.sweep_report import write_report

    axes, fixed = parse_axes(args.sweep)
    if not axes:
        raise ConfigError("--sweep: no key has two or more values; give e.g. --sweep purification.lr=1e3,1e4")
    points = grid(axes)
    folder = sweep_folder(args, axes, fixed)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    rows: list[dict] = []
    interrupted = False
    log.info(f"sweep: {len(points)} point(s) over {', '.join(a.key for a in axes)} → {folder}")
    for n, point in enumerate(points, 1):
        if main_rank:  # torchrun: every rank runs every point (sharding its images); rank 0 reports
            log.warning(f"[sweep {n}/{len(points)}] {point_label(point)}")
        point_args = copy.copy(args)
        point_args.sweep = None
        point_args.run_root = None
        point_args.overrides = list(args.overrides) + fixed + [f"{k}={v}" for k, v in point.items()]
        error = ""
        try:
            code = run(point_args)
        except KeyboardInterrupt:
            code, interrupted = EXIT_INTERRUPTED, True
        except DCDPError as exc:
            code, error = EXIT_BAD_INPUT, str(exc)
            log.error(f"error: {exc}")
        except Exception as exc:  # a point's crash is that point's row; the sweep goes on
            code, error = 1, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.exception(f"[sweep {n}/{len(points)}] failed")
        interrupted = interrupted or code == EXIT_INTERRUPTED
        if main_rank:  # the table so far, so that an interrupted sweep leaves one
            rows.append({"point": point, **point_result(point_args.run_root, code, error)})
            write_report(folder, axes, points, rows, base=list(args.overrides) + fixed)
        if interrupted:
            break
    if not main_rank:
        return EXIT_INTERRUPTED if interrupted else 0
    print(f"sweep: {sum(r['status'] == 'ok' for r in rows)} of {len(points)} point(s) ok → {folder / 'sweep.md'}")
    if interrupted:
        log.error(f"sweep interrupted after {len(rows)} of {len(points)} point(s); rerun the same command with "
                  f"--resume to finish the others (finished points are skipped)")
        return EXIT_INTERRUPTED
    return 0 if all(r["status"] == "ok" for r in rows) else EXIT_FAILED_IMAGES
