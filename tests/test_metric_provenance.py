"""--lpips {vgg,alex,off}, the metric provenance in summary.json and the tables, the LPIPS weights fetch command."""
import json
import socket
from pathlib import Path

import pytest
import torch

import dcdp
from scripts import collect_results, fetch_lpips_weights
from tests.test_driver import args, run_dir, setup  # noqa: F401  (setup is a fixture)
from util import metrics
from util.metrics import LPIPS, provenance


@pytest.fixture
def offline(monkeypatch, tmp_path):
    def refuse(*a, **k):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


@pytest.mark.parametrize("net,name,file", [("vgg", "VGG16", "vgg16-397923af.pth"),
                                           ("alex", "AlexNet", "alexnet-owt-7be5be79.pth")])
def test_the_unavailable_line_names_the_fetch_command(offline, caplog, net, name, file):
    lp = LPIPS(net=net)
    assert lp(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16)) is None
    (msg,) = [r.getMessage() for r in caplog.records if "LPIPS unavailable" in r.getMessage()]
    assert f"{name} weights not found at {offline / 'hub' / 'checkpoints' / file}" in msg
    assert f"`python scripts/fetch_lpips_weights.py --net {net}`" in msg


def test_lpips_off_computes_nothing_and_says_so_in_its_provenance(offline, caplog, monkeypatch):
    monkeypatch.setitem(metrics._BACKENDS, "torchmetrics", lambda device, net: pytest.fail("built"))
    lp = LPIPS(net="off")
    assert lp(torch.zeros(3, 16, 16), torch.ones(3, 16, 16)) is None and not lp.available
    assert not [r for r in caplog.records if "LPIPS" in r.getMessage()]
    assert lp.status == "off (--lpips off)" and lp.provenance() == {"net": "off", "status": "off (--lpips off)"}
    with pytest.raises(ValueError, match="squeeze"):
        LPIPS(net="squeeze")


def test_the_backend_gets_the_chosen_backbone_and_the_provenance_names_its_files(offline, monkeypatch):
    weights = metrics.backbone_weights_file("alex")
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    nets = []
    monkeypatch.setattr(metrics, "_installed_backends", lambda: ["torchmetrics"])
    monkeypatch.setitem(metrics._BACKENDS, "torchmetrics",
                        lambda device, net: nets.append(net) or (lambda gt, rec: (gt - rec).abs().mean(dim=(1, 2, 3))))
    lp = LPIPS(net="alex")
    assert lp(torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.25)) == pytest.approx([0.25])
    assert nets == ["alex"] and lp.status == "LPIPS-Alex via torchmetrics"
    info = provenance(lp)["lpips"]
    assert info["net"] == "alex" and info["backbone"] == "AlexNet" and info["backbone_weights"] == str(weights)
    assert info["linear_weights"].endswith("torchmetrics/functional/image/lpips_models/alex.pth")


def test_summary_records_how_each_metric_was_computed(setup, offline):
    assert dcdp.main(args(setup, "--no_curves", "--max_images", "1")) == 0
    summary = json.loads((run_dir(setup) / "summary.json").read_text())
    prov = summary["metrics_provenance"]
    assert prov["psnr"]["function"] == "skimage.metrics.peak_signal_noise_ratio" and prov["psnr"]["data_range"] == 1
    assert "clipped to [-1, 1]" in prov["psnr"]["input"]
    assert prov["ssim"]["gaussian_weights"] is True and prov["ssim"]["sigma"] == 1.5
    assert prov["lpips"]["net"] == "vgg" and prov["lpips"]["status"].startswith("unavailable")
    assert prov["lpips"]["records_by_net"] == {"none": 1}


def test_lpips_is_not_part_of_the_run_identity(setup, offline):
    assert dcdp.main(args(setup, "--no_curves", "--max_images", "1")) == 0
    folder = run_dir(setup)
    identity = (folder / "run_config.json").read_text()
    assert dcdp.main(args(setup, "--no_curves", "--lpips", "off", "--resume")) == 0  # the same folder, resumed
    assert sorted(setup["out"].glob("*/*/*/*")) == [folder] and (folder / "run_config.json").read_text() == identity
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["metrics_provenance"]["lpips"] == {"net": "off", "status": "off (--lpips off)",
                                                      "records_by_net": {"none": 2}}
    assert summary["ok"] == 2


def test_the_tables_name_the_lpips_backbone_and_the_protocol(setup, offline, tmp_path, capsys):
    assert dcdp.main(args(setup, "--no_curves", "--max_images", "1", "--lpips", "off")) == 0
    capsys.readouterr()
    assert collect_results.main([str(setup["out"]), "--json", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "images clipped to [-1, 1] and mapped to [0, 1]" in out and "| 3 × 5 |" in out  # K × τ of the tiny run
    (row,) = json.loads((tmp_path / "t.json").read_text())
    assert row["lpips_net"] == "off" and row["K"] == 3


def test_fetch_puts_the_file_in_the_hub_cache_and_fails_in_one_line(offline, monkeypatch, capsys):
    seen = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        seen.append((url, hash_prefix))
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert fetch_lpips_weights.main(["--net", "vgg"]) == 0
    assert seen == [("https://download.pytorch.org/models/vgg16-397923af.pth", "397923af")]
    assert metrics.backbone_weights_file("vgg").read_bytes() == b"weights"

    def no_network(url, dst, hash_prefix=None, progress=True):
        Path(dst).write_bytes(b"half")
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    capsys.readouterr()
    assert fetch_lpips_weights.main(["--net", "alex"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not download") and "alexnet-owt-7be5be79.pth" in err[0]
    assert not metrics.backbone_weights_file("alex").exists()  # nothing half-written left behind
