"""Gather finished dcdp.py runs into one table (PSNR / SSIM / LPIPS as mean ± std, per run).

    python scripts/collect_results.py                          # every run under ./purification_results
    python scripts/collect_results.py results/ other_results/ --csv table.csv --json table.json

Every `summary.json` below the given folders is one row: task (operator), dataset, measurement noise σ,
prior (model checkpoint), K, τ, purification (full DDIM or Tweedie), images restored / failed, the
metrics after the final purification, and seconds per image. Rows are sorted by task, dataset and σ.
The markdown table goes to stdout; --csv and --json write the same rows to files; --montage PNG draws one
row per run (its first restored image: ground truth | measurement | data consistency alone | DCDP). A summary.json that
cannot be read is skipped with one line on stderr; a user error (a folder that does not exist, no finished
runs, a bad flag, an unwritable --csv/--json) ends the command with one line `error: ...` and exit 2.
"""
from __future__ import annotations

import csv
import io
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python scripts/collect_results.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from util.cli import OneLineParser, run_command  # noqa: E402
from util.errors import ConfigError, RunFolderError  # noqa: E402
from util.metrics import PROTOCOL, lpips_net_of  # noqa: E402


COLUMNS = ("task", "dataset", "sigma", "prior", "K", "tau", "purification", "images", "failed",
           "psnr", "psnr_std", "ssim", "ssim_std", "lpips", "lpips_std", "lpips_net", "seconds_per_image", "run_dir")


def row_of(summary: dict, path: Path) -> dict:
    """One table row from a run's summary.json."""
    resolved = summary.get("resolved", {})
    task = resolved.get("task", {})
    pur = resolved.get("purification", {})
    pur = pur.get("purification", pur)  # the hyper-parameters, nested as in the official files
    model = resolved.get("model", {})
    metrics = summary.get("metrics", {})

    def stat(name: str, key: str):
        value = metrics.get(name, {}).get(key)
        return None if value is None else float(value)

    if resolved.get("no_purification"):
        purification = "none (data consistency alone)"
    else:
        purification = (f"DDIM {pur.get('ddim_num_iterations', 20)}" if pur.get("full_ddim", True) else "Tweedie")
    checkpoint = Path(str(model["model_path"])) if model.get("model_path") else None
    if checkpoint is not None:  # generic file names (model.ckpt) are told apart by their folder
        checkpoint = f"{checkpoint.parent.name}/{checkpoint.name}" if checkpoint.stem == "model" else checkpoint.name
    return {
        "task": task.get("operator", {}).get("name", "?"),
        "dataset": resolved.get("dataset", {}).get("name", "?"),
        "sigma": task.get("noise", {}).get("sigma", 0.0),
        "prior": checkpoint or "random weights",
        "K": pur.get("total_num_iterations"), "tau": pur.get("csgm_num_iterations"),
        "purification": purification,
        "images": summary.get("ok", 0), "failed": summary.get("failed", 0),
        "psnr": stat("psnr", "mean"), "psnr_std": stat("psnr", "std"),
        "ssim": stat("ssim", "mean"), "ssim_std": stat("ssim", "std"),
        "lpips": stat("lpips", "mean"), "lpips_std": stat("lpips", "std"), "lpips_net": lpips_net_of(summary),
        "seconds_per_image": stat("seconds", "mean"),
        "run_dir": str(path.parent),
    }


def collect(folders: list[Path]) -> list[dict]:
    """One row per readable summary.json below `folders`; RunFolderError for a folder that is not one.
    A summary that cannot be read or is not a dcdp.py summary is skipped with one line on stderr."""
    rows = []
    for folder in folders:
        if not folder.is_dir():
            what = "does not exist" if not folder.exists() else "is not a folder"
            raise RunFolderError(f"'{folder}' {what}; give the --save_dir folders of your dcdp.py runs "
                                 f"(default ./purification_results)")
        for path in sorted(folder.rglob("summary.json")):
            try:
                summary = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                print(f"skipping '{path}': not a readable summary ({exc.__class__.__name__})", file=sys.stderr)
                continue
            try:
                if not isinstance(summary, dict):
                    raise TypeError(f"a JSON {type(summary).__name__}, not an object")
                rows.append(row_of(summary, path))
            except (AttributeError, TypeError, ValueError, KeyError) as exc:  # malformed fields
                print(f"skipping '{path}': not a dcdp.py summary ({exc.__class__.__name__}: {exc})", file=sys.stderr)
    return sorted(rows, key=lambda r: (r["task"], r["dataset"], float(r["sigma"] or 0), r["run_dir"]))


def _pm(mean, std, digits: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| task | dataset | σ | prior | K × τ | purification | images (failed) | PSNR | SSIM | LPIPS | s/img |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seconds = "–" if r["seconds_per_image"] is None else f"{r['seconds_per_image']:.1f}"
        lpips = _pm(r["lpips"], r["lpips_std"], 3) + (f" ({r['lpips_net']})" if r["lpips"] is not None else "")
        lines.append(f"| {r['task']} | {r['dataset']} | {r['sigma']} | {r['prior']} | {r['K']} × {r['tau']} | "
                     f"{r['purification']} | {r['images']} ({r['failed']}) | {_pm(r['psnr'], r['psnr_std'], 2)} | "
                     f"{_pm(r['ssim'], r['ssim_std'], 3)} | {lpips} | {seconds} |")
    return "\n".join(lines) + "\n\n" + PROTOCOL


def write_montage(rows: list[dict], path: Path) -> None:
    """One row per run (its first restored image), labelled with the task, dataset, σ and purification."""
    from util.montage import restored_records, run_panels, save_montage

    panels, labels = [], []
    for r in rows:
        root = Path(r["run_dir"])
        first = restored_records(root, 1)
        if first:
            panels.append(run_panels(root, first[0]))
            labels.append(f"{r['task']}\n{r['dataset']}, σ {r['sigma']}\nK × τ {r['K']} × {r['tau']}, {r['purification']}")
    if not panels:
        raise RunFolderError(f"--montage '{path}': none of the runs has a restored image to show")
    save_montage(panels, path, labels)
    print(f"montage: {path} ({len(panels)} run(s))", file=sys.stderr)


def _write(flag: str, path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise ConfigError(f"{flag} '{path}': cannot write it ({exc.strerror or type(exc).__name__}); choose a "
                          f"writable file path") from None


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0], command="python scripts/collect_results.py")
    p.add_argument("folders", nargs="*", default=["./purification_results"], help="--save_dir folders of dcdp.py runs")
    p.add_argument("--csv", default=None, help="also write the rows as CSV here")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--montage", default=None, metavar="PNG",
                   help="also draw one row per run (its first restored image): ground truth | measurement | data "
                        "consistency alone | DCDP, PSNR / SSIM under each")
    return run_command(p, argv, run)


def run(args) -> int:
    for flag, path in (("--csv", args.csv), ("--json", args.json), ("--montage", args.montage)):  # before any output
        if path is None:
            continue
        if not path or Path(path).is_dir():
            raise ConfigError(f"{flag} {path!r} is {'a folder' if path else 'empty'}; give a file name, e.g. "
                              f"table.{'png' if flag == '--montage' else flag[2:]}")
        folder = Path(path).resolve().parent
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
                pass
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError(f"{flag} '{path}': cannot write in the folder '{folder}' ({reason}); create it or "
                              f"choose a writable path") from None
    rows = collect([Path(f) for f in args.folders])
    if not rows:
        raise RunFolderError(f"no finished runs (summary.json) under {', '.join(args.folders)}; give the --save_dir "
                             f"of finished dcdp.py runs (a run writes summary.json when it ends)")
    if args.csv:  # the files first: a bad path fails before the table is printed
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        _write("--csv", args.csv, buffer.getvalue())
    if args.json:
        _write("--json", args.json, json.dumps(rows, indent=1))
    if args.montage:
        write_montage(rows, Path(args.montage))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
