"""Issue 12: a run folder holds one run; bad input is one line (exit 2) before anything is written."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import dcdp
import runner.restore
from tests.test_driver import args, setup, write_images  # noqa: F401  (the fixture)


def summaries(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/*/*/*/summary.json"))]


def edit(path: Path, fn) -> None:
    d = yaml.safe_load(path.read_text())
    fn(d)
    path.write_text(yaml.safe_dump(d))


def last_error(caplog, capsys) -> str:
    text = caplog.text + capsys.readouterr().err
    return [ln for ln in text.splitlines() if "error" in ln][-1]


def test_another_data_root_is_another_folder_and_summaries_hold_only_their_images(setup, tmp_path):
    assert dcdp.main(args(setup, "--no_curves")) == 0
    other = tmp_path / "other"
    write_images(other, 1)
    assert dcdp.main(args(setup, "--no_curves", "--data_root", str(other))) == 0
    by_images = sorted((s["images"], s["ok"]) for s in summaries(setup["out"]))
    assert by_images == [(1, 1), (2, 2)]


def test_another_loss_is_another_folder(setup):
    assert dcdp.main(args(setup, "--no_curves")) == 0
    assert dcdp.main(args(setup, "--no_curves", "--max_images", "1", "purification.loss=L1")) == 0
    runs = {s["resolved"]["purification"]["purification"]["loss"]: s["images"] for s in summaries(setup["out"])}
    assert runs == {"L2": 2, "L1": 1}


def test_resume_with_fewer_images_summarises_only_those(setup, capsys):
    assert dcdp.main(args(setup, "--no_curves")) == 0
    capsys.readouterr()
    assert dcdp.main(args(setup, "--no_curves", "--resume", "--max_images", "1")) == 0
    assert "over 1 image(s)" in capsys.readouterr().out
    (summary,) = summaries(setup["out"])
    assert summary["images"] == 1 and summary["ok"] == 1


@pytest.mark.parametrize("key,value,words", [
    ("full_ddim", "false", ["full_ddim = 'false'", "true or false"]),
    ("purify", "False", ["purify = 'False'", "true or false"]),
    ("csgm_num_iterations", 0, ["csgm_num_iterations = 0", ">= 1"]),
    ("csgm_num_iterations", -1, ["csgm_num_iterations = -1"]),
    ("lr", -1000, ["lr = -1000", "> 0"]),
    ("lr", "abc", ["lr = 'abc'", "a number"]),
    ("momentum", 5, ["momentum = 5", "< 1"]),
    ("optimizer", "sgd", ["optimizer = 'sgd'", "SGD, Adam"]),
    ("loss", "L3", ["loss = 'L3'", "L2, L1"]),
    ("ddim_num_iterations", 1, ["ddim_num_iterations = 1", ">= 2"]),
])
def test_bad_values_fail_before_anything_is_written(setup, caplog, capsys, key, value, words):
    assert dcdp.main(args(setup, "--no_curves")) == 0  # a finished run in the same save_dir
    (root,) = setup["out"].glob("*/*/*/*")
    record = (root / "run_config.json").read_text()
    original = setup["pur"].read_text()
    edit(setup["pur"], lambda d: d.update({key: value}))
    assert dcdp.main(args(setup, "--no_curves")) == dcdp.EXIT_BAD_INPUT
    line = last_error(caplog, capsys)
    assert str(setup["pur"]) in line and all(w in line for w in words), line
    assert [p for p in setup["out"].glob("*/*/*/*")] == [root] and (root / "run_config.json").read_text() == record
    setup["pur"].write_text(original)
    assert dcdp.main(args(setup, "--no_curves", "--resume")) == 0  # the finished run still resumes


@pytest.mark.parametrize("flags,words", [
    (["--max_images", "0"], ["--max_images", ">= 1"]), (["--max_images", "-1"], ["--max_images"]),
    (["--batch_size", "0"], ["--batch_size", ">= 1"]), (["--batch_size", "-3"], ["--batch_size"]),
    (["--device", "foo"], ["--device 'foo'"]), (["--device", "cuda:7"], ["--device"]),
])
def test_bad_flags_are_one_line_errors(setup, caplog, capsys, flags, words):
    assert dcdp.main(args(setup, *flags)) == dcdp.EXIT_BAD_INPUT
    line = last_error(caplog, capsys)
    assert all(w in line for w in words), line
    assert not setup["out"].exists()


def test_model_config_without_model_path_is_refused(setup, caplog, capsys):
    edit(setup["model"], lambda d: d.pop("model_path"))
    assert dcdp.main(args(setup)) == dcdp.EXIT_BAD_INPUT
    assert "has no model_path" in last_error(caplog, capsys) and "--random_weights" in caplog.text
    assert dcdp.main(args(setup, "--no_curves", "--random_weights", "--max_images", "1")) == 0
    (summary,) = summaries(setup["out"])
    assert summary["random_weights"] is True and summary["run_dir"].split("_")[-2] == "weights"


def test_a_task_file_given_as_model_config_is_refused(setup, caplog, capsys):
    setup["model"] = setup["task"]
    assert dcdp.main(args(setup)) == dcdp.EXIT_BAD_INPUT
    assert "is not a model config" in last_error(caplog, capsys)


@pytest.mark.parametrize("mutate,words", [
    (lambda d: d.update(dataset="folder"), ["'dataset' must be a mapping"]),
    (lambda d: d.update(others={"img_size": "big"}), ["others.img_size = 'big'"]),
])
def test_malformed_blocks_are_one_line_errors(setup, caplog, capsys, mutate, words):
    edit(setup["pur"], mutate)
    assert dcdp.main(args(setup)) == dcdp.EXIT_BAD_INPUT
    line = last_error(caplog, capsys)
    assert all(w in line for w in words), line


def test_scalar_img_size_is_accepted(setup):
    edit(setup["pur"], lambda d: d.update(others={"img_size": 32}))
    assert dcdp.main(args(setup, "--no_curves", "--max_images", "1")) == 0


def test_a_png_given_as_config_and_a_file_as_save_dir(setup, tmp_path, caplog, capsys):
    png = tmp_path / "data" / "img0.png"
    setup_png = dict(setup, pur=png)
    assert dcdp.main(args(setup_png)) == dcdp.EXIT_BAD_INPUT
    assert "is not a text (YAML) file" in last_error(caplog, capsys)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert dcdp.main(args(dict(setup, out=blocker))) == dcdp.EXIT_BAD_INPUT
    assert "is a file, not a folder" in last_error(caplog, capsys)


def test_an_odd_sized_image_is_that_images_failure(setup):
    edit(setup["pur"], lambda d: d.pop("others"))
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (31, 33, 3), dtype=np.uint8)).save(setup["data"] / "img05.png")
    assert dcdp.main(args(setup, "--no_curves")) == dcdp.EXIT_FAILED_IMAGES
    (summary,) = summaries(setup["out"])
    assert summary["ok"] == 2 and summary["failed"] == 1
    assert "img05.png" in summary["failures"][0]["file"] and "not a multiple" in summary["failures"][0]["reason"]


def test_ctrl_c_summarises_the_finished_images(setup, monkeypatch, caplog):
    real = runner.restore.restore_batch
    calls = []

    def interrupted(ctx, batch, *a):
        calls.append(batch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(ctx, batch, *a)

    monkeypatch.setattr(runner.restore, "restore_batch", interrupted)
    assert dcdp.main(args(setup, "--no_curves")) == dcdp.EXIT_INTERRUPTED
    assert "interrupted after 1 of 2 images; rerun the same command with --resume" in caplog.text
    (summary,) = summaries(setup["out"])
    assert summary["ok"] == 1 and summary["missing"] == 1
    (root,) = setup["out"].glob("*/*/*/*")
    assert not (root / ".lock").exists()
    monkeypatch.setattr(runner.restore, "restore_batch", real)
    assert dcdp.main(args(setup, "--no_curves", "--resume")) == 0
    (summary,) = summaries(setup["out"])
    assert summary["ok"] == 2 and summary["missing"] == 0


def test_a_folder_held_by_a_live_run_is_refused(setup, caplog, capsys):
    import os
    import socket

    assert dcdp.main(args(setup, "--no_curves", "--max_images", "1")) == 0
    (root,) = setup["out"].glob("*/*/*/*")
    # the parent of this test process is alive: a lock in its name is held by a live run
    (root / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                            "started": "2026-12-02T00:00:00", "shared_id": None, "argv": ["dcdp.py"]}))
    assert dcdp.main(args(setup, "--no_curves", "--resume")) == dcdp.EXIT_BAD_INPUT
    line = last_error(caplog, capsys)
    assert str(os.getppid()) in line and "in use" in line


def test_two_real_processes_racing_into_one_folder(setup):
    """A second dcdp.py into the folder of a live one is refused (one line naming the holder, exit 2);
    the first finishes untouched, and the refused command then resumes into the finished folder."""
    import subprocess
    import sys
    import time

    write_images(setup["data"], 12)
    edit(setup["pur"], lambda d: d.update(total_num_iterations=8))
    command = [sys.executable, str(Path(dcdp.__file__)), *args(setup, "--no_curves")]
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(setup["out"].glob("*/*/*/*/.lock")):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.05)
        second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert first.poll() is None, "the first run ended before the second was refused: make it longer"
    finally:
        out, err = first.communicate(timeout=300)
    assert second.returncode == dcdp.EXIT_BAD_INPUT
    (line,) = [ln for ln in second.stderr.splitlines() if ln.startswith("error")]
    assert f"is in use by pid {first.pid} on host {__import__('socket').gethostname()}" in line
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, err
    (summary,) = summaries(setup["out"])
    assert summary["ok"] == 12 and summary["resolved"]["seed"] == 0
    (root,) = setup["out"].glob("*/*/*/*")
    assert not (root / ".lock").exists()
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    (summary,) = summaries(setup["out"])
    assert summary["ok"] == 12 and summary["resolved"]["seed"] == 0


def test_a_warning_is_printed_once_above_the_progress_bar(setup):
    """With the progress bar on, a log line goes through tqdm once (not also through the root handler)."""
    import subprocess
    import sys

    (setup["data"] / "img1.png").write_text("not a picture")
    command = [sys.executable, str(Path(dcdp.__file__)), *[a for a in args(setup, "--no_curves") if a != "--quiet"]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == dcdp.EXIT_FAILED_IMAGES, done.stderr
    assert done.stderr.count("unreadable image") == 1, done.stderr
