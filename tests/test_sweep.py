"""Grid sweeps (`dcdp.py --sweep`): expansion and naming, the table and plots, failed points, Ctrl-C and --resume."""
import csv
import json
from pathlib import Path

import pytest
from PIL import Image

import dcdp
import runner.restore
from tests.test_driver import args, setup  # noqa: F401  (setup is a fixture)
from util.errors import ConfigError
from runner.sweep import Axis, grid, parse_axes, split_values, sweep_folder


def test_values_split_at_top_level_commas_and_one_value_axes_are_overrides():
    assert split_values("1e3,1e4, 1e5") == ["1e3", "1e4", "1e5"]
    assert split_values("[1,3,32,32],[1,3,64,64]") == ["[1,3,32,32]", "[1,3,64,64]"]
    axes, fixed = parse_axes(["purification.lr=1e3,1e4", "purification.momentum=0.5",
                              "purification.csgm_num_iterations=50,100,200"])
    assert axes == [Axis("purification.lr", ("1e3", "1e4")), Axis("purification.csgm_num_iterations", ("50", "100", "200"))]
    assert fixed == ["purification.momentum=0.5"]
    points = grid(axes)  # the first axis varies slowest
    assert len(points) == 6 and points[0] == {"purification.lr": "1e3", "purification.csgm_num_iterations": "50"}
    assert points[3] == {"purification.lr": "1e4", "purification.csgm_num_iterations": "50"}


def test_a_sweep_file_gives_the_same_axes(tmp_path):
    f = tmp_path / "grid.yaml"
    f.write_text("sweep:\n  purification.lr: [1.0e3, 1.0e4]\n  purification.full_ddim: [true, false]\n")
    axes, fixed = parse_axes([str(f)])
    assert axes == [Axis("purification.lr", ("1.0e3", "1.0e4")), Axis("purification.full_ddim", ("true", "false"))]
    assert fixed == []


@pytest.mark.parametrize("items,message", [
    (["purification.lr=1e3,,1e4"], "empty value"),
    (["purification.lr=1e3,1e3"], "repeated"),
    (["purification.lr=1e3,1e4", "purification.lr=1e5,1e6"], "given twice"),
    (["purifcation.lr=1e3,1e4"], "unknown first key 'purifcation'"),
    (["lr"], "expected KEY=V1,V2"),
    (["missing.yaml"], "no such file"),
])
def test_bad_axes_are_one_line_errors(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_axes(items)


def test_the_sweep_folder_is_named_by_its_keys_and_settings(setup):
    a = dcdp.parse_args(args(setup, "--sweep", "purification.lr=1e3,1e4"))
    axes, fixed = parse_axes(a.sweep)
    folder = sweep_folder(a, axes, fixed)
    assert folder.parent == setup["out"] / "sweeps" and folder.name.startswith("lr_")
    assert sweep_folder(dcdp.parse_args(args(setup, "--resume", "--sweep", "purification.lr=1e3,1e4")),
                        axes, fixed) == folder  # --resume finds the same folder
    other = dcdp.parse_args(args(setup, "--seed", "3", "--sweep", "purification.lr=1e3,1e4"))
    assert sweep_folder(other, axes, fixed) != folder


GRID = ("--sweep", "purification.lr=100,10000", "purification.csgm_num_iterations=2,3")


def run_grid(p, *extra):
    return dcdp.main(args(p, "--no_curves", "--max_images", "1", "--seed", "0", *extra, *GRID))


def sweep_dir(p):
    (folder,) = (p["out"] / "sweeps").iterdir()
    return folder


def test_a_grid_writes_one_run_per_point_and_a_table_of_their_numbers(setup):
    assert run_grid(setup) == 0
    folder = sweep_dir(setup)
    rows = list(csv.DictReader(open(folder / "sweep.csv")))
    assert [(r["purification.lr"], r["purification.csgm_num_iterations"]) for r in rows] == [
        ("100", "2"), ("100", "3"), ("10000", "2"), ("10000", "3")]
    for r in rows:  # each point is an ordinary run folder; its row holds that run's numbers
        summary = json.loads(open(f"{r['run_dir']}/summary.json").read())
        assert summary["resolved"]["purification"]["purification"]["lr"] == float(r["purification.lr"])
        assert summary["resolved"]["purification"]["purification"]["csgm_num_iterations"] == int(r["purification.csgm_num_iterations"])
        assert float(r["psnr"]) == pytest.approx(summary["metrics"]["psnr"]["mean"], abs=1e-12)
        assert float(r["ssim"]) == pytest.approx(summary["metrics"]["ssim"]["mean"], abs=1e-12)
        assert float(r["seconds_per_image"]) == pytest.approx(summary["metrics"]["seconds"]["mean"])
        assert float(r["nfe"]) == 4 + 4 + 2  # K = 3 rounds from T 100, 4 DDIM steps (test_driver)
        assert r["status"] == "ok"
    assert len({r["run_dir"] for r in rows}) == 4
    best = max(range(4), key=lambda i: float(rows[i]["psnr"]))
    assert [int(r["best"]) for r in rows] == [int(i == best) for i in range(4)]
    md = (folder / "sweep.md").read_text()
    assert md.count("**best**") == 1 and "| purification.lr | purification.csgm_num_iterations |" in md
    for name in ("plot_purification.lr.png", "plot_purification.csgm_num_iterations.png", "heatmap.png"):
        with Image.open(folder / name) as im:
            assert im.width > 300 and im.height > 200
    assert json.loads((folder / "sweep.json").read_text())["axes"] == {
        "purification.lr": ["100", "10000"], "purification.csgm_num_iterations": ["2", "3"]}


def test_a_failed_or_diverged_point_is_a_row_and_the_sweep_goes_on(setup):
    code = dcdp.main(args(setup, "--no_curves", "--max_images", "1", "--sweep", "purification.lr=-1,1e30,100"))
    assert code == dcdp.EXIT_FAILED_IMAGES
    rows = list(csv.DictReader(open(sweep_dir(setup) / "sweep.csv")))
    assert [r["status"] for r in rows] == ["error", "failed", "ok"]
    assert "lr" in rows[0]["reason"] and rows[0]["run_dir"] == ""   # refused value: no run folder
    assert "non-finite" in rows[1]["reason"] and rows[1]["psnr"] == ""
    assert rows[2]["best"] == "1"


def test_an_interrupted_sweep_resumed_runs_only_the_missing_points(setup, monkeypatch):
    real = runner.restore.restore_batch
    calls = []

    def interrupt_third_point(ctx, batch, lpips):
        calls.append(ctx.root)
        if len(set(calls)) == 3:
            raise KeyboardInterrupt
        return real(ctx, batch, lpips)

    monkeypatch.setattr(runner.restore, "restore_batch", interrupt_third_point)
    assert run_grid(setup) == dcdp.EXIT_INTERRUPTED
    rows = list(csv.DictReader(open(sweep_dir(setup) / "sweep.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok", "interrupted"]
    assert "not run yet" in (sweep_dir(setup) / "sweep.md").read_text()
    finished = {r["run_dir"]: (Path(r["run_dir"]) / "recon" / "00000.png").stat().st_mtime_ns for r in rows[:2]}

    calls.clear()
    monkeypatch.setattr(runner.restore, "restore_batch", lambda ctx, batch, lpips: (calls.append(ctx.root), real(ctx, batch, lpips))[1])
    assert run_grid(setup, "--resume") == 0
    rows = list(csv.DictReader(open(sweep_dir(setup) / "sweep.csv")))
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert {str(c) for c in calls} == {rows[2]["run_dir"], rows[3]["run_dir"]}  # only the missing points ran
    for run_dir, mtime in finished.items():
        assert (Path(run_dir) / "recon" / "00000.png").stat().st_mtime_ns == mtime
