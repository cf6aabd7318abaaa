"""The benchmark command runs on the CPU (tiny setting), and the fast path keeps the results."""
import json

import pytest

import numpy as np
import torch
import yaml

from guided_diffusion.measurements import get_operator
from guided_diffusion.priors import PixelPrior
from guided_diffusion.solver import DCDPSettings, run_dcdp
from guided_diffusion.unet import create_model
from scripts import benchmark
from tests.test_driver import TINY_UNET
from util.metrics import psnr


def test_benchmark_command_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    model = tmp_path / "tiny.yaml"
    model.write_text(yaml.safe_dump(TINY_UNET))
    assert benchmark.main(["--tasks", "gaussian_deblur", "--batch_sizes", "2", "--images", "1", "--image_size", "32",
                           "--max_rounds", "2", "--random_weights", "--device", "cpu", "--json", str(out),
                           "--model_config", str(model)]) == 0
    rows = json.loads(out.read_text())
    assert [r["path"] for r in rows] == ["official", "reference", "fast"]
    assert all(r["seconds_per_image"] > 0 and r["nfe"] == 182 and r["dc_steps"] == 1000 for r in rows)
    assert "gaussian_deblur" in capsys.readouterr().out


def test_fast_path_matches_reference_path_within_0_05_db():
    """Fast path (batched, exact Aᵀ gradient, channels-last) against the reference (batch 1, autograd)."""
    torch.manual_seed(0)
    model = create_model(**TINY_UNET)
    with torch.no_grad():  # a fresh ADM UNet outputs zeros: give every layer weights
        for p in model.parameters():
            p.normal_(0, 0.05)
    op = get_operator("super_resolution", in_shape=[1, 3, 32, 32], scale_factor=4)
    gt = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = op.forward(gt)
    seeds = [0, 1, 2, 3]
    settings = dict(K=4, tau=20, lr=1000.0, T_init=100, T_end=0)

    ref = []
    prior = PixelPrior(model, ddim_num_iterations=5, precision="fp32")
    for b in range(4):
        r = run_dcdp(y[b:b + 1], op, prior, DCDPSettings(**settings), [torch.Generator().manual_seed(seeds[b])],
                     torch.zeros(1, 3, 32, 32))
        ref.append(r.x)
    ref = torch.cat(ref)
    fast_prior = PixelPrior(model.to(memory_format=torch.channels_last), ddim_num_iterations=5, precision="fp32")
    fast = run_dcdp(y, op, fast_prior, DCDPSettings(**settings, exact_transpose=True),
                    [torch.Generator().manual_seed(s) for s in seeds], torch.zeros(4, 3, 32, 32), check_finite=False).x
    gap = abs(np.mean(psnr(gt, fast)) - np.mean(psnr(gt, ref)))
    assert gap < 0.05, gap


def test_rows_run_in_order_with_their_rounds_and_a_failed_row_is_recorded(tmp_path):
    out = tmp_path / "bench.json"
    model = tmp_path / "tiny.yaml"
    model.write_text(yaml.safe_dump(TINY_UNET))
    common = ["--paths", "fast", "--images", "1", "--image_size", "32", "--random_weights", "--device", "cpu",
              "--json", str(out)]
    assert benchmark.main(common + ["--rows", "phase_retrieval:2:1", "super_resolution:1", "--max_rounds", "2",
                                    "--model_config", str(model)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["task"], r["batch"], r["rounds_timed"]) for r in rows] == [("phase_retrieval", 2, 1),
                                                                         ("super_resolution", 1, 2)]


def test_a_failed_row_is_recorded_and_the_others_go_on(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    model = tmp_path / "tiny.yaml"
    model.write_text(yaml.safe_dump(TINY_UNET))

    def out_of_memory(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    monkeypatch.setattr(benchmark, "bench_one", out_of_memory)
    # a broken row (here: out of memory) is recorded, the next rows still run, rows past --budget_s are skipped
    assert benchmark.main(["--paths", "fast", "--images", "1", "--image_size", "32", "--random_weights", "--device",
                           "cpu", "--json", str(out), "--rows", "super_resolution:1", "gaussian_deblur:1",
                           "--budget_s", "0", "--model_config", str(model)]) == 1
    rows = json.loads(out.read_text())
    assert rows[0]["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows[1]["error"] == "skipped: --budget_s reached"


@pytest.mark.parametrize("flags, expected", [
    (["--images", "0"], "--images 0: must be >= 1"),
    (["--batch_sizes", "1", "0"], "--batch_sizes 1 0: every batch size must be >= 1"),
    (["--image_size", "30"], "--image_size 30: must be a positive multiple of 8"),
    (["--max_rounds", "0"], "--max_rounds 0: must be >= 1"),
    (["--budget_s", "-5"], "--budget_s -5: must be >= 0 seconds"),
    (["--max_images", "0"], "--max_images 0: must be >= 1"),
    (["--images", "three"], "argument --images: invalid int value: 'three'"),
    (["--tasks", "deblurring"], "argument --tasks: invalid choice: 'deblurring'"),
    (["--compile_mode", "fastest"], "argument --compile_mode: invalid choice: 'fastest'"),
    (["--parity", "--parity_tasks", "phase_retrieval"], "argument --parity_tasks: invalid choice: 'phase_retrieval'"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device; use auto, cpu, cuda or cuda:N"),
    (["--rows", "super_resolution:two"], "--rows: 'super_resolution:two' is not TASK:BATCH[:ROUNDS]"),
    (["--rows", "super_resolution:8"], "--rows: the official and reference paths run at batch 1 only"),
    (["--model_config", "MISSING"], "--model_config 'MISSING' not found; give a model YAML"),
    (["--parity", "--parity_model_config", "MISSING"], "--parity_model_config 'MISSING' not found"),
    (["--json", "no/such/folder/b.json"], "--json 'no/such/folder/b.json': cannot write in the folder"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, flags, expected):
    monkeypatch.chdir(tmp_path)
    assert benchmark.main(["--random_weights", "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_parity_mode_compares_fast_with_reference_on_the_demo_prior(tmp_path, capsys):
    out = tmp_path / "parity.json"
    assert benchmark.main(["--parity", "--parity_tasks", "super_resolution", "--max_rounds", "1", "--max_images", "1",
                           "--device", "cpu", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["task"] == "super_resolution" and row["images"] == 1 and row["within_0_05_db"]
    # one round (K capped at 1: 20 steps at lr 2000, one Tweedie step at T = 300) of the demo SR config on astronaut
    assert abs(row["gap_db"]) < 0.05 and row["reference_psnr"] == pytest.approx(19.336, abs=0.05)
    assert "| super_resolution | 1 |" in capsys.readouterr().out
