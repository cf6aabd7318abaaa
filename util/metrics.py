"""PSNR and SSIM exactly as the official DCDP code computes them, an optional LPIPS, and their provenance.

Official conversion: a [-1, 1] image is clipped to [-1, 1], mapped by (v + 1) / 2 to [0, 1] and laid
out HWC as float32 numpy; then scikit-image's `peak_signal_noise_ratio` (data_range 1) and
`structural_similarity` with Wang et al.'s settings (Gaussian window sigma 1.5, population
covariance). LPIPS uses the VGG network on [-1, 1] inputs, as torchmetrics'
`LearnedPerceptualImagePatchSimilarity(net_type='vgg')` in the official code; it runs only from weights
already on this machine and never downloads.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

log = logging.getLogger(__name__)

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (gt, rec) (B,3,H,W) in [-1,1] -> (B,)


def _batched(gt: torch.Tensor, rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes; return (B, 3, H, W) views (a single (3, H, W) image becomes B = 1)."""
    if gt.shape != rec.shape or gt.dim() not in (3, 4):
        raise ValueError(f"metrics need two (B, 3, H, W) or (3, H, W) tensors of one shape, got {tuple(gt.shape)} and {tuple(rec.shape)}")
    return (gt[None], rec[None]) if gt.dim() == 3 else (gt, rec)


def _to_hwc01(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) float32 in [0, 1], clipped first."""
    x = x.detach().to("cpu", torch.float32).clamp(-1, 1)
    return ((x + 1) / 2).permute(1, 2, 0).numpy()


def _per_image(fn: Callable[[np.ndarray, np.ndarray], float], gt: torch.Tensor, rec: torch.Tensor) -> list[float]:
    gt, rec = _batched(gt, rec)
    return [float(fn(_to_hwc01(g), _to_hwc01(r))) for g, r in zip(gt, rec)]


def _psnr01(gt: np.ndarray, rec: np.ndarray) -> float:
    return peak_signal_noise_ratio(gt, rec, data_range=1)


def _ssim01(gt: np.ndarray, rec: np.ndarray) -> float:
    return structural_similarity(
        gt, rec, channel_axis=2, data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )


def psnr(gt: torch.Tensor, rec: torch.Tensor) -> list[float]:
    """PSNR in dB of `rec` against `gt`, both (B, 3, H, W) or (3, H, W) in [-1, 1].

    Returns a list with one float per image (length 1 for a (3, H, W) image). Identical images give inf.
    """
    return _per_image(_psnr01, gt, rec)


def ssim(gt: torch.Tensor, rec: torch.Tensor) -> list[float]:
    """SSIM (in [-1, 1], 1 = identical) of `rec` against `gt`, shaped as for `psnr`; H, W >= 11."""
    return _per_image(_ssim01, gt, rec)


# ----------------------------------------------------------------------------------------------
# LPIPS (optional)
# ----------------------------------------------------------------------------------------------

# torchvision's ImageNet weights files that LPIPS builds on (named here so that checking for them does not
# import torchvision), where they come from, and the command that fetches them once (runs never download).
VGG16_FILE = "vgg16-397923af.pth"
BACKBONES = {  # --lpips value: (backbone name, torchvision weights file)
    "vgg": ("VGG16", VGG16_FILE),
    "alex": ("AlexNet", "alexnet-owt-7be5be79.pth"),
}
WEIGHTS_URL = "https://download.pytorch.org/models/{}"
FETCH_COMMAND = "python scripts/fetch_lpips_weights.py"
NETS = ("vgg", "alex", "off")


def backbone_weights_file(net: str = "vgg") -> Path:
    """Where torchvision looks for (and would download) a backbone's weights: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONES[net][1]


def _linear_weights_file(backend: str, net: str) -> Path | None:
    """The LPIPS linear layers' weights that the backend ships inside its package."""
    spec = importlib.util.find_spec(backend)
    if spec is None or not spec.origin:
        return None
    package = Path(spec.origin).parent
    return (package / "functional" / "image" / "lpips_models" / f"{net}.pth" if backend == "torchmetrics"
            else package / "weights" / "v0.1" / f"{net}.pth")


def _build_torchmetrics(device: torch.device, net: str) -> Distance:
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=False).to(device).eval()

    def distance(gt: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        values = torch.stack([metric(g[None], r[None]) for g, r in zip(gt, rec)])  # per image, as the official loop
        metric.reset()
        return values

    return distance


def _build_lpips_package(device: torch.device, net: str) -> Distance:
    import lpips

    model = lpips.LPIPS(net=net, verbose=False).to(device).eval()
    return lambda gt, rec: model(gt, rec).flatten()


# Tried in this order; torchmetrics is what the official code uses.
_BACKENDS: dict[str, Callable[[torch.device, str], Distance]] = {"torchmetrics": _build_torchmetrics,
                                                                 "lpips": _build_lpips_package}


def _installed_backends() -> list[str]:
    return [name for name in _BACKENDS if importlib.util.find_spec(name) is not None]


@contextlib.contextmanager
def _downloads_blocked() -> Iterator[None]:
    """Make torch.hub raise instead of downloading, should a backend try to fetch anything."""
    original = torch.hub.download_url_to_file

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"download of {url} blocked (LPIPS uses local weights only)")

    torch.hub.download_url_to_file = refuse
    try:
        yield
    finally:
        torch.hub.download_url_to_file = original


class LPIPS:
    """LPIPS distance (`net` vgg, the official choice, or alex) from locally present weights, or None.

    Nothing is built until first use. The network needs torchmetrics (or the `lpips` package),
    torchvision and the backbone's weights file in the torch hub cache (`$TORCH_HOME/hub/checkpoints`,
    by default `~/.cache/torch/hub/checkpoints`; `python scripts/fetch_lpips_weights.py` puts it there).
    If any of these is missing, the first use logs "LPIPS unavailable: <reason>" once and every call
    returns None. `net="off"` computes nothing and says nothing (every call returns None).
    """

    def __init__(self, device: str | torch.device = "cpu", net: str = "vgg") -> None:
        if net not in NETS:
            raise ValueError(f"LPIPS net {net!r}: use one of {', '.join(NETS)}")
        self.net = net
        self.device = torch.device(device)
        self._distance: Distance | None = None
        self._backend: str | None = None
        self.reason: str | None = None  # why LPIPS is unavailable, once known

    def _unavailable_reason(self) -> str | None:
        if not _installed_backends():
            return "neither torchmetrics nor lpips is installed (pip install torchmetrics to enable it)"
        if importlib.util.find_spec("torchvision") is None:
            return "torchvision is not installed"
        weights = backbone_weights_file(self.net)
        if not weights.is_file():
            return (f"{BACKBONES[self.net][0]} weights not found at {weights} (no download is attempted; fetch them "
                    f"once with `{FETCH_COMMAND} --net {self.net}`, or copy {weights.name} there)")
        return None

    def _build(self) -> None:
        if self.net == "off":
            return
        self.reason = self._unavailable_reason()
        if self.reason is None:
            self._backend = _installed_backends()[0]
            try:
                with _downloads_blocked():
                    self._distance = _BACKENDS[self._backend](self.device, self.net)
            except Exception as exc:  # a third-party build can fail many ways; report it, do not stop the run
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                self.reason = f"{self._backend} could not build {self.name} ({type(exc).__name__}: {first_line})"
        if self.reason is not None:
            log.warning("LPIPS unavailable: %s", self.reason)

    @property
    def name(self) -> str:
        return "LPIPS-VGG" if self.net == "vgg" else "LPIPS-Alex"

    @property
    def available(self) -> bool:
        """Whether LPIPS can be computed (builds the network on first use)."""
        if self._distance is None and self.reason is None and self.net != "off":
            self._build()
        return self._distance is not None

    @property
    def status(self) -> str:
        """One line for run metadata: the backend in use, why it is unavailable, 'off' or 'not used'."""
        if self.net == "off":
            return "off (--lpips off)"
        if self._distance is not None:
            return f"{self.name} via {self._backend}"
        return "not used" if self.reason is None else f"unavailable: {self.reason}"

    def provenance(self) -> dict:
        """How LPIPS was (or was not) computed: backbone, backend and weights files, input range."""
        info = {"net": self.net, "status": self.status}
        if self.net == "off":
            return info
        info.update(backbone=BACKBONES[self.net][0], backbone_weights=str(backbone_weights_file(self.net)),
                    input="clipped to [-1, 1] (normalize=False), one image at a time")
        if self._backend is not None:
            info.update(backend=self._backend, linear_weights=str(_linear_weights_file(self._backend, self.net)))
        return info

    def __call__(self, gt: torch.Tensor, rec: torch.Tensor) -> list[float] | None:
        """LPIPS of `rec` against `gt` (lower is closer), both (B, 3, H, W) or (3, H, W) in [-1, 1].

        Inputs are clamped to [-1, 1] (as the official code does) and moved to `device`. Returns one
        float per image, or None when LPIPS is unavailable.
        """
        gt, rec = _batched(gt, rec)
        if not self.available:
            return None
        with torch.no_grad():
            gt, rec = (x.detach().to(self.device, torch.float32).clamp(-1, 1) for x in (gt, rec))
            return [float(v) for v in self._distance(gt, rec).flatten()]


def provenance(lpips: LPIPS | None = None) -> dict:
    """How each metric is computed, for summary.json and the tables (see the module docstring)."""
    import skimage

    conversion = "clipped to [-1, 1], mapped by (v + 1) / 2 to [0, 1], float32 HWC"
    return {
        "psnr": {"function": "skimage.metrics.peak_signal_noise_ratio", "scikit-image": skimage.__version__,
                 "data_range": 1, "input": conversion},
        "ssim": {"function": "skimage.metrics.structural_similarity", "scikit-image": skimage.__version__,
                 "data_range": 1, "gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False,
                 "channel_axis": 2, "input": conversion},
        "lpips": (lpips or LPIPS(net="off")).provenance(),
    }


# One line for tables: how the numbers were computed (summary.json's metrics_provenance has the details).
PROTOCOL = ("PSNR and SSIM: scikit-image, data range 1, images clipped to [-1, 1] and mapped to [0, 1]; SSIM with a "
            "Gaussian window σ 1.5 per channel; LPIPS: its backbone in brackets (vgg is the official one).")


def lpips_net_of(summary: dict) -> str:
    """A run's LPIPS backbone (vgg, alex), or off / unavailable / not used, from its summary.json (older
    summaries without metrics_provenance: from their status line)."""
    info = summary.get("metrics_provenance", {}).get("lpips", {})
    status = str(info.get("status") or summary.get("lpips") or "")
    if status.startswith("off"):
        return "off"
    if status.startswith("unavailable"):
        return "unavailable"
    if status == "not used":
        return status
    return info.get("net") or ("vgg" if "VGG" in status else "alex" if "Alex" in status else "?")
