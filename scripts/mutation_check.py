"""Mutation check: does the test suite notice when the DCDP algorithm is changed?

    python scripts/mutation_check.py            # every mutation, each against the tests that should catch it
    python scripts/mutation_check.py --full     # every mutation against the whole suite (slow: the demo pins)
    python scripts/mutation_check.py --only warm_start final_tau   # some of them
    python scripts/mutation_check.py --list     # the mutations and their test files

Each mutation is a textual patch of the code: exact strings replaced by others. The repository's files
(`git ls-files`: tracked and untracked-but-not-ignored, as they are in the working tree) are copied once
into a temporary folder; each mutation is applied there, the chosen tests run with this repository's
Python (`.venv/bin/python` when present), and the file is restored before the next one. The working
tree is never touched.

A patch whose target string is not found exactly once stops the script (exit 2) before any test runs:
the code was refactored and the mutation must be rewritten to match it, not silently skipped.

A mutation is *caught* when pytest reports failing tests (exit 1); an exit status other than 0 or 1
(a collection error, an import error) is reported as caught too but marked, since it usually means the
patch broke the syntax rather than the algorithm. The unmutated copy is run first on the same tests
(unless --no-baseline): it must pass, or every "caught" would mean nothing.

Exit status: 0 when every mutation was caught, 1 when one survived, 2 for a stale patch or a failing
baseline.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutation:
    name: str
    description: str
    path: str                                   # file, relative to the repository root
    replacements: list[tuple[str, str]]         # (exact old string, new string), each old found exactly once
    tests: list[str] = field(default_factory=list)   # test files (or node ids) expected to catch it


MUTATIONS = [
    # --- the DCDP loop (issue 15) ---
    Mutation(
        "warm_start", "data consistency restarted from x_init every round instead of the current x",
        "guided_diffusion/solver.py",
        [("            y, x, forward, steps, settings.lr,", "            y, x_init, forward, steps, settings.lr,")],
        ["tests/test_dcdp_loop.py"]),
    Mutation(
        "noise_level", "pixel prior noises at T_k instead of T_k - 1",
        "guided_diffusion/priors.py",
        [("x_t = q_sample(x, T_k - 1, noise)", "x_t = q_sample(x, T_k, noise)")],
        ["tests/test_dcdp_loop.py"]),
    Mutation(
        "same_seed", "every image of a run gets the same seed (args.seed instead of args.seed + i)",
        "runner/restore.py",
        [("torch.Generator().manual_seed(args.seed + i)", "torch.Generator().manual_seed(args.seed)")],
        ["tests/test_driver_noise.py"]),
    Mutation(
        "ddim_tweedie_swap", "DDIM and Tweedie swapped inside the pixel prior's purify (nfe() unchanged)",
        "guided_diffusion/priors.py",
        [("        if self.full_ddim:\n"
          "            return ddim_denoise(self._eps_model, x_t, T_k, self.n)\n"
          "        return tweedie_denoise(self._eps_model, x_t, T_k)\n",
          "        if self.full_ddim:\n"
          "            return tweedie_denoise(self._eps_model, x_t, T_k)\n"
          "        return ddim_denoise(self._eps_model, x_t, T_k, self.n)\n")],
        ["tests/test_dcdp_loop.py"]),
    Mutation(
        "final_tau", "the last round's tau (final_csgm_num_iterations) applied to the first round",
        "guided_diffusion/solver.py",
        [("settings.final_tau is not None and k == settings.K - 1", "settings.final_tau is not None and k == 0")],
        ["tests/test_dcdp_loop.py"]),
    # --- components (pinned by the official goldens) ---
    Mutation(
        "momentum_sign", "closed-form SGD: momentum buffer decays with -mu instead of mu",
        "guided_diffusion/fast_dc.py",
        [("buf.mul_(momentum).add_(g)", "buf.mul_(-momentum).add_(g)")],
        ["tests/test_solver.py", "tests/test_dcdp_loop.py"]),
    Mutation(
        "ddim_stride", "DDIM respacing stride S/m instead of (S-1)/(m-1)",
        "guided_diffusion/gaussian_diffusion.py",
        [("stride = (S - 1) / (m - 1)", "stride = S / m")],
        ["tests/test_diffusion.py"]),
    Mutation(
        "bicubic_a", "bicubic resize with Keys' a = -0.75 (OpenCV) instead of a = -0.5 (MATLAB)",
        "util/resizer.py",
        [("inner = (1.5 * ad3 - 2.5 * ad2 + 1.0) * (ad <= 1)", "inner = (1.25 * ad3 - 2.25 * ad2 + 1.0) * (ad <= 1)"),
         ("outer = (-0.5 * ad3 + 2.5 * ad2 - 4.0 * ad + 2.0)", "outer = (-0.75 * ad3 + 3.75 * ad2 - 6.0 * ad + 3.0)")],
        ["tests/test_operators.py"]),
    Mutation(
        "zero_padding", "blurs pad with zeros instead of reflecting",
        "util/fft.py",
        [('xpad = torch.nn.functional.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")',
          'xpad = torch.nn.functional.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode="constant")')],
        ["tests/test_operators.py"]),
    Mutation(
        "no_x0_clip", "x0-hat not clipped to [-1, 1]",
        "guided_diffusion/gaussian_diffusion.py",
        [("    return x0.clamp(-1.0, 1.0) if clip else x0\n", "    return x0\n")],
        ["tests/test_diffusion.py"]),
    Mutation(
        "batch_mean_loss", "data-consistency loss is the batch mean instead of the sum of per-image means",
        "guided_diffusion/solver.py",
        [("return err.flatten(1).mean(dim=1).sum()", "return err.mean()")],
        ["tests/test_solver.py"]),
    Mutation(
        "average_window", "average_last_rounds averages one round too few (the last m - 1 rounds, divided by m)",
        "guided_diffusion/solver.py",
        [("if m > 1 and k >= settings.K - m:", "if m > 1 and k > settings.K - m:")],
        ["tests/test_final_dc.py"]),
    Mutation(
        "frame_not_undone", "purification_transforms: the quarter turn repeated instead of undone after purification",
        "guided_diffusion/solver.py",
        [("return torch.rot90(x, -turns, dims=(-2, -1)) if turns else x",
          "return torch.rot90(x, turns, dims=(-2, -1)) if turns else x")],
        ["tests/test_final_dc.py"]),
]


def repository_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    return sorted({p for p in out.split("\0") if p and (root / p).is_file()})


def copy_repository(root: Path, dest: Path) -> None:
    for rel in repository_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def patched(text: str, m: Mutation) -> str:
    """The mutated text; SystemExit(2) naming the mutation when a target is not found exactly once."""
    for old, new in m.replacements:
        n = text.count(old)
        if n != 1:
            raise SystemExit(f"mutation '{m.name}': {'not found' if n == 0 else f'found {n} times'} in {m.path}:\n"
                             f"    {old!r}\nthe code changed: rewrite this mutation in scripts/mutation_check.py")
        text = text.replace(old, new)
    return text


def check_patches(mutations: list[Mutation], root: Path) -> None:
    for m in mutations:
        patched((root / m.path).read_text(), m)


def python_executable(root: Path) -> str:
    venv = root / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run_tests(python: str, workdir: Path, tests: list[str], timeout: float,
              stop_first: bool = False) -> tuple[int, list[str], float]:
    """pytest's exit status, the failing tests (node ids) and the seconds it took."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    cmd = [python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *(["-x"] if stop_first else []), *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, ["(timed out)"], time.perf_counter() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.M)
    if proc.returncode not in (0, 1) and not failed:
        failed = [line for line in (proc.stdout + proc.stderr).strip().splitlines()[-3:]]
    return proc.returncode, failed, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="run the whole test suite for every mutation")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these mutations")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated copy")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per test run (default 1800)")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    p.add_argument("-x", "--stop-first", action="store_true",
                   help="stop each test run at its first failure (faster; the table then counts one)")
    args = p.parse_args(argv)

    mutations = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        if unknown:
            p.error(f"unknown mutation(s) {', '.join(unknown)}; valid: {', '.join(m.name for m in MUTATIONS)}")
        mutations = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in mutations:
            print(f"{m.name:18s} {m.path:40s} {' '.join(m.tests)}\n{'':18s} {m.description}")
        return 0

    check_patches(mutations, ROOT)   # every target present before anything runs
    python = python_executable(ROOT)
    tmp = Path(tempfile.mkdtemp(prefix="dcdp_mutation_"))
    rows = []
    try:
        copy_repository(ROOT, tmp)
        print(f"copy: {tmp}   python: {python}   tests: {'full suite' if args.full else 'per mutation'}", flush=True)
        if not args.no_baseline:
            tests = ["tests"] if args.full else sorted({t for m in mutations for t in m.tests})
            rc, failed, secs = run_tests(python, tmp, tests, args.timeout)
            print(f"baseline (unmutated): exit {rc} in {secs:.0f} s", flush=True)
            if rc != 0:
                print("the unmutated code fails these tests; fix that first:\n  " + "\n  ".join(failed))
                return 2
        for m in mutations:
            target = tmp / m.path
            original = target.read_text()
            target.write_text(patched(original, m))
            try:
                rc, failed, secs = run_tests(python, tmp, ["tests"] if args.full else m.tests, args.timeout,
                                             args.stop_first)
            finally:
                target.write_text(original)
            if rc == 0:
                verdict = "SURVIVED"
            elif rc == 1:
                verdict = "caught"
            else:
                verdict = f"caught (exit {rc})"
            rows.append((m, verdict, failed, secs))
            print(f"  {m.name}: {verdict} ({secs:.0f} s)", flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print("| mutation | what | tests run | result | failing tests | s |")
    print("|---|---|---|---|---|---|")
    for m, verdict, failed, secs in rows:
        names = [f.split("/")[-1] for f in failed]
        shown = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
        tests = "full suite" if args.full else ", ".join(Path(t).name for t in m.tests)
        print(f"| {m.name} | {m.description} | {tests} | {verdict} | {shown} | {secs:.0f} |")
    survived = [m.name for m, verdict, _, _ in rows if verdict == "SURVIVED"]
    if survived:
        print(f"\nsurvived: {', '.join(survived)}")
        return 1
    print(f"\nall {len(rows)} mutations caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
