"""scripts/collect_results.py gathers finished runs into one table."""
import csv
import json

import dcdp
from scripts import collect_results
from tests.test_driver import args, setup  # noqa: F401 - the tiny-run fixture


def test_runs_become_rows_in_markdown_csv_and_json(setup, tmp_path, capsys):  # noqa: F811
    assert dcdp.main(args(setup, "--no_curves")) == 0
    assert dcdp.main(args(setup, "--no_curves", "--no_purification")) == 0
    capsys.readouterr()
    out_csv, out_json = tmp_path / "t.csv", tmp_path / "t.json"
    assert collect_results.main([str(setup["out"]), "--csv", str(out_csv), "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert table.count("| super_resolution |") == 2 and "none (data consistency alone)" in table
    rows = json.loads(out_json.read_text())
    assert [r["images"] for r in rows] == [2, 2] and all(r["prior"] == "random weights" for r in rows)
    dcdp_row = next(r for r in rows if r["purification"].startswith("DDIM"))
    summary_file = next(p for p in setup["out"].rglob("summary.json") if "no_purification" not in str(p))
    assert dcdp_row["psnr"] == json.loads(summary_file.read_text())["metrics"]["psnr"]["mean"]
    assert len(list(csv.DictReader(out_csv.open()))) == 2


def one_error(code, capsys) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_no_runs_and_bad_folders_are_one_line_errors(tmp_path, capsys):
    line = one_error(collect_results.main([str(tmp_path)]), capsys)
    assert line.startswith(f"error: no finished runs (summary.json) under {tmp_path}; give the --save_dir")
    line = one_error(collect_results.main([str(tmp_path / "missing")]), capsys)
    assert f"'{tmp_path / 'missing'}' does not exist; give the --save_dir folders" in line
    (tmp_path / "file.txt").write_text("x")
    assert "is not a folder" in one_error(collect_results.main([str(tmp_path / "file.txt")]), capsys)
    assert "unrecognized arguments: --markdown" in one_error(collect_results.main(["--markdown"]), capsys)
    assert "argument --csv: expected one argument" in one_error(collect_results.main(["--csv"]), capsys)
    assert "--json '' is empty" in one_error(collect_results.main([str(tmp_path), "--json", ""]), capsys)
    assert "--csv" in one_error(collect_results.main([str(tmp_path), "--csv", str(tmp_path)]), capsys)


def test_malformed_summaries_are_skipped_and_unwritable_outputs_refused(tmp_path, capsys):
    good = {"resolved": {"task": {"operator": {"name": "inpainting"}, "noise": {"sigma": 0.05}},
                         "purification": {"total_num_iterations": 20, "csgm_num_iterations": 50},
                         "dataset": {"name": "ffhq"}, "model": {"model_path": "models/ffhq_10m.pt"}},
            "ok": 3, "failed": 0, "metrics": {"psnr": {"mean": 25.0, "std": 1.0}}}
    for name, content in (("a", json.dumps(good)), ("b", "[1, 2]"), ("c", json.dumps({"metrics": [1]})),
                          ("d", "{truncated")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(content)
    assert collect_results.main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("| inpainting |") == 1 and "25.00 ± 1.00" in captured.out
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipping")]
    assert len(skipped) == 3 and all("Traceback" not in line for line in captured.err.splitlines())
    line = one_error(collect_results.main([str(tmp_path), "--csv", str(tmp_path / "no" / "such" / "t.csv")]), capsys)
    assert line.startswith(f"error: --csv '{tmp_path / 'no' / 'such' / 't.csv'}': cannot write in the folder")


def test_the_script_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run([sys.executable, "scripts/collect_results.py", str(tmp_path / "nowhere")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: '{tmp_path / 'nowhere'}' does not exist; give the --save_dir folders of your dcdp.py runs "
        f"(default ./purification_results)"]
