"""scripts/collect_results.py gathers finished runs into one table."""
import csv
import json

import pytest

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


def test_no_runs_and_bad_folders_are_reported(tmp_path, capsys):
    assert collect_results.main([str(tmp_path)]) == 1
    assert "no finished runs" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="is not a folder"):
        collect_results.main([str(tmp_path / "missing")])
