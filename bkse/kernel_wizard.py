"""bkse's KernelWizard (Tran et al., "Explore Image Deblurring via Encoded Blur Kernel Space", CVPR 2021).

Module names and `Sequential` indices follow bkse, so `state_dict()` has exactly the keys of
GOPRO_wVAE.pth (parameter-free layers keep their slots: LeakyReLU, padding, PixelShuffle, Identity
norms). With F the feature extractor, G the kernel adapter and R the reconstruction trunk:

    adaptKernel(x, k) = x + R(G(F(x), k))               blur a sharp image x with a latent kernel k
    forward(x, x_blur) = (μ, log σ²) = E(F(x), F(x_blur))   the VAE kernel encoder (DCDP never runs it)

Images are (B, 3, H, W) in [0, 1] with H, W multiples of 128; a latent kernel is
(B, 8·nf, H/128, W/128), i.e. (B, 512, 2, 2) at 256×256 for GOPRO_wVAE (nf 64).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

SPATIAL_DIVISOR = 128  # 2 stride-2 convs in F, then 5 stride-2 levels in G
OPTION_KEYS = {
    "pretrained", "input_nc", "nf", "front_RBs", "back_RBs", "N_frames", "kernel_dim", "use_vae",
    "KernelExtractor", "Adapter", "img_size",
}
REQUIRED_KEYS = OPTION_KEYS - {"pretrained", "N_frames", "img_size"}
EXTRACTOR_KEYS = {"norm", "use_sharp", "n_blocks", "padding_type", "use_dropout"}
ADAPTER_KEYS = {"norm", "use_dropout"}
NORMS = ("none", "instance")
PADDINGS = ("reflect", "replicate", "zero")


def check_options(opt: Mapping, where: str = "KernelWizard options") -> None:
    """Raise ValueError (one line, naming `where`) unless `opt` is a valid KernelWizard section."""
    if not isinstance(opt, Mapping):
        raise ValueError(f"{where}: the KernelWizard section must be a mapping, got {type(opt).__name__}")
    for keys, valid, required, section in (
        (opt, OPTION_KEYS, REQUIRED_KEYS, "KernelWizard"),
        (opt.get("KernelExtractor") or {}, EXTRACTOR_KEYS, EXTRACTOR_KEYS, "KernelWizard.KernelExtractor"),
        (opt.get("Adapter") or {}, ADAPTER_KEYS, ADAPTER_KEYS, "KernelWizard.Adapter"),
    ):
        unknown, missing = sorted(set(keys) - valid), sorted(required - set(keys))
        if unknown or missing:
            problems = [f"unknown key(s) {unknown}"] if unknown else []
            problems += [f"missing key(s) {missing}"] if missing else []
            raise ValueError(
                f"{where}: {section} has {' and '.join(problems)}; valid keys are {sorted(valid)} "
                f"(see bkse/options/generate_blur/default.yml)"
            )
    for section in ("KernelExtractor", "Adapter"):
        if opt[section]["norm"] not in NORMS:
            raise ValueError(f"{where}: KernelWizard.{section}.norm={opt[section]['norm']!r}; use one of {NORMS}")
    if opt["KernelExtractor"]["padding_type"] not in PADDINGS:
        raise ValueError(
            f"{where}: KernelWizard.KernelExtractor.padding_type={opt['KernelExtractor']['padding_type']!r}; "
            f"use one of {PADDINGS}"
        )
    for key in ("input_nc", "nf", "kernel_dim", "front_RBs", "back_RBs"):
        least = 0 if key.endswith("RBs") else 1
        if not isinstance(opt[key], int) or isinstance(opt[key], bool) or opt[key] < least:
            raise ValueError(f"{where}: KernelWizard.{key}={opt[key]!r} must be an integer ≥ {least}")


def _norm(kind: str, channels: int) -> nn.Module:
    # bkse's "instance" norm has no affine parameters and no running statistics, hence no keys.
    return nn.InstanceNorm2d(channels) if kind == "instance" else nn.Identity()


def _conv_bias(norm: str) -> bool:
    # bkse gives these convs a bias only when followed by InstanceNorm.
    return norm == "instance"


class ResidualBlockNoBN(nn.Module):
    """x + conv2(relu(conv1(x))), 3×3 convs with bias, no normalisation."""

    def __init__(self, nf: int):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        if self.conv1.weight.is_meta:  # nothing to initialise (and meta normal_ would import torch._dynamo)
            return
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):  # bkse's init: Kaiming (fan_in) scaled by 0.1, zero bias
                nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in").mul_(0.1)
                conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class ResnetBlock(nn.Module):
    """x + [pad, conv3×3, norm, ReLU, (dropout), pad, conv3×3, norm](x) (pix2pix's ResnetBlock)."""

    def __init__(self, dim: int, padding_type: str, norm: str, use_dropout: bool):
        super().__init__()
        layers: list[nn.Module] = []
        for second in (False, True):
            p = 1 if padding_type == "zero" else 0
            if padding_type != "zero":
                layers.append(nn.ReflectionPad2d(1) if padding_type == "reflect" else nn.ReplicationPad2d(1))
            layers += [nn.Conv2d(dim, dim, 3, padding=p, bias=_conv_bias(norm)), _norm(norm, dim)]
            if not second:
                layers.append(nn.ReLU())
                if use_dropout:
                    layers.append(nn.Dropout(0.5))
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class KernelExtractor(nn.Module):
    """The VAE encoder E: features of (sharp, blurred) → (μ, log σ²) of the latent kernel.

    Input two (B, nf, H/4, W/4) feature maps; output two (B, kernel_dim, H/128, W/128) tensors
    (with use_vae False: the kernel and zeros).
    """

    def __init__(self, opt: Mapping):
        super().__init__()
        nf, self.kernel_dim, self.use_vae = opt["nf"], opt["kernel_dim"], opt["use_vae"]
        o = opt["KernelExtractor"]
        self.padding_type = o["padding_type"]
        norm, bias = o["norm"], _conv_bias(o["norm"])
        in_nc = 2 * nf if o["use_sharp"] else nf
        out_nc = 2 * self.kernel_dim if self.use_vae else self.kernel_dim
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3), nn.Conv2d(in_nc, nf, 7, padding=0, bias=bias), _norm(norm, nf), nn.ReLU(),
        ]
        for i in range(5):  # five stride-2 convs, channels doubling up to out_nc
            c_in, c_out = min(nf * 2**i, out_nc), min(nf * 2 ** (i + 1), out_nc)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=bias), _norm(norm, c_out), nn.ReLU()]
        layers += [ResnetBlock(out_nc, o["padding_type"], norm, o["use_dropout"]) for _ in range(o["n_blocks"])]
        self.model = nn.Sequential(*layers)

    def forward(self, sharp: torch.Tensor, blur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(torch.cat([sharp, blur], dim=1))  # (B, out_nc, H/128, W/128)
        if self.use_vae:
            return out[:, : self.kernel_dim], out[:, self.kernel_dim :]
        return out, torch.zeros_like(out)


class UnetSkipBlock(nn.Module):
    """One level of the pix2pix U-Net G, with the latent kernel joining at the innermost level.

    outermost: x → up(sub(down(x)))              (no skip; `up` ends in tanh)
    middle:    x → cat[up(sub(down(x))), x]      (`down` starts with LeakyReLU(0.2))
    innermost: x → cat[up(cat[down(x), k]), x]
    bkse's LeakyReLU acts in place, so its skip carries LeakyReLU(x) instead of x; every consumer of
    the concatenation starts with a ReLU, for which the two are the same, so we skip the in-place trick.
    """

    def __init__(self, outer_nc: int, inner_nc: int, norm: str, input_nc: int | None = None,
                 submodule: "UnetSkipBlock | None" = None, outermost: bool = False,
                 innermost: bool = False, use_dropout: bool = False, kernel_nc: int = 0):
        super().__init__()
        self.outermost, self.innermost = outermost, innermost
        bias = _conv_bias(norm)
        down_conv = nn.Conv2d(input_nc or outer_nc, inner_nc, 4, stride=2, padding=1, bias=bias)
        up_in = inner_nc + kernel_nc if innermost else 2 * inner_nc
        if outermost:
            down = [down_conv]
            up = [nn.ReLU(), nn.ConvTranspose2d(up_in, outer_nc, 4, 2, 1), nn.Tanh()]
        else:
            down = [nn.LeakyReLU(0.2), down_conv] + ([] if innermost else [_norm(norm, inner_nc)])
            up = [nn.ReLU(), nn.ConvTranspose2d(up_in, outer_nc, 4, 2, 1, bias=bias), _norm(norm, outer_nc)]
            if use_dropout and not innermost:
                up.append(nn.Dropout(0.5))
        self.down = nn.Sequential(*down)
        if submodule is not None:  # registered between down and up, as in bkse (state_dict order)
            self.submodule = submodule
        self.up = nn.Sequential(*up)

    def forward(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        h = torch.cat([h, kernel], dim=1) if self.innermost else self.submodule(h, kernel)
        return self.up(h) if self.outermost else torch.cat([self.up(h), x], dim=1)


class KernelAdapter(nn.Module):
    """G: (B, nf, H/4, W/4) features and a (B, 8·nf, H/128, W/128) kernel → (B, nf, H/4, W/4) in (-1, 1)."""

    def __init__(self, opt: Mapping):
        super().__init__()
        nf, norm, drop = opt["nf"], opt["Adapter"]["norm"], opt["Adapter"]["use_dropout"]
        block = UnetSkipBlock(8 * nf, 8 * nf, norm, innermost=True, kernel_nc=8 * nf)
        block = UnetSkipBlock(4 * nf, 8 * nf, norm, submodule=block, use_dropout=drop)
        block = UnetSkipBlock(2 * nf, 4 * nf, norm, submodule=block, use_dropout=drop)
        block = UnetSkipBlock(nf, 2 * nf, norm, submodule=block, use_dropout=drop)
        self.model = UnetSkipBlock(nf, nf, norm, input_nc=nf, submodule=block, outermost=True)

    def forward(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        return self.model(x, kernel)


class KernelWizard(nn.Module):
    """bkse's KernelWizard built from the `KernelWizard` section of an options YAML.

    `with_kernel_extractor=False` skips the VAE encoder (92 M of GOPRO_wVAE's 115 M parameters),
    which `adaptKernel` never uses. `random_weights` stays True until a checkpoint is loaded.
    """

    def __init__(self, opt: Mapping, with_kernel_extractor: bool = True):
        super().__init__()
        check_options(opt)
        nf, c = opt["nf"], opt["input_nc"]
        self.nf, self.input_nc = nf, c
        self.kernel_channels = 8 * nf  # the adapter's innermost up-conv expects 16·nf = 8·nf + kernel
        self.random_weights = True

        features: list[nn.Module] = [
            nn.Conv2d(c, nf, 3, 1, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(nf, nf, 3, 2, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(nf, nf, 3, 2, 1), nn.LeakyReLU(0.1),
        ]
        self.feature_extractor = nn.Sequential(*features, *(ResidualBlockNoBN(nf) for _ in range(opt["front_RBs"])))
        if with_kernel_extractor:
            self.kernel_extractor = KernelExtractor(opt)
        self.adapter = KernelAdapter(opt)
        # Two ×2 PixelShuffle stages back to full size; bkse hard-codes 64 channels after the first.
        self.recon_trunk = nn.Sequential(
            *(ResidualBlockNoBN(nf) for _ in range(opt["back_RBs"])),
            nn.Conv2d(nf, 4 * nf, 3, 1, 1), nn.PixelShuffle(2), nn.LeakyReLU(0.1),
            nn.Conv2d(nf, 4 * 64, 3, 1, 1), nn.PixelShuffle(2), nn.LeakyReLU(0.1),
            nn.Conv2d(64, 64, 3, 1, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(64, c, 3, 1, 1),
        )

    def adaptKernel(self, x_sharp: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:  # noqa: N802 (bkse's name)
        """Blur `x_sharp` (B, 3, H, W), about [0, 1], with `kernel` (B, 8·nf, H/128, W/128).

        Returns (B, 3, H, W), roughly in [0, 1] but not clamped.
        """
        self.check_shapes(x_sharp, kernel)
        kernel = kernel.expand(x_sharp.shape[0], -1, -1, -1)  # one kernel may serve a whole batch
        out = self.adapter(self.feature_extractor(x_sharp), kernel)  # (B, nf, H/4, W/4)
        return self.recon_trunk(out) + x_sharp

    def forward(self, x_sharp: torch.Tensor, x_blur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the blur between a sharp/blurred pair (B, 3, H, W), H, W ≥ 256, into (μ, log σ²),
        each (B, kernel_dim, H/128, W/128). Needs the kernel extractor."""
        if not hasattr(self, "kernel_extractor"):
            raise RuntimeError(
                "KernelWizard was built with with_kernel_extractor=False; build it with True to encode kernels"
            )
        self.check_shapes(x_sharp)
        self.check_shapes(x_blur)
        if self.kernel_extractor.padding_type == "reflect" and min(x_sharp.shape[-2:]) < 2 * SPATIAL_DIVISOR:
            raise ValueError(  # its 3×3 blocks reflect-pad a (H/128, W/128) map, which needs both ≥ 2
                f"KernelWizard: encoding a kernel needs images of at least 256×256, got {tuple(x_sharp.shape)}"
            )
        return self.kernel_extractor(self.feature_extractor(x_sharp), self.feature_extractor(x_blur))

    def check_shapes(self, x: torch.Tensor, kernel: torch.Tensor | None = None) -> None:
        """ValueError unless x is (B, input_nc, H, W) with H, W multiples of 128 and kernel (if given)
        is (B or 1, 8·nf, H/128, W/128)."""
        if x.dim() != 4 or x.shape[1] != self.input_nc:
            raise ValueError(f"KernelWizard: image must be (B, {self.input_nc}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % SPATIAL_DIVISOR or w % SPATIAL_DIVISOR:
            raise ValueError(
                f"KernelWizard: image size {h}×{w} is not a multiple of {SPATIAL_DIVISOR}; "
                f"resize or crop the images to e.g. 256×256"
            )
        expected = (self.kernel_channels, h // SPATIAL_DIVISOR, w // SPATIAL_DIVISOR)
        if kernel is not None and (kernel.dim() != 4 or tuple(kernel.shape[1:]) != expected
                                   or kernel.shape[0] not in (1, x.shape[0])):
            raise ValueError(
                f"KernelWizard: latent kernel must be (B, {expected[0]}, {expected[1]}, {expected[2]}) for a "
                f"{h}×{w} image with nf={self.nf}, got {tuple(kernel.shape)}"
            )
