"""Runs that survive faults: torchrun sharding, kill-and-resume, out-of-memory retry."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import dcdp
import runner.restore
from tests.test_driver import args, run_dir, setup, write_images  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent


def outputs(root: Path) -> dict:
    """Every recon picture and measurement of a run, by name."""
    found = {}
    for p in sorted(root.rglob("*")):
        if p.parent.name == "recon":
            found[p.relative_to(root).as_posix()] = np.asarray(Image.open(p), dtype=int)
        elif p.parent.name == "measurements":
            found[p.relative_to(root).as_posix()] = torch.load(p).numpy()
    return found


def assert_same_outputs(a: Path, b: Path) -> None:
    oa, ob = outputs(a), outputs(b)
    assert oa.keys() == ob.keys() and oa
    for k in oa:
        assert np.abs(oa[k] - ob[k]).max() <= (1 if k.startswith("recon") else 1e-5), k


def cli(p, *extra):
    return [sys.executable, str(ROOT / "dcdp.py"), *args(p, "--no_curves", *extra)]


def slow_setup(p, images=4):
    write_images(p["data"], images)
    pur = yaml.safe_load(p["pur"].read_text())
    pur["total_num_iterations"], pur["csgm_num_iterations"] = 6, 20
    p["pur"].write_text(yaml.safe_dump(pur))


def test_torchrun_two_processes_equals_single_process(setup):
    slow_setup(setup)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = dict(setup, out=setup["out"].parent / "single")
    subprocess.run(cli(single), check=True, env=env, cwd=ROOT, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                    *cli(setup)[1:]], check=True, env=env, cwd=ROOT, timeout=300)
    assert_same_outputs(run_dir(single), run_dir(setup))
    summary = (run_dir(setup) / "metrics.csv").read_text().splitlines()
    assert len(summary) == 1 + 4 and '"world_size": 2' in (run_dir(setup) / "summary.json").read_text()


def test_killed_run_resumes_to_identical_outputs(setup):
    slow_setup(setup)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = dict(setup, out=setup["out"].parent / "full")
    subprocess.run(cli(full), check=True, env=env, cwd=ROOT, timeout=300)
    proc = subprocess.Popen(cli(setup), env=env, cwd=ROOT)
    deadline = time.time() + 240
    while time.time() < deadline and not list(setup["out"].glob("*/*/*/*/metrics/00000.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    root = run_dir(setup)
    assert not (root / "metrics" / "00003.json").exists(), "the run finished before it could be killed"
    subprocess.run(cli(setup, "--resume"), check=True, env=env, cwd=ROOT, timeout=300)
    assert_same_outputs(run_dir(full), root)
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]


def test_out_of_memory_retries_with_smaller_batch(setup, monkeypatch, caplog):
    real = runner.restore.restore_batch
    calls = []

    def flaky(ctx, batch, *a, **k):
        calls.append(len(batch))
        if len(batch) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(ctx, batch, *a, **k)

    monkeypatch.setattr(runner.restore, "restore_batch", flaky)
    caplog.set_level("WARNING")
    assert dcdp.main(args(setup, "--no_curves", "--batch_size", "2")) == 0
    assert calls == [2, 1, 1] and "retrying with --batch_size 1" in caplog.text
