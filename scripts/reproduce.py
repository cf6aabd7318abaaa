"""Reproduce a table of published numbers (tables/published.yaml) and set ours beside them.

    python scripts/reproduce.py demo                                  # the README demo table (embedded prior)
    python scripts/reproduce.py clamp --data_root /datasets --max_images 10
    python scripts/reproduce.py --list                                # the tables and their sources
    python scripts/reproduce.py demo --smoke                          # tiny settings: a check in seconds

Every row of the table runs through dcdp.py (one ordinary, resumable run folder per row and seed, under
{save_dir}/{table}/runs/) with the row's configs and the table's protocol: σ (measurement.noise.sigma), the
number of images (--max_images, unless given) and the seeds. --data_root DIR: a row's images are in
DIR/{dataset} when that folder exists (e.g. DIR/ffhq, DIR/ImageNet), else in DIR; without it, the configs'
own dataset roots. Rerunning the same command finishes what is missing and rewrites the comparison. Ours are
mean ± std over images × seeds; the difference is ours − published. The comparison is printed and written as
comparison.md, comparison.csv and comparison.json in {save_dir}/{table}/ (with _smoke: {table}_smoke/).
--smoke runs every row on 1 image, 1 seed, K = 1 round of 2 data-consistency steps and 2 DDIM steps, LPIPS
off: it checks the pipeline; its numbers are not the table's.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dcdp  # noqa: E402
from util.cli import OneLineParser, run_command  # noqa: E402
from util.errors import ConfigError, DCDPError  # noqa: E402
from util.image_io import atomic_write_text  # noqa: E402
from util.metrics import PROTOCOL  # noqa: E402
from util.published import REGISTRY, load_registry  # noqa: E402

log = logging.getLogger("dcdp")
COMPARED = ("psnr", "ssim", "lpips", "seconds_per_image", "nfe")
LABELS = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "seconds_per_image": "s/img", "nfe": "NFE"}
DIGITS = {"psnr": 2, "ssim": 3, "lpips": 3, "seconds_per_image": 2, "nfe": 0}
SMOKE = ("purification.total_num_iterations=1", "purification.csgm_num_iterations=2",
         "purification.ddim_num_iterations=2", "purification.average_last_rounds=1")
CSV_FIELDS = ("row", "status", "reason", "images", "failed") + tuple(
    f"{m}_{what}" for m in COMPARED for what in ("ours", "ours_std", "published", "published_std", "diff")) + (
    "run_dirs",)


def row_data_root(data_root: str | None, dataset: str | None) -> str | None:
    if data_root is None:
        return None
    for sub in (dataset, dataset.lower()) if dataset else ():
        if (Path(data_root) / sub).is_dir():
            return str(Path(data_root) / sub)
    return data_root


def row_argv(table, row, args, seed: int, save_dir: Path) -> list[str]:
    """dcdp.py's command line for one row and seed under the table's protocol."""
    argv = ["--task_config", row.task, "--purification_config", row.purification, "--model_config", row.model,
            "--save_dir", str(save_dir), "--seed", str(seed), "--resume", "--device", args.device,
            "--lpips", "off" if args.smoke else args.lpips]
    images = 1 if args.smoke else (args.max_images or table.protocol.get("images"))
    if images:
        argv += ["--max_images", str(images)]
    root = row_data_root(args.data_root, row.dataset)
    if root:
        argv += ["--data_root", root]
    if row.dataset:
        argv += ["--dataset", row.dataset]
    if args.quiet:
        argv.append("--quiet")
    argv += list(row.flags)
    if table.protocol.get("sigma") is not None:
        argv.append(f"measurement.noise.sigma={table.protocol['sigma']}")
    return argv + list(row.overrides) + (list(SMOKE) if args.smoke else [])


def pooled(run_dirs: list[Path]) -> dict:
    """Ours: mean ± std over the images × seeds of the rows' runs (their metrics.csv)."""
    values = {m: [] for m in ("psnr", "ssim", "lpips", "seconds", "nfe")}
    failed = 0
    for root in run_dirs:
        with open(root / "metrics.csv", newline="") as f:
            for rec in csv.DictReader(f):
                if rec["status"] != "ok":
                    failed += 1
                    continue
                for m in values:
                    if rec.get(m) not in (None, ""):
                        values[m].append(float(rec[m]))
    out = {"images": len(values["psnr"]), "failed": failed}
    for m, key in (("psnr", "psnr"), ("ssim", "ssim"), ("lpips", "lpips"), ("seconds", "seconds_per_image"),
                   ("nfe", "nfe")):
        v = values[m]
        out[key] = statistics.fmean(v) if v else None
        out[f"{key}_std"] = statistics.pstdev(v) if v else None
    return out


def seeds_of(table, args) -> list[int]:
    """The seeds of the runs: the protocol's (default [0]), --seeds, or the first one with --smoke."""
    seeds = args.seeds or table.protocol.get("seeds") or [0]
    return seeds[:1] if args.smoke else seeds


def run_row(table, row, args, save_dir: Path) -> tuple[dict, bool]:
    """Run one row (every seed); returns its result and whether Ctrl-C stopped it."""
    seeds = seeds_of(table, args)
    run_dirs, provenance = [], None
    for seed in seeds:
        try:
            point = dcdp.parse_args(row_argv(table, row, args, seed, save_dir))
        except SystemExit:  # argparse printed its one line
            return {"status": "error", "reason": "bad dcdp.py arguments in the registry row"}, False
        try:
            code = dcdp.run(point)
        except DCDPError as exc:
            log.error(f"error: {exc}")
            return {"status": "error", "reason": str(exc)}, False
        except KeyboardInterrupt:
            code = dcdp.EXIT_INTERRUPTED
        if getattr(point, "run_root", None) is not None:
            run_dirs.append(Path(point.run_root))
        if code == dcdp.EXIT_INTERRUPTED:
            return {"status": "interrupted", "reason": "Ctrl-C; rerun the same command to finish",
                    "run_dirs": [str(p) for p in run_dirs]}, True
        summary = json.loads((point.run_root / "summary.json").read_text())
        provenance = provenance or summary.get("metrics_provenance")
    ours = pooled(run_dirs)
    status = "ok" if not ours["failed"] else ("failed" if not ours["images"] else "partial")
    reason = f"{ours['failed']} image(s) failed (see the runs' metrics.csv)" if ours["failed"] else ""
    return {"status": status, "reason": reason, "ours": ours, "seeds": seeds, "provenance": provenance,
            "run_dirs": [str(p) for p in run_dirs]}, False


def compare(row, result: dict) -> dict:
    """The row's ours, published and difference (ours − published) for every compared metric."""
    ours = result.get("ours") or {}
    entry = {"row": row.name, "status": result["status"], "reason": result.get("reason", ""),
             "images": ours.get("images"), "failed": ours.get("failed"), "run_dirs": result.get("run_dirs", [])}
    for m in COMPARED:
        mine, published = ours.get(m), row.published.get(m)
        entry.update({f"{m}_ours": mine, f"{m}_ours_std": ours.get(f"{m}_std"), f"{m}_published": published,
                      f"{m}_published_std": row.published.get(f"{m}_std"),
                      f"{m}_diff": None if mine is None or published is None else mine - published})
    return entry


def _cell(entry: dict, m: str) -> str:
    d = DIGITS[m]
    mine, pub, diff = entry[f"{m}_ours"], entry[f"{m}_published"], entry[f"{m}_diff"]
    if mine is None and pub is None:
        return "–"
    text = "–" if mine is None else f"{mine:.{d}f}"
    if mine is not None and entry[f"{m}_ours_std"] and m in ("psnr", "ssim", "lpips"):
        text += f" ± {entry[f'{m}_ours_std']:.{d}f}"
    text += " / " + ("–" if pub is None else f"{pub:.{d}f}")
    return text + ("" if diff is None else f" ({diff:+.{d}f})")


def markdown(table, entries: list[dict], args) -> str:
    lines = [f"# {table.title}: ours / published (ours − published)", "",
             f"Source: {table.source}.", f"Protocol: {json.dumps(table.protocol, ensure_ascii=False)}.",
             f"Ours: {time.strftime('%Y-%m-%d')}, device {args.device}, seeds {' '.join(map(str, seeds_of(table, args)))}, "
             f"images per row as given under images"
             + (", SMOKE settings (not comparable)" if args.smoke else "") + ".", ""]
    head = ["row", "images (failed)"] + [LABELS[m] for m in COMPARED] + ["status"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        images = "–" if e["images"] is None else f"{e['images']} ({e['failed']})"
        status = e["status"] + (f": {e['reason']}" if e["reason"] else "")
        lines.append("| " + " | ".join([e["row"], images] + [_cell(e, m) for m in COMPARED]
                                       + [status.replace("|", "/")]) + " |")
    if table.note:
        lines += ["", f"Note: {table.note}"]
    lines += ["", PROTOCOL]
    return "\n".join(lines) + "\n"


def write_outputs(folder: Path, table, entries: list[dict], results: list[dict], args) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    text = markdown(table, entries, args)
    atomic_write_text(folder / "comparison.md", text)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**e, "run_dirs": " ".join(e["run_dirs"])} for e in entries)
    atomic_write_text(folder / "comparison.csv", buf.getvalue())
    atomic_write_text(folder / "comparison.json", json.dumps({
        "table": table.name, "title": table.title, "source": table.source, "protocol": table.protocol,
        "note": table.note, "smoke": args.smoke, "device": args.device, "date": time.strftime("%Y-%m-%d"),
        "metrics_provenance": next((r.get("provenance") for r in results if r.get("provenance")), None),
        "rows": entries}, indent=1))
    return text


def run(args) -> int:
    logging.getLogger().setLevel(logging.WARNING if args.quiet else logging.INFO)
    tables = load_registry(args.registry)
    if args.list or not args.table:
        for name, t in tables.items():
            print(f"{name}: {t.title} ({len(t.rows)} row(s)); source: {t.source}")
        return 0
    if args.table not in tables:
        raise ConfigError(f"table '{args.table}' is not in '{args.registry}'; valid: {', '.join(tables)}")
    table = tables[args.table]
    if not table.rows:
        raise ConfigError(f"table '{table.name}' has no rows yet ({table.note}); nothing to reproduce")
    rows = [r for r in table.rows if not args.rows or r.name in args.rows]
    unknown = sorted(set(args.rows or ()) - {r.name for r in table.rows})
    if unknown:
        raise ConfigError(f"--rows {' '.join(unknown)}: not rows of '{table.name}'; valid: "
                          f"{', '.join(r.name for r in table.rows)}")
    folder = Path(args.save_dir) / (table.name + ("_smoke" if args.smoke else ""))
    entries, results, interrupted = [], [], False
    for n, row in enumerate(rows, 1):
        log.warning(f"[{table.name} {n}/{len(rows)}] {row.name}")
        result, interrupted = run_row(table, row, args, folder / "runs")
        results.append(result)
        entries.append(compare(row, result))
        write_outputs(folder, table, entries, results, args)
        if interrupted:
            break
    print(write_outputs(folder, table, entries, results, args))
    print(f"written: {folder / 'comparison.md'}, .csv, .json")
    if interrupted:
        return dcdp.EXIT_INTERRUPTED
    return 0 if all(e["status"] == "ok" for e in entries) else dcdp.EXIT_FAILED_IMAGES


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0], command="python scripts/reproduce.py")
    p.add_argument("table", nargs="?", help="a table of the registry (demo, clamp, ...); --list lists them")
    p.add_argument("--list", action="store_true", help="list the registry's tables and their sources")
    p.add_argument("--registry", default=str(REGISTRY), help="the registry file (default tables/published.yaml)")
    p.add_argument("--data_root", default=None, help="images: DIR/{dataset} when it exists, else DIR")
    p.add_argument("--max_images", type=int, default=None, help="images per row (default: the protocol's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the protocol's)")
    p.add_argument("--rows", nargs="+", default=None, help="only these rows of the table")
    p.add_argument("--save_dir", default="./reproduce_results", help="where the runs and the comparison go")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--lpips", default="vgg", choices=("vgg", "alex", "off"), help="LPIPS backbone (official vgg)")
    p.add_argument("--smoke", action="store_true", help="tiny settings: a pipeline check, not the table's numbers")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_command(p, argv, run)


if __name__ == "__main__":
    sys.exit(main())
