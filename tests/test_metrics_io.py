"""Metrics (official PSNR/SSIM, optional LPIPS), image reading/saving, atomic writes, plots, model check."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from guided_diffusion.model_check import check_models, format_check_table, match_manifest, Manifest
from util import image_io, metrics
from util.image_io import (
    ImageError, atomic_path, atomic_save_torch, atomic_write_bytes, atomic_write_text, list_images, load_image,
    save_image, save_normalized,
)
from util.metrics import LPIPS, psnr, ssim

ROOT = Path(__file__).resolve().parents[1]


def u8_to_unit(v: float) -> float:
    """The official ToTensor + Normalize(0.5, 0.5) value of one 8-bit level, in float32."""
    return float((np.float32(v) / np.float32(255) - np.float32(0.5)) / np.float32(0.5))


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


# ----------------------------------------------------------------------------------------------
# PSNR / SSIM
# ----------------------------------------------------------------------------------------------

def official(gt: torch.Tensor, rec: torch.Tensor) -> tuple[float, float]:
    """The official dcdp.py computation for one (3, H, W) pair."""
    g = (np.clip(gt.permute(1, 2, 0).numpy(), -1, 1) + 1) / 2
    r = (np.clip(rec.permute(1, 2, 0).numpy(), -1, 1) + 1) / 2
    p = peak_signal_noise_ratio(g, r)  # data_range inferred (1 for a float GT in [0, 1])
    s = structural_similarity(g, r, channel_axis=2, data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    return p, s


def test_psnr_ssim_equal_the_official_computation() -> None:
    g = torch.Generator().manual_seed(1)
    gt = torch.rand(2, 3, 24, 20, generator=g) * 2 - 1
    rec = (gt + 0.6 * torch.randn(2, 3, 24, 20, generator=g)).clamp(-1.5, 1.5)  # out of range: clipped
    p, s = psnr(gt, rec), ssim(gt, rec)
    assert isinstance(p, list) and len(p) == 2 and all(isinstance(v, float) for v in p + s)
    for b in range(2):
        ref_p, ref_s = official(gt[b], rec[b])
        assert p[b] == pytest.approx(ref_p, abs=1e-9)
        assert s[b] == pytest.approx(ref_s, abs=1e-9)
    assert psnr(gt[1], rec[1]) == [p[1]]  # a single (3, H, W) image is a batch of one


def test_psnr_pinned_value_and_clipping() -> None:
    gt = torch.zeros(3, 16, 16)  # 0.5 in [0, 1]
    rec = torch.full((3, 16, 16), 0.2)  # 0.6: MSE 0.01 -> 20 dB
    assert psnr(gt, rec)[0] == pytest.approx(20.0, abs=1e-4)
    assert psnr(gt, torch.full((3, 16, 16), 5.0))[0] == pytest.approx(psnr(gt, torch.ones(3, 16, 16))[0])  # clipped to 1
    assert ssim(gt + 0.3, gt + 0.3)[0] == pytest.approx(1.0)
    assert ssim(gt, rec)[0] < 1.0


def test_metrics_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 15))


# ----------------------------------------------------------------------------------------------
# LPIPS: never the network
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty torch hub cache and no sockets."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("LPIPS tried to open a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def unavailable_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "LPIPS unavailable" in r.getMessage()]


def test_lpips_reports_unavailable_once_in_one_line(offline: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    lp = LPIPS("cpu")
    assert lp.status == "not used" and not unavailable_records(caplog)  # lazy: nothing happens before use
    x = torch.zeros(2, 3, 16, 16)
    assert lp(x, x) is None
    assert lp(x, x) is None and not lp.available
    recs = unavailable_records(caplog)
    assert len(recs) == 1 and "\n" not in recs[0].getMessage()
    assert lp.status.startswith("unavailable: ")


def test_lpips_missing_vgg_weights_is_unavailable(offline: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    built = []
    monkeypatch.setattr(metrics, "_installed_backends", lambda: ["torchmetrics"])
    monkeypatch.setitem(metrics._BACKENDS, "torchmetrics", lambda device, net: built.append(device))
    lp = LPIPS()
    assert lp(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16)) is None
    assert not built  # nothing was constructed (constructing could download)
    (msg,) = [r.getMessage() for r in unavailable_records(caplog)]
    assert "VGG16 weights not found" in msg and str(offline) in msg


def test_lpips_with_local_weights_uses_backend_and_blocks_downloads(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = metrics.backbone_weights_file("vgg")
    assert str(ckpt).startswith(str(offline))  # TORCH_HOME decides where weights are looked for
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    monkeypatch.setattr(metrics, "_installed_backends", lambda: ["lpips"])
    monkeypatch.setitem(metrics._BACKENDS, "lpips", lambda device, net: (lambda gt, rec: (gt - rec).abs().mean(dim=(1, 2, 3))))
    lp = LPIPS("cpu")
    gt = torch.zeros(2, 3, 8, 8)
    rec = torch.stack([torch.full((3, 8, 8), 0.5), torch.full((3, 8, 8), 3.0)])  # second clamped to 1
    assert lp(gt, rec) == pytest.approx([0.5, 1.0])
    assert lp.status == "LPIPS-VGG via lpips"

    original = torch.hub.download_url_to_file

    def downloading_backend(device: torch.device, net: str) -> None:
        torch.hub.download_url_to_file("https://example.invalid/vgg.pth", str(offline / "x.pth"))

    monkeypatch.setitem(metrics._BACKENDS, "lpips", downloading_backend)
    lp2 = LPIPS()
    assert lp2(gt, rec) is None and "blocked" in lp2.reason
    assert torch.hub.download_url_to_file is original


# ----------------------------------------------------------------------------------------------
# Reading images
# ----------------------------------------------------------------------------------------------

def test_rgb_values_match_torchvision_to_tensor_normalize(tmp_path: Path) -> None:
    tvf = pytest.importorskip("torchvision.transforms.functional")
    arr = np.random.default_rng(0).integers(0, 256, (31, 37, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", "ffhq", None)
    ref = tvf.normalize(tvf.to_tensor(Image.fromarray(arr)), [0.5] * 3, [0.5] * 3)
    assert x.shape == (1, 3, 31, 37) and x.dtype == torch.float32
    assert torch.equal(x[0], ref)


def save_mode(tmp_path: Path, name: str, img: Image.Image, **kw: object) -> Path:
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_image_modes_convert_to_rgb(tmp_path: Path) -> None:
    size = (6, 4)
    # grayscale: replicated
    x = load_image(save_mode(tmp_path, "l.png", Image.new("L", size, 128)), "ffhq", None)
    assert x.shape == (1, 3, 4, 6) and torch.allclose(x, torch.full_like(x, u8_to_unit(128)))
    # LA and RGBA: composited on white
    la = Image.new("LA", size, (0, 255))
    la.putpixel((0, 0), (0, 0))  # transparent black -> white
    x = load_image(save_mode(tmp_path, "la.png", la), "ffhq", None)
    assert x[0, :, 0, 0].tolist() == [1.0] * 3 and x[0, :, 1, 1].tolist() == [-1.0] * 3
    rgba = Image.new("RGBA", size, (0, 0, 255, 255))
    rgba.putpixel((0, 0), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black over white -> 127
    x = load_image(save_mode(tmp_path, "rgba.png", rgba), "ffhq", None)
    assert x[0, :, 0, 0].tolist() == [1.0] * 3
    assert x[0, :, 1, 1].tolist() == [-1.0, -1.0, 1.0]
    assert x[0, 0, 0, 1].item() == pytest.approx(u8_to_unit(127), abs=2.1 / 255)
    # palette, with and without transparency
    p = Image.new("P", size, 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    x = load_image(save_mode(tmp_path, "p.png", p), "ffhq", None)
    assert x[0, :, 2, 3].tolist() == [u8_to_unit(10), u8_to_unit(200), u8_to_unit(30)]
    x = load_image(save_mode(tmp_path, "pt.png", p, transparency=1), "ffhq", None)
    assert torch.equal(x, torch.ones_like(x))
    # 1-bit
    one = Image.new("1", size, 0)
    one.putpixel((0, 0), 1)
    x = load_image(save_mode(tmp_path, "one.png", one), "ffhq", None)
    assert x[0, :, 0, 0].tolist() == [1.0] * 3 and x[0, :, 1, 1].tolist() == [-1.0] * 3


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    path = save_mode(tmp_path, "g16.png", Image.fromarray(arr))
    assert Image.open(path).mode.startswith("I")
    x = load_image(path, "ffhq", None)
    expected = torch.tensor(arr.astype(np.float64) / 65535 * 2 - 1, dtype=torch.float32)
    assert x.shape == (1, 3, 1, 4)
    assert torch.allclose(x[0], expected.expand(3, -1, -1), atol=1e-6)  # 1000 stays dark (PIL would give white)
    big = save_mode(tmp_path, "g16big.png", Image.fromarray(np.full((10, 14), 40000, dtype=np.uint16)))
    x = load_image(big, "ffhq", 4)  # cropped and resized in float, not 8-bit
    assert x.shape == (1, 3, 4, 4) and torch.allclose(x, torch.full_like(x, 40000 / 65535 * 2 - 1), atol=1e-5)


def test_exif_orientation_applied_only_in_folder_mode(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (20, 10), (200, 10, 10)).save(tmp_path / "cam.jpg", exif=exif)
    assert load_image(tmp_path / "cam.jpg", "folder", None).shape == (1, 3, 20, 10)
    assert load_image(tmp_path / "cam.jpg", "ImageNet", None).shape == (1, 3, 10, 20)  # as the official loader


def test_cmyk_jpeg_converts(tmp_path: Path) -> None:
    img = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # no ink: white
    for i in range(8):
        for j in range(16):
            img.putpixel((j, i), (255, 0, 0, 0))  # full cyan
    path = save_mode(tmp_path, "cmyk.jpg", img, quality=100)
    assert Image.open(path).mode == "CMYK"
    x = load_image(path, "ImageNet", None)
    assert x.shape == (1, 3, 16, 16)
    assert torch.allclose(x[0, :, 12, 8], torch.ones(3), atol=0.05)
    assert x[0, 0, 2, 8] < -0.9 and x[0, 1, 2, 8] > 0.9 and x[0, 2, 2, 8] > 0.9  # cyan: no red


def test_sizing_per_dataset_mode(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    arr = np.random.default_rng(1).integers(0, 256, (30, 41, 3), dtype=np.uint8)  # H 30, W 41: odd, not square
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr).save(tmp_path / "a.JPEG", quality=95)
    pil = Image.fromarray(arr)

    x = load_image(tmp_path / "a.png", "ffhq", 16)
    crop = pil.crop((5, 0, 35, 30)).resize((16, 16), resample=Image.BICUBIC)  # centre 30x30, left (41-30)//2
    assert x.shape == (1, 3, 16, 16)
    assert torch.equal(x, load_image_from_array(np.asarray(crop)))
    assert any("centre-cropped" in r.getMessage() and "a.png" in r.getMessage() for r in caplog.records)

    x = load_image(tmp_path / "a.JPEG", "ImageNet", 16)
    direct = Image.open(tmp_path / "a.JPEG").convert("RGB").resize((16, 16), resample=Image.BICUBIC)
    assert torch.equal(x, load_image_from_array(np.asarray(direct)))  # whole image squeezed (official)

    assert load_image(tmp_path / "a.png", "folder", None).shape == (1, 3, 30, 41)  # None keeps the size
    same = load_image(tmp_path / "a.png", "ffhq", None)
    Image.fromarray(arr[:30, :30]).save(tmp_path / "sq.png")
    assert torch.equal(load_image(tmp_path / "sq.png", "ffhq", 30), same[..., :30])  # right size: untouched


def load_image_from_array(arr: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5))[None]


@pytest.mark.parametrize("kind", ["garbage", "truncated_png", "truncated_jpeg", "missing"])
def test_unreadable_files_raise_image_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    arr = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    if kind == "garbage":
        path, data = tmp_path / "bad.png", b"this is not a picture" * 10
    elif kind == "truncated_png":
        Image.fromarray(arr).save(buf, format="PNG")
        path, data = tmp_path / "cut.png", buf.getvalue()[: len(buf.getvalue()) // 2]
    elif kind == "truncated_jpeg":
        Image.fromarray(arr).save(buf, format="JPEG")
        path, data = tmp_path / "cut.jpg", buf.getvalue()[: len(buf.getvalue()) // 2]
    else:
        path, data = tmp_path / "nothere.png", None
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(ImageError) as info:
        load_image(path, "folder", 32)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and path.name in msg and "\n" not in msg


# ----------------------------------------------------------------------------------------------
# Listing images
# ----------------------------------------------------------------------------------------------

def test_list_images_recursion_sorting_and_kinds(tmp_path: Path) -> None:
    for rel in ["b.png", "a/z.PNG", "a/c.png", "a-b.png", "x/y.jpg", "x/w.JPEG", "q.jpeg", "n.bmp", "t.txt",
                ".hidden.png", ".cache/h.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    rel = lambda ps: [p.relative_to(tmp_path).as_posix() for p in ps]
    assert rel(list_images(tmp_path, "ffhq")) == ["a-b.png", "a/c.png", "a/z.PNG", "b.png"]  # string order, as glob+sorted
    assert rel(list_images(tmp_path, "ImageNet")) == ["q.jpeg", "x/w.JPEG", "x/y.jpg"]
    assert rel(list_images(tmp_path, "folder")) == ["a-b.png", "a/c.png", "a/z.PNG", "b.png", "n.bmp", "q.jpeg",
                                                    "x/w.JPEG", "x/y.jpg"]


def test_list_images_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ffhq.*ImageNet.*folder"):
        list_images(tmp_path, "celeba")
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(tmp_path / "nope", "ffhq")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="file.png' is not a folder"):
        list_images(tmp_path / "file.png", "ffhq")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        list_images(tmp_path / "empty", "ffhq")
    with pytest.raises(ValueError, match="celeba"):
        load_image(tmp_path / "empty" / "a.jpg", "celeba", None)


# ----------------------------------------------------------------------------------------------
# Saving and atomic writes
# ----------------------------------------------------------------------------------------------

def test_save_image_round_trip_and_clipping(tmp_path: Path) -> None:
    x = torch.rand(1, 3, 9, 7, generator=torch.Generator().manual_seed(3)) * 2 - 1
    x[0, 0, 0, 0], x[0, 1, 0, 0] = 3.0, -3.0
    save_image(x, tmp_path / "out" / "x.png")  # creates the folder
    img = Image.open(tmp_path / "out" / "x.png")
    assert img.mode == "RGB" and img.size == (7, 9)
    back = load_image(tmp_path / "out" / "x.png", "ffhq", None)
    assert (back - x.clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-6
    assert np.asarray(img)[0, 0, :2].tolist() == [255, 0]
    save_image(x[0], tmp_path / "y.png")
    assert Image.open(tmp_path / "y.png").tobytes() == img.tobytes()
    with pytest.raises(ValueError, match="shape"):
        save_image(torch.zeros(2, 3, 4, 4), tmp_path / "z.png")


def test_save_normalized_min_max(tmp_path: Path) -> None:
    y = torch.tensor([[[-5.0, 0.0], [5.0, 15.0]]]).expand(3, -1, -1)
    save_normalized(y, tmp_path / "y.png")
    assert np.asarray(Image.open(tmp_path / "y.png"))[..., 0].tolist() == [[0, 64], [128, 255]]
    save_normalized(torch.full((1, 1, 3, 3), 7.0), tmp_path / "c.png")  # constant -> black, one channel
    assert np.asarray(Image.open(tmp_path / "c.png")).max() == 0
    assert no_temp_files(tmp_path)


def test_atomic_writes_replace_and_leave_no_temp(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"old")
    atomic_write_bytes(tmp_path / "a.bin", b"new")
    atomic_write_text(tmp_path / "t.txt", "héllo")
    atomic_save_torch({"x": torch.arange(3)}, tmp_path / "s.pt")
    assert (tmp_path / "a.bin").read_bytes() == b"new"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert torch.equal(torch.load(tmp_path / "s.pt", weights_only=True)["x"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "s.pt", "t.txt"]


def test_failed_writer_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.png"
    atomic_write_bytes(target, b"complete old file")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"complete old file" and no_temp_files(tmp_path)

    def partial_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", partial_save)
    with pytest.raises(OSError, match="disk full"):
        save_image(torch.zeros(3, 4, 4), target)
    with pytest.raises(OSError, match="disk full"):
        save_image(torch.zeros(3, 4, 4), tmp_path / "new.png")
    assert target.read_bytes() == b"complete old file"
    assert not (tmp_path / "new.png").exists() and no_temp_files(tmp_path)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

def test_metric_curves_write_pngs_without_pyplot(tmp_path: Path) -> None:
    had_pyplot = "matplotlib.pyplot" in sys.modules
    from util.plotting import save_average_metric_curves, save_metric_curves

    save_metric_curves([10.0, 12.5, 14.0], [0.2, 0.4, 0.5], [0.6, 0.5, 0.4], tmp_path / "m.png", title="deblur")
    save_metric_curves([10.0, 12.5], [0.2, 0.4], None, tmp_path / "m2.png")
    save_average_metric_curves(np.ones((3, 4)), np.ones((3, 4)), None, tmp_path / "avg.png")
    wide, narrow = Image.open(tmp_path / "m.png"), Image.open(tmp_path / "m2.png")
    assert wide.format == "PNG" and wide.size[0] > narrow.size[0]  # three panels vs two
    assert Image.open(tmp_path / "avg.png").format == "PNG"
    assert no_temp_files(tmp_path)
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules
    with pytest.raises(ValueError, match="N_images"):
        save_average_metric_curves(np.ones(4), np.ones(4), None, tmp_path / "bad.png")


# ----------------------------------------------------------------------------------------------
# Checkpoint checker
# ----------------------------------------------------------------------------------------------

def write_manifest(root: Path, name: str, checkpoint: str, layout: dict, aliases: tuple = (), download: object = None) -> None:
    m = {"checkpoint": checkpoint, "aliases": list(aliases), "download": download or f"https://example.org/{name}",
         "config": {}, "param_count": 0, "state_dict": [[k, list(s)] for k, s in layout.items()]}
    (root / "models" / "manifests").mkdir(parents=True, exist_ok=True)
    (root / "models" / "manifests" / f"{name}.json").write_text(json.dumps(m))


@pytest.fixture
def fake_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    cfg = root / "model_configurations"
    cfg.mkdir(parents=True)
    (cfg / "good.yaml").write_text("image_size: 8\nmodel_path: models/good.pt\n")
    (cfg / "bad.yaml").write_text("model_path: models/bad.pt\n")
    (cfg / "absent.yaml").write_text("model_path: models/absent.pt\n")
    (cfg / "latent.yaml").write_text("unet:\n  model_path: models/good.pt\nvae:\n  first_stage_path: models/vq/model.ckpt\n")
    (cfg / "random.yaml").write_text("model_path: null\nsize: !!python/tuple [1, 3]\n")
    opts = root / "bkse" / "options" / "generate_blur"
    opts.mkdir(parents=True)
    (opts / "default.yml").write_text("KernelWizard:\n  pretrained: models/kw.pth\n  nf: 4\n")
    (opts / "random.yml").write_text("KernelWizard:\n  pretrained: null\n")
    (opts / "other.yml").write_text("pretrained: models/not_a_kernel_wizard.pth\n")

    layout = {"w": (2, 3), "b": (2,)}
    write_manifest(root, "good", "good.pt", layout)
    write_manifest(root, "bad", "bad.pt", layout)
    write_manifest(root, "absent", "absent.pt", layout, download={"url": "https://example.org/absent.pt"})
    write_manifest(root, "vq", "model.ckpt (models/vq/model.ckpt, from a zip)", {"enc.w": (4,)})
    write_manifest(root, "ldm", "model.ckpt (models/ldm/model.ckpt)", {"unet.w": (4,)})
    write_manifest(root, "kw", "kw.pth", {"k": (1,)}, aliases=("kw_old.pth",))
    models = root / "models"
    torch.save({"w": torch.zeros(2, 3), "b": torch.zeros(2)}, models / "good.pt")
    torch.save({"w": torch.zeros(3, 2), "b": torch.zeros(2), "extra": torch.zeros(1)}, models / "bad.pt")
    (models / "vq").mkdir()
    torch.save({"state_dict": {"enc.w": torch.zeros(4)}, "global_step": 7}, models / "vq" / "model.ckpt")  # Lightning
    torch.save({"k": torch.zeros(1)}, models / "kw_old.pth")  # present only under its alias name
    return root


def test_check_models_on_fake_repo(fake_repo: Path) -> None:
    rows = {r["file"]: r for r in check_models(fake_repo)}
    assert set(rows) == {"models/good.pt", "models/bad.pt", "models/absent.pt", "models/vq/model.ckpt", "models/kw.pth"}

    good = rows["models/good.pt"]
    data = (fake_repo / "models" / "good.pt").read_bytes()
    assert good["present"] and good["layout"] == "match" and good["manifest"] == "good"
    assert good["size"] == len(data) and good["sha256"] == hashlib.sha256(data).hexdigest()
    assert sorted(good["configs"]) == ["model_configurations/good.yaml:model_path",
                                       "model_configurations/latent.yaml:model_path"]

    bad = rows["models/bad.pt"]
    assert bad["present"] and bad["layout"] == "mismatch"
    assert "1 unexpected keys" in bad["detail"] and "w (3, 2) != (2, 3)" in bad["detail"]

    absent = rows["models/absent.pt"]
    assert not absent["present"] and absent["layout"] == "missing" and absent["sha256"] is None
    assert absent["download"] == "https://example.org/absent.pt"

    assert rows["models/vq/model.ckpt"]["layout"] == "match" and rows["models/vq/model.ckpt"]["manifest"] == "vq"
    kw = rows["models/kw.pth"]
    assert kw["layout"] == "match" and kw["path"].endswith("kw_old.pth") and "alias" in kw["detail"]

    table = format_check_table(list(rows.values()))
    assert "models/good.pt" in table and "match" in table and good["sha256"] in table
    assert "models/absent.pt: not found" in table and "https://example.org/absent.pt" in table
    assert "models/bad.pt: mismatch" in table


def test_check_models_reports_unreadable_and_unknown(fake_repo: Path) -> None:
    (fake_repo / "models" / "good.pt").write_bytes(b"not a checkpoint")
    (fake_repo / "model_configurations" / "x.yaml").write_text("model_path: models/mystery.pt\n")
    (fake_repo / "models" / "mystery.pt").write_bytes(b"x")
    (fake_repo / "model_configurations" / "broken.yaml").write_text("model_path: [unclosed\n")
    rows = check_models(fake_repo, with_sha256=False)
    by_file = {r["file"]: r for r in rows}
    assert by_file["models/good.pt"]["layout"] == "unreadable" and by_file["models/good.pt"]["sha256"] is None
    assert by_file["models/mystery.pt"]["layout"] == "unknown"
    assert any(r["layout"] == "config error" and "broken.yaml" in r["detail"] for r in rows)


def test_manifest_matching_prefers_the_longest_path_suffix() -> None:
    vq = Manifest("vq", ["model.ckpt", "models/first_stage_models/vq-f4/model.ckpt"], "", {})
    ldm = Manifest("ldm", ["model.ckpt", "models/ldm/ffhq256/model.ckpt", "models/ldm/model.ckpt"], "", {})
    assert match_manifest("models/ldm/model.ckpt", [vq, ldm])[0] is ldm
    assert match_manifest("models/first_stage_models/vq-f4/model.ckpt", [vq, ldm])[0] is vq
    found, note = match_manifest("elsewhere/model.ckpt", [vq, ldm])
    assert found is None and "ambiguous" in note
    assert match_manifest("models/none.pt", [vq, ldm]) == (None, "no manifest names this file")


# ----------------------------------------------------------------------------------------------
# Demo data
# ----------------------------------------------------------------------------------------------

def test_demo_images_are_256_rgb_and_listed() -> None:
    files = list_images(ROOT / "data" / "demo", "ffhq")
    assert [p.name for p in files] == ["astronaut.png", "coffee.png"]
    for p in files:
        img = Image.open(p)
        assert img.mode == "RGB" and img.size == (256, 256)
        x = load_image(p, "ffhq", 256)
        assert x.shape == (1, 3, 256, 256) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.1


def test_vgg16_file_name_matches_torchvision() -> None:
    models = pytest.importorskip("torchvision.models")
    assert models.VGG16_Weights.IMAGENET1K_V1.url.endswith("/" + metrics.VGG16_FILE)
