"""PSNR and SSIM exactly as the official DCDP code computes them, and an optional LPIPS-VGG.

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

# torchvision's VGG16_Weights.IMAGENET1K_V1 file, which LPIPS-VGG builds on (named here so that checking
# for it does not import torchvision).
VGG16_FILE = "vgg16-397923af.pth"


def _vgg16_weights_file() -> Path:
    """Where torchvision looks for (and would download) the VGG16 weights: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def _build_torchmetrics(device: torch.device) -> Distance:
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type="vgg", normalize=False).to(device).eval()

    def distance(gt: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        values = torch.stack([metric(g[None], r[None]) for g, r in zip(gt, rec)])  # per image, as the official loop
        metric.reset()
        return values

    return distance


def _build_lpips_package(device: torch.device) -> Distance:
    import lpips

    net = lpips.LPIPS(net="vgg", verbose=False).to(device).eval()
    return lambda gt, rec: net(gt, rec).flatten()


# Tried in this order; torchmetrics is what the official code uses.
_BACKENDS: dict[str, Callable[[torch.device], Distance]] = {"torchmetrics": _build_torchmetrics, "lpips": _build_lpips_package}


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
    """LPIPS-VGG distance from locally present weights, or None with a one-line notice.

    Nothing is built until first use. The network needs torchmetrics (or the `lpips` package),
    torchvision and the VGG16 weights file in the torch hub cache (`$TORCH_HOME/hub/checkpoints`,
    by default `~/.cache/torch/hub/checkpoints`). If any of these is missing, the first use logs
    "LPIPS unavailable: <reason>" once and every call returns None.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._distance: Distance | None = None
        self._backend: str | None = None
        self.reason: str | None = None  # why LPIPS is unavailable, once known

    def _unavailable_reason(self) -> str | None:
        if not _installed_backends():
            return "neither torchmetrics nor lpips is installed (pip install torchmetrics to enable it)"
        if importlib.util.find_spec("torchvision") is None:
            return "torchvision is not installed"
        weights = _vgg16_weights_file()
        if not weights.is_file():
            return f"VGG16 weights not found at {weights} (no download is attempted; copy {weights.name} there)"
        return None

    def _build(self) -> None:
        self.reason = self._unavailable_reason()
        if self.reason is None:
            self._backend = _installed_backends()[0]
            try:
                with _downloads_blocked():
                    self._distance = _BACKENDS[self._backend](self.device)
            except Exception as exc:  # a third-party build can fail many ways; report it, do not stop the run
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                self.reason = f"{self._backend} could not build LPIPS-VGG ({type(exc).__name__}: {first_line})"
        if self.reason is not None:
            log.warning("LPIPS unavailable: %s", self.reason)

    @property
    def available(self) -> bool:
        """Whether LPIPS can be computed (builds the network on first use)."""
        if self._distance is None and self.reason is None:
            self._build()
        return self._distance is not None

    @property
    def status(self) -> str:
        """One line for run metadata: the backend in use, why it is unavailable, or 'not used'."""
        if self._distance is not None:
            return f"LPIPS-VGG via {self._backend}"
        return "not used" if self.reason is None else f"unavailable: {self.reason}"

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
