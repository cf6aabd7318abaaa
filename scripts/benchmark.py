"""Time the DCDP solver per task on the device at hand.

    python scripts/benchmark.py --random_weights                       # the main pixel tasks, batch 1 and 8
    python scripts/benchmark.py --random_weights --tasks super_resolution --batch_sizes 1 8 32
    python scripts/benchmark.py --parity                               # fast vs reference, demo prior

For each task config it restores a few images (synthetic, seeded) after a warm-up and reports the
median seconds per image, UNet evaluations, data-consistency steps, peak memory (the process's peak
during the row, which includes the networks and CUDA-graph pools earlier rows left in memory),
precision and compile settings, as a table and as JSON (--json). Three paths are compared:

  official   the official code's structure: batch 1, fp32 (fp16 autocast on CUDA, as dcdp.py), autograd
             through the operator, blur as a reflect-padded depthwise Conv2d, attention as an explicit
             softmax
  reference  our default path: batch 1, same arithmetic, FFT blur, SDPA attention
  fast       our fast path: batched, closed-form data-consistency gradient (linear operators, phase
             retrieval), channels-last, and on CUDA bf16 autocast + torch.compile (mode reduce-overhead:
             CUDA graphs for the network calls and for the closed-form data-consistency steps)

On the CPU it uses a small model config (the demo UNet's architecture) so that it finishes in
minutes; on CUDA the real architecture of --model_config (random weights need --random_weights).
`--max_rounds R` caps K at R outer iterations and scales the time up to the full K (for phase retrieval
and nonlinear deblurring, whose K = 200). `--rows TASK:BATCH[:ROUNDS] ...` replaces the grid of
--tasks × --batch_sizes by a list run in that order (for a time-limited session: most important first).
A row that fails (out of memory, a compiler error) is recorded with its error and the others go on;
`--budget_s` skips the rows that would start after that many seconds; the JSON file is rewritten after
every row, so an interrupted run keeps what it measured.

`--parity` checks quality instead of speed: on the demo prior and the demo images, every demo task is
run through dcdp.py twice with the same seeds, reference path (fp32, eager, batch 1, autograd through
the operator even where the demo config asks for the closed-form gradient) and `--fast`
(batch 8; on CUDA bf16, torch.compile and CUDA graphs; --precision overrides bf16), and the mean PSNRs
are compared (the bar is 0.05 dB).
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.official_structure import Autograd, ConvBlur, official_attention  # noqa: E402
from guided_diffusion.config import load_model_config, load_purification_config, load_task_config  # noqa: E402
from guided_diffusion.measurements import get_operator  # noqa: E402
from guided_diffusion.priors import build_prior  # noqa: E402
from guided_diffusion.fast_dc import cuda_graph_failures  # noqa: E402
from guided_diffusion.solver import run_dcdp  # noqa: E402
from util.cli import OneLineParser, pick_device, run_command  # noqa: E402
from util.errors import ConfigError, DCDPError  # noqa: E402
from util.files import load_yaml  # noqa: E402

DEMO_TASKS = sorted(p.stem for p in (ROOT / "purification_configurations" / "demo").glob("*.yaml"))
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs")

CPU_MODEL = {  # the demo UNet's architecture, random weights
    "image_size": 64, "num_channels": 32, "num_res_blocks": 2, "channel_mult": "1,1,2,4", "learn_sigma": False,
    "class_cond": False, "use_checkpoint": False, "attention_resolutions": "8", "num_heads": 4,
    "num_head_channels": 64, "num_heads_upsample": -1, "use_scale_shift_norm": True, "dropout": 0.0,
    "resblock_updown": True, "use_fp16": False, "use_new_attention_order": False, "model_path": None,
}
CPU_LATENT = {  # a small VQ-f4 LDM of the ffhq-ldm-vq-4 layout
    "kind": "latent", "model_path": None, "use_ema": True,
    "unet": {"image_size": 16, "model_channels": 64, "attention_resolutions": [2], "num_res_blocks": 2,
             "channel_mult": [1, 2, 2], "num_heads": -1, "num_head_channels": 32},
    "first_stage": {"n_embed": 256, "resolution": 64, "ch": 32, "ch_mult": [1, 2, 4], "num_res_blocks": 1},
}
CPU_CM = {  # a small consistency-model UNet of the cd_bedroom256 layout
    "kind": "consistency", "image_size": 64, "num_channels": 32, "num_res_blocks": 2, "channel_mult": "1,1,2,4",
    "attention_resolutions": "8", "num_head_channels": 32, "resblock_updown": True, "use_scale_shift_norm": False,
    "model_path": None,
}
# name: (task config, purification config, model config on CUDA or None for --model_config, CPU model)
TASKS = {
    "super_resolution": ("super_resolution_config.yaml", "purification_config_super_resolution.yaml", None, CPU_MODEL),
    "inpainting": ("inpainting_config.yaml", "purification_config_inpainting.yaml", None, CPU_MODEL),
    "gaussian_deblur": ("gaussian_deblur_config.yaml", "purification_config_gaussian_deblur.yaml", None, CPU_MODEL),
    "motion_deblur": ("motion_deblur_config.yaml", "purification_config_motion_deblur.yaml", None, CPU_MODEL),
    "phase_retrieval": ("phase_retrieval_config.yaml", "purification_config_phase_retrieval.yaml", None, CPU_MODEL),
    "denoising": ("denoising_config.yaml", "purification_config_denoising.yaml", None, CPU_MODEL),
    "nonlinear_deblur": ("nonlinear_deblur_config.yaml", "purification_config_nonlinear_deblur.yaml", None, CPU_MODEL),
    "ldm_super_resolution": ("super_resolution_config.yaml", "purification_config_ldm_super_resolution.yaml",
                             "model_config_ldm_ffhq.yaml", CPU_LATENT),
    "cm_super_resolution": ("super_resolution_config.yaml", "purification_config_cm_bedroom_super_resolution.yaml",
                            "model_config_cm_bedroom.yaml", CPU_CM),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capped_rounds(K: int, T_init: int, T_end: int, max_rounds: Optional[int]) -> tuple[int, int]:
    """(K, T_end) for at most max_rounds outer iterations: the first rounds of the full linear schedule,
    so T_end moves up to where the full schedule is after max_rounds rounds (the callers also cap
    average_last_rounds at the new K)."""
    if not max_rounds or K <= max_rounds:
        return K, T_end
    return max_rounds, max(T_end, T_init - (T_init - T_end) * max_rounds // K)


_PRIORS: dict = {}


def cached_prior(model_cfg: dict, pcfg, device, precision: str, compile_mode, channels_last: bool):
    """One prior per architecture and path, shared by the tasks (a compiled network is compiled once)."""
    key = json.dumps([model_cfg, pcfg.full_ddim, pcfg.ddim_num_iterations, pcfg.prior_options(), str(device),
                      precision, compile_mode, channels_last], sort_keys=True, default=str)
    if key not in _PRIORS:
        _PRIORS[key] = build_prior(model_cfg, full_ddim=pcfg.full_ddim, ddim_num_iterations=pcfg.ddim_num_iterations,
                                   device=device, precision=precision, compile_model=compile_mode,
                                   channels_last=channels_last, purification=pcfg.prior_options())[0]
    return _PRIORS[key]


def bench_one(task: str, path: str, batch: int, args, device, max_rounds: Optional[int] = None) -> dict:
    task_file, pur_file, task_model, cpu_model = TASKS[task]
    tcfg = load_task_config(ROOT / "task_configurations" / task_file)
    pcfg = load_purification_config(ROOT / "purification_configurations" / pur_file)
    settings = pcfg.settings()
    K_full = settings.K
    settings.K, settings.T_end = capped_rounds(K_full, settings.T_init, settings.T_end, max_rounds or args.max_rounds)
    settings.average_last_rounds = min(settings.average_last_rounds, settings.K)
    size = args.image_size
    params = {k: v for k, v in tcfg.operator.items() if k != "name"}
    if tcfg.operator_name == "inpainting" and size != 256:  # the official hole, scaled to the image size
        params["mask_opt"] = {"mask_type": "box"}
    if tcfg.operator_name == "nonlinear_blur" and args.random_weights:
        params["opt_yml_path"] = "./bkse/options/generate_blur/random_full.yml"  # full size, random weights
    op = get_operator(tcfg.operator_name, device=device, **params)
    if path == "fast" and hasattr(op, "channels_last"):
        op.channels_last()
    if path == "official":
        kernel = op.saved_state().get("kernel") if hasattr(op, "saved_state") else None
        op = ConvBlur(kernel) if kernel is not None and kernel.dim() == 2 else Autograd(op)
    settings.exact_transpose = path == "fast"
    if task_model and device.type == "cuda":
        model_cfg = load_model_config(ROOT / "model_configurations" / task_model)
    elif args.model_config and not task_model:
        model_cfg = load_model_config(args.model_config)
    else:
        model_cfg = dict(cpu_model)
    if args.random_weights:
        model_cfg["model_path"] = None
    fast_cuda = path == "fast" and device.type == "cuda"
    precision = args.precision or ("bf16" if fast_cuda else "auto")
    compiled = fast_cuda and not args.no_compile
    settings.cuda_graphs = compiled and args.compile_mode == "reduce-overhead"
    prior = cached_prior(model_cfg, pcfg, device, precision, args.compile_mode if compiled else False, path == "fast")
    times = []
    warmup_s = None
    n_runs = args.images + 1  # the first is a warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with official_attention(path == "official"):
        for r in range(n_runs):
            gens = [torch.Generator().manual_seed(1000 * r + b) for b in range(batch)]
            gt = torch.stack([torch.rand(3, size, size, generator=g) * 2 - 1 for g in gens]).to(device)
            states = [op.op.draw_state(g, gt.shape[1:]) if isinstance(op, Autograd) else
                      (op.draw_state(g, gt.shape[1:]) if hasattr(op, "draw_state") else {}) for g in gens]
            state = {k: torch.cat([s[k] for s in states]).to(device) for k in states[0]} if states[0] else {}
            with torch.no_grad():
                y = op.forward(gt, **state)
            sync(device)
            t0 = time.perf_counter()
            run_dcdp(y, op, prior, settings, gens, prior.init(gt.shape, gens), operator_state=state,
                     to_image=prior.to_image)  # with the NaN check of every round, as dcdp.py
            sync(device)
            if r > 0:
                times.append((time.perf_counter() - t0) / batch * K_full / settings.K)
            else:
                warmup_s = time.perf_counter() - t0
    full = pcfg.settings()
    failures = cuda_graph_failures(op)
    return {
        "task": task, "path": path, "batch": batch, "seconds_per_image": statistics.median(times),
        "nfe": sum(prior.nfe(T) for T in full.timesteps()), "dc_steps": full.K * full.tau,
        "rounds_timed": settings.K, "rounds_full": K_full, "image_size": size,
        "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "warmup_s": warmup_s, "precision": precision,
        "compiled": args.compile_mode if compiled else False,
        "dc_cuda_graphs": f"failed: {failures[0]}" if failures else settings.cuda_graphs,
        "device": str(device),
        "model": str(args.model_config or "demo UNet architecture (CPU default)"),
    }


def parse_row(spec: str, parser=None) -> tuple[str, int, Optional[int]]:
    """TASK:BATCH[:ROUNDS] → (task, batch, rounds or None); ConfigError naming the spec otherwise."""
    parts = spec.split(":")
    try:
        if parts[0] not in TASKS or len(parts) not in (2, 3):
            raise ValueError
        batch, rounds = int(parts[1]), int(parts[2]) if len(parts) == 3 else None
        if batch < 1 or (rounds is not None and rounds < 1):
            raise ValueError
        return parts[0], batch, rounds
    except ValueError:
        raise ConfigError(f"--rows: '{spec}' is not TASK:BATCH[:ROUNDS] with TASK one of {', '.join(sorted(TASKS))} "
                          f"and BATCH, ROUNDS positive integers, e.g. super_resolution:8:2") from None


def table(rows: list[dict]) -> str:
    head = (f"{'task':22} {'path':9} {'batch':>5} {'s/img':>9} {'NFE':>6} {'DC':>6} {'peak MB':>8} {'prec':>5} "
            f"{'warm-up s':>9} compiled")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['task']:22} {r['path']:9} {r['batch']:>5}  {r['error']}")
            continue
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"{r['task']:22} {r['path']:9} {r['batch']:>5} {r['seconds_per_image']:>9.3f} {r['nfe']:>6} "
                     f"{r['dc_steps']:>6} {mem:>8} {r['precision']:>5} {r['warmup_s']:>9.1f} {r['compiled']}")
    return "\n".join(lines)


def _purification_copy(src: Path, dst_dir: Path, max_rounds: Optional[int], exact_transpose: bool) -> Path:
    """A copy of a purification config with `exact_transpose` set and K capped at max_rounds (`capped_rounds`)."""
    import yaml

    raw = load_yaml(src, "purification config")
    block = raw["purification"]  # the official layout
    block["exact_transpose"] = exact_transpose
    block["total_num_iterations"], block["ddim_end_timestep"] = capped_rounds(
        block["total_num_iterations"], block["ddim_init_timestep"], block.get("ddim_end_timestep", 0), max_rounds)
    if "average_last_rounds" in block:  # the mean of the last rounds, over no more rounds than there are
        block["average_last_rounds"] = min(block["average_last_rounds"], block["total_num_iterations"])
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src.name
    dst.write_text(yaml.safe_dump(raw))
    return dst


def parity(args, device) -> list[dict]:
    """Mean PSNR of the reference path and of `dcdp.py --fast` on the demo prior and images, per demo task."""
    import dcdp

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for task in args.parity_tasks:
            src = ROOT / "purification_configurations" / "demo" / f"{task}.yaml"
            means, precision = {}, None
            for path in ("reference", "fast"):
                save = tmp / f"{task}_{path}"
                # the reference differentiates the operator with autograd, as the official code
                pur = _purification_copy(src, tmp / path, args.max_rounds, exact_transpose=path == "fast")
                argv = ["--task_config", str(ROOT / "task_configurations" / "demo" / f"{task}.yaml"),
                        "--purification_config", str(pur), "--model_config", str(args.parity_model_config),
                        "--data_root", str(ROOT / "data" / "demo"), "--save_dir", str(save), "--quiet",
                        "--no_curves", "--device", str(device), "--seed", "0"]
                if args.max_images:
                    argv += ["--max_images", str(args.max_images)]
                if path == "reference":
                    argv += ["--precision", "fp32", "--batch_size", "1"]
                else:
                    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
                    argv += ["--fast", "--batch_size", "8", "--precision", precision]
                t0 = time.perf_counter()
                if dcdp.main(argv) != 0:
                    raise SystemExit(f"parity: dcdp.py failed on {task} ({path})")
                summary = json.loads(next(save.glob("**/summary.json")).read_text())
                means[path] = (summary["metrics"]["psnr"]["mean"], summary["ok"], time.perf_counter() - t0)
            gap = means["fast"][0] - means["reference"][0]
            rows.append({"task": task, "images": means["fast"][1], "reference_psnr": means["reference"][0],
                         "fast_psnr": means["fast"][0], "gap_db": gap, "within_0_05_db": abs(gap) < 0.05,
                         "fast_precision": precision, "reference_wall_s": means["reference"][2],
                         "fast_wall_s": means["fast"][2], "max_rounds": args.max_rounds, "device": str(device)})
            print(f"parity {task}: reference {means['reference'][0]:.3f} dB, fast {means['fast'][0]:.3f} dB, "
                  f"gap {gap:+.3f} dB", file=sys.stderr, flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def parity_table(rows: list[dict]) -> str:
    lines = ["| task | images | reference PSNR | fast PSNR | fast − reference dB | within 0.05 dB | fast precision |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['images']} | {r['reference_psnr']:.3f} | {r['fast_psnr']:.3f} | "
                     f"{r['gap_db']:+.3f} | {'yes' if r['within_0_05_db'] else 'NO'} | {r['fast_precision']} |")
    return "\n".join(lines)


def check_args(args) -> None:
    """The flags' values, checked before anything runs: one ConfigError naming the flag, value and fix."""
    if args.images < 1:
        raise ConfigError(f"--images {args.images}: must be >= 1 (timed runs after the warm-up)")
    bad = [b for b in args.batch_sizes if b < 1]
    if bad:
        raise ConfigError(f"--batch_sizes {' '.join(map(str, args.batch_sizes))}: every batch size must be >= 1")
    if args.image_size is not None and (args.image_size < 8 or args.image_size % 8):
        raise ConfigError(f"--image_size {args.image_size}: must be a positive multiple of 8 (e.g. 64, 256)")
    if args.max_rounds is not None and args.max_rounds < 1:
        raise ConfigError(f"--max_rounds {args.max_rounds}: must be >= 1 (or leave it out for the full K)")
    if args.budget_s is not None and not args.budget_s >= 0:
        raise ConfigError(f"--budget_s {args.budget_s:g}: must be >= 0 seconds")
    if args.max_images is not None and args.max_images < 1:
        raise ConfigError(f"--max_images {args.max_images}: must be >= 1 (or leave it out for all images)")
    for flag, path in (("--model_config", args.model_config),
                       ("--parity_model_config", args.parity_model_config if args.parity else None)):
        if path is None:
            continue
        if not Path(path).is_file():
            raise ConfigError(f"{flag} '{path}' not found; give a model YAML, e.g. "
                              f"model_configurations/model_config_demo.yaml")
        load_model_config(path)  # ConfigError naming the file and key for a malformed config
    if args.json:
        folder = Path(args.json).resolve().parent
        if Path(args.json).is_dir():
            raise ConfigError(f"--json '{args.json}' is a folder; give a file name, e.g. bench.json")
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
                pass
        except OSError as exc:
            raise ConfigError(f"--json '{args.json}': cannot write in the folder '{folder}' "
                              f"({exc.strerror or type(exc).__name__}); create it or choose a writable path") from None


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0], command="python scripts/benchmark.py")
    p.add_argument("--tasks", nargs="+", default=["super_resolution", "inpainting", "gaussian_deblur", "motion_deblur",
                                                   "phase_retrieval"], choices=sorted(TASKS))
    p.add_argument("--paths", nargs="+", default=["official", "reference", "fast"], choices=("official", "reference", "fast"))
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--rows", nargs="+", default=None, metavar="TASK:BATCH[:ROUNDS]",
                   help="run these rows in this order instead of --tasks x --batch_sizes (ROUNDS: as --max_rounds)")
    p.add_argument("--images", type=int, default=3, help="timed runs after one warm-up (median is reported)")
    p.add_argument("--image_size", type=int, default=None, help="default: 256 on CUDA, 64 on the CPU")
    p.add_argument("--max_rounds", type=int, default=None, help="cap K and scale the time to the full K")
    p.add_argument("--model_config", default=None,
                   help="network architecture (default: model_config_ffhq.yaml on CUDA, the demo UNet on the CPU)")
    p.add_argument("--random_weights", action="store_true", help="allow random weights (timing only)")
    p.add_argument("--precision", default=None, choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--no_compile", action="store_true")
    p.add_argument("--compile_mode", default="reduce-overhead", choices=COMPILE_MODES,
                   help="torch.compile mode of the fast path on CUDA (reduce-overhead: with CUDA graphs; "
                        "'default': without; max-autotune: slow to compile)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write the rows to this JSON file (after every row)")
    p.add_argument("--budget_s", type=float, default=None, help="start no row after this many seconds (the first always runs)")
    p.add_argument("--parity", action="store_true",
                   help="quality parity of --fast against the reference path on the demo prior and images")
    p.add_argument("--parity_tasks", nargs="+", default=["super_resolution", "gaussian_deblur", "motion_deblur",
                                                          "inpainting", "denoising"], choices=DEMO_TASKS)
    p.add_argument("--parity_model_config", default=str(ROOT / "model_configurations" / "model_config_demo.yaml"))
    p.add_argument("--max_images", type=int, default=None, help="--parity: images per task (default: all)")
    return run_command(p, argv, run)


def run(args) -> int:
    check_args(args)
    if args.compile_mode == "default":
        args.compile_mode = True
    device = pick_device(args.device)
    if args.model_config is None and device.type == "cuda":
        args.model_config = str(ROOT / "model_configurations" / "model_config_ffhq.yaml")
    if args.image_size is None:
        args.image_size = 256 if device.type == "cuda" else 64
    if args.parity:  # dcdp.py's own numerics on both sides: no TF32 switched on here
        rows = parity(args, device)
        print(parity_table(rows))
        return 0 if all(r["within_0_05_db"] for r in rows) else 1
    if args.rows:
        plan = [(task, path, batch, rounds) for spec in args.rows for task, batch, rounds in [parse_row(spec)]
                for path in args.paths]
        if any(path != "fast" and batch != 1 for _, path, batch, _ in plan):
            raise ConfigError("--rows: the official and reference paths run at batch 1 only; give batch 1 or "
                              "--paths fast")
    else:
        plan = [(task, path, batch, None) for task in args.tasks for path in args.paths
                for batch in (args.batch_sizes if path == "fast" else [1])]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    rows = []
    start = time.perf_counter()
    for task, path, batch, rounds in plan:
        if rows and args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            row = {"task": task, "path": path, "batch": batch, "error": "skipped: --budget_s reached"}
        else:
            try:
                row = bench_one(task, path, batch, args, device, rounds)
            except DCDPError as exc:  # this row's config or checkpoint: one line, the other rows go on
                row = {"task": task, "path": path, "batch": batch, "error": f"{type(exc).__name__}: {exc}"}
            except Exception as exc:  # one failed row (OOM, compiler) must not lose the others
                traceback.print_exc()
                message = str(exc).splitlines()[0] if str(exc) else ""
                row = {"task": task, "path": path, "batch": batch, "error": f"{type(exc).__name__}: {message}"[:200]}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        result = row["error"] if "error" in row else f"{row['seconds_per_image']:.3f} s/img"
        print(f"{task} {path} b{batch}: {result}", file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 1 if any(r.get("error", "skipped").split(":")[0] != "skipped" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
