"""The registry of published numbers (tables/published.yaml) and scripts/reproduce.py: ours beside published."""
import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from scripts import reproduce
from tests.test_driver import setup  # noqa: F401  (a fixture)
from util.errors import ConfigError
from util.published import REGISTRY, load_registry

ROOT = Path(__file__).resolve().parent.parent


def test_the_registry_loads_and_every_entry_names_its_source_and_protocol():
    tables = load_registry()
    assert {"clamp", "dcdp_paper", "demo"} <= set(tables)
    for t in tables.values():
        assert t.source.strip() and all(k in t.protocol for k in ("images", "image_size", "sigma"))
        for row in t.rows:
            for f in (row.task, row.purification, row.model):
                assert (ROOT / f).is_file(), f
    clamp = tables["clamp"]
    assert "2605.27990" in clamp.source and clamp.protocol["images"] == 100 and clamp.protocol["sigma"] == 0.05
    assert [(r.published["psnr"], r.published["ssim"], r.published["lpips"], r.published["seconds_per_image"])
            for r in clamp.rows] == [(27.611, 0.785, 0.225, 4.719), (27.879, 0.795, 0.204, 269.8),
                                     (15.953, 0.283, 0.595, 195.2)]
    paper = tables["dcdp_paper"]  # left empty on purpose: filled from the PDF, never guessed
    assert paper.rows == () and "never guessed" in paper.note and "2403.06054" in paper.source


def test_the_demo_entry_holds_the_readme_table():
    text = (ROOT / "README.md").read_text()
    demo = {r.name: r.published for r in load_registry()["demo"].rows}
    pattern = (r"\| (super resolution|gaussian deblur|motion deblur|inpainting|denoising) \| [^|]+ \| [^|]+ \| "
               r"([\d.]+) ± ([\d.]+) / ([\d.]+) \| \*\*([\d.]+) ± ([\d.]+)\*\* / ([\d.]+) \| [^|]+ \| (\d+) \| ([\d.]+) \|")
    found = re.findall(pattern, text)
    assert len(found) == 5
    for task, dc_p, dc_s, dc_ssim, p, s, ssim, nfe, sec in found:
        name = task.replace(" ", "_")
        assert demo[name] == {"psnr": float(p), "psnr_std": float(s), "ssim": float(ssim), "ssim_std": None,
                              "lpips": None, "lpips_std": None, "seconds_per_image": float(sec), "nfe": float(nfe)}
        assert (demo[f"{name}_dc_alone"]["psnr"], demo[f"{name}_dc_alone"]["psnr_std"],
                demo[f"{name}_dc_alone"]["ssim"]) == (float(dc_p), float(dc_s), float(dc_ssim))


@pytest.mark.parametrize("edit,message", [
    (lambda t: t["demo"].pop("source"), "'source' is missing"),
    (lambda t: t["demo"]["rows"][0]["published"].update(psnr="24.5 dB"), "is not a number"),
    (lambda t: t["demo"]["rows"][0].update(pubished={}), "unknown key"),
    (lambda t: t["dcdp_paper"].pop("note"), "no rows and no note"),
])
def test_a_bad_registry_entry_is_a_one_line_error(tmp_path, edit, message):
    data = yaml.safe_load(REGISTRY.read_text())
    edit(data["tables"])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_registry(tmp_path / "r.yaml")


def tiny_registry(p, path):
    row = {"task": str(p["task"]), "purification": str(p["pur"]), "model": str(p["model"])}
    path.write_text(yaml.safe_dump({"tables": {"tiny": {
        "title": "tiny", "source": "a test", "protocol": {"images": 1, "image_size": 32, "sigma": 0.05, "seeds": [0, 1]},
        "rows": [{"name": "sr", **row, "published": {"psnr": 9.0, "ssim": 0.1, "nfe": 12}},
                 {"name": "broken", **row, "overrides": ["purification.lr=-1"], "published": {"psnr": 20.0}}]}}}))


def test_reproduce_writes_ours_beside_published_with_the_differences(setup, tmp_path, capsys):
    tiny_registry(setup, tmp_path / "r.yaml")
    argv = ["tiny", "--registry", str(tmp_path / "r.yaml"), "--save_dir", str(tmp_path / "rep"), "--device", "cpu",
            "--quiet", "--lpips", "off"]
    assert reproduce.main(argv) == 3  # one row cannot run: its row says why, the others are done
    folder = tmp_path / "rep" / "tiny"
    report = json.loads((folder / "comparison.json").read_text())
    sr, broken = report["rows"]
    psnr = [float(r["psnr"]) for d in sr["run_dirs"] for r in csv.DictReader(open(Path(d) / "metrics.csv"))]
    assert len(sr["run_dirs"]) == 2 and len(psnr) == 2  # protocol: 1 image × seeds 0, 1
    assert sr["psnr_ours"] == pytest.approx(sum(psnr) / 2, abs=1e-12)
    assert sr["psnr_diff"] == pytest.approx(sr["psnr_ours"] - 9.0, abs=1e-12)
    assert sr["nfe_ours"] == 10 and sr["nfe_diff"] == -2
    assert sr["seconds_per_image_published"] is None and sr["seconds_per_image_diff"] is None
    assert broken["status"] == "error" and "lr" in broken["reason"] and broken["psnr_ours"] is None
    md = (folder / "comparison.md").read_text()
    assert f"{sr['psnr_ours']:.2f} ± {sr['psnr_ours_std']:.2f} / 9.00 ({sr['psnr_diff']:+.2f})" in md
    assert "Source: a test." in md and md in capsys.readouterr().out
    (row,) = [r for r in csv.DictReader(open(folder / "comparison.csv")) if r["row"] == "sr"]
    assert float(row["psnr_diff"]) == pytest.approx(sr["psnr_diff"])
    # rerun: the finished runs are resumed, not redone
    recon = Path(sr["run_dirs"][0]) / "recon" / "00000.png"
    before = recon.stat().st_mtime_ns
    assert reproduce.main(argv) == 3
    assert recon.stat().st_mtime_ns == before
    assert json.loads((folder / "comparison.json").read_text())["rows"][0]["psnr_ours"] == sr["psnr_ours"]


def test_smoke_mode_runs_the_demo_table_with_tiny_settings(tmp_path):
    assert reproduce.main(["demo", "--smoke", "--rows", "denoising", "--save_dir", str(tmp_path), "--device", "cpu",
                           "--quiet"]) == 0
    report = json.loads((tmp_path / "demo_smoke" / "comparison.json").read_text())
    (row,) = report["rows"]
    assert report["smoke"] and row["images"] == 1 and row["nfe_ours"] == 1  # K = 1 round, one Tweedie step
    assert row["psnr_diff"] == pytest.approx(row["psnr_ours"] - 35.89, abs=1e-12)
    assert report["metrics_provenance"]["lpips"]["net"] == "off"


def test_an_empty_or_unknown_table_is_a_one_line_error(capsys):
    assert reproduce.main(["dcdp_paper"]) == 2
    assert "has no rows yet" in capsys.readouterr().err
    assert reproduce.main(["nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "valid: clamp, dcdp_paper, demo" in err[0]
