"""The guided-diffusion ADM UNet (Dhariwal & Nichol 2021), written to load its public checkpoints.

`create_model(**model_config)` takes the keys of a model-configuration YAML and returns the network in
eval mode, with the checkpoint at `model_path` loaded strictly (random weights when it is absent).
Module and parameter names are exactly guided-diffusion's, so its state_dicts load unchanged:
`time_embed.{0,2}`, `input_blocks.N.M.*`, `middle_block.{0,1,2}.*`, `output_blocks.N.M.*`, `out.{0,2}`.

Differences from the reference that do not change the numbers:
- attention runs through `F.scaled_dot_product_attention` (the `qkv`/`proj_out` kernel-1 Conv1d
  weights are applied as linear maps over the tokens);
- plain autograd everywhere, so gradients w.r.t. the input work with frozen weights; `use_checkpoint`
  uses `torch.utils.checkpoint` (non-reentrant) while gradients are enabled;
- `use_fp16` keeps every weight in float32: run the model under `torch.autocast` for half precision
  (GroupNorm and the attention softmax then still compute in float32, as the reference does).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from util.checkpoints import load_weights
from util.files import resolve_path

from .unet_blocks import (  # noqa: F401  (the blocks are re-exported: the consistency-model UNet builds on them)
    GROUPS, AttentionBlock, Downsample, ResBlock, TimestepEmbedSequential, Upsample,
    normalization, timestep_embedding, zero_module,
)

NUM_CLASSES = 1000

DPS_DRIVE = "the DPS authors' Google Drive folder linked from https://github.com/DPS2022/diffusion-posterior-sampling"
OPENAI = "https://github.com/openai/guided-diffusion"
DOWNLOAD_PAGES = {
    "ffhq_10m.pt": DPS_DRIVE,
    "imagenet_256.pt": f"{DPS_DRIVE} (also {OPENAI}: 256x256_diffusion_uncond.pt)",
    "imagenet256.pt": f"{DPS_DRIVE} (also {OPENAI}: 256x256_diffusion_uncond.pt)",
    "lsun_bedroom.pt": OPENAI,
}
FILE_ALIASES = {"imagenet_256.pt": "imagenet256.pt", "imagenet256.pt": "imagenet_256.pt"}

DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
MODEL_CONFIG_DEFAULTS = dict(
    image_size=256,
    num_channels=128,
    num_res_blocks=1,
    channel_mult="",
    learn_sigma=True,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=4,
    num_head_channels=64,
    num_heads_upsample=-1,
    use_scale_shift_norm=True,
    dropout=0.0,
    resblock_updown=True,
    use_fp16=False,
    use_new_attention_order=False,
    model_path=None,
)


# --------------------------------------------------------------------------------------------------
# The UNet
# --------------------------------------------------------------------------------------------------

class UNetModel(nn.Module):
    """ADM UNet: `model(x, timesteps, y=None)`.

    x: (B, in_channels, H, W), images in [-1, 1] (noised); H and W multiples of 2^(levels−1).
    timesteps: (B,) (or a scalar) raw diffusion steps 0..999. y: (B,) class labels when class-conditional.
    Returns (B, out_channels, H, W): ε, followed by the learned-range values when out_channels = 6.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_fp16: bool = False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16  # a hint for the caller's autocast; the weights stay float32
        self.downsample_factor = 2 ** (len(channel_mult) - 1)

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(ch_in: int, ch_out: int, **updown: bool) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, **updown)

        self.num_head_channels = num_head_channels
        self.legacy_attention = not use_new_attention_order
        attn = self.make_attention

        ch = int(channel_mult[0] * model_channels)
        first_ch = ch
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(first_ch, out_channels, 3, padding=1)))

    def make_attention(self, channels: int, num_heads: int) -> nn.Module:
        """The attention block of this network family (subclasses swap in their own layout)."""
        return AttentionBlock(channels, num_heads, self.num_head_channels, legacy_order=self.legacy_attention)

    def _block(self, block: TimestepEmbedSequential, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def embedding(self, x: torch.Tensor, noise_level: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Check the input and return the (B, 4·mc) embedding of the noise level (and class label)."""
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(
                f"UNet input: height and width must be multiples of {self.downsample_factor} for this model "
                f"(got {tuple(x.shape[-2:])}); pad or resize the image"
            )
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("UNet input: pass class labels y exactly when the model is class-conditional (class_cond)")
        noise_level = torch.as_tensor(noise_level, device=x.device)
        if noise_level.ndim == 0:
            noise_level = noise_level.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(noise_level, self.model_channels))
        return emb + self.label_emb(y) if y is not None else emb

    def torso(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Input blocks, middle block and output blocks (skips concatenated as [h, skip], h first)."""
        skips = []
        for block in self.input_blocks:
            h = self._block(block, h, emb)
            skips.append(h)
        h = self._block(self.middle_block, h, emb)
        for block in self.output_blocks:
            h = self._block(block, torch.cat([h, skips.pop()], dim=1), emb)
        return h

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1]; timesteps: (B,) steps 0..999 → (B, out_channels, H, W)."""
        emb = self.embedding(x, timesteps, y)  # (B, 4·mc)
        return self.out(self.torso(x.to(self.out[2].weight.dtype), emb))


# --------------------------------------------------------------------------------------------------
# create_model: YAML keys → UNetModel (+ checkpoint)
# --------------------------------------------------------------------------------------------------

def create_model(**model_config) -> nn.Module:
    """Build the ADM UNet from the keys of a model-configuration YAML and load `model_path` strictly.

    Keys (defaults in `MODEL_CONFIG_DEFAULTS`): image_size, num_channels, num_res_blocks, channel_mult
    ("" = default for image_size, "1,2,2" or a list), learn_sigma (6 output channels instead of 3),
    class_cond (1000 classes), use_checkpoint, attention_resolutions (int, "32,16,8" or a list of
    pixel resolutions), num_heads, num_head_channels (overrides num_heads when not -1),
    num_heads_upsample, use_scale_shift_norm, dropout, resblock_updown, use_fp16 (weights stay
    float32; use torch.autocast), use_new_attention_order, model_path (None/"" = random weights;
    relative paths resolve against the current directory, then the repository root).
    Returns the model in eval mode; with a checkpoint its parameters are frozen. Without one the
    initialisation is ADM's: the last conv of every residual branch, every attention `proj_out` and
    the output conv start at zero, so a fresh model outputs zeros.
    """
    unknown = sorted(set(model_config) - set(MODEL_CONFIG_DEFAULTS))
    if unknown:
        raise ValueError(
            f"model config: unknown key(s) {unknown}; valid keys are {sorted(MODEL_CONFIG_DEFAULTS)}"
        )
    cfg = {**MODEL_CONFIG_DEFAULTS, **model_config}
    arch = architecture_kwargs(cfg, "model config")
    model = UNetModel(
        attention_resolutions=arch.pop("attention_ds"),
        use_checkpoint=bool(cfg["use_checkpoint"]),
        **arch,
        use_new_attention_order=bool(cfg["use_new_attention_order"]),
        use_fp16=bool(cfg["use_fp16"]),
    )
    if cfg["model_path"]:
        path = resolve_model_path(cfg["model_path"])
        name = os.path.basename(path)
        load_weights(
            model,
            path,
            what=f"guided-diffusion UNet ({name})",
            source=DOWNLOAD_PAGES.get(name, "the place you got it from"),
        )
    return model.eval()



def architecture_kwargs(cfg: dict, where: str) -> dict:
    """The ADM constructor arguments a model config implies, checked (shared with the consistency models).

    `attention_ds` holds the downsampling factors at which attention sits.
    """
    image_size = int(cfg["image_size"])
    channel_mult = parse_channel_mult(cfg["channel_mult"], image_size)
    model_channels = int(cfg["num_channels"])
    bad = [m for m in channel_mult if int(m * model_channels) % GROUPS or int(m * model_channels) <= 0]
    if bad:
        raise ValueError(
            f"{where}: num_channels={model_channels} × channel_mult {bad} is not a positive multiple of "
            f"{GROUPS} (GroupNorm groups); change num_channels or channel_mult"
        )
    return dict(
        in_channels=3,
        model_channels=model_channels,
        out_channels=6 if cfg["learn_sigma"] else 3,
        num_res_blocks=int(cfg["num_res_blocks"]),
        attention_ds=parse_attention_resolutions(cfg["attention_resolutions"], image_size),
        dropout=float(cfg["dropout"]),
        channel_mult=channel_mult,
        num_classes=NUM_CLASSES if cfg["class_cond"] else None,
        num_heads=int(cfg["num_heads"]),
        num_head_channels=int(cfg["num_head_channels"]),
        num_heads_upsample=int(cfg["num_heads_upsample"]),
        use_scale_shift_norm=bool(cfg["use_scale_shift_norm"]),
        resblock_updown=bool(cfg["resblock_updown"]),
    )

def parse_channel_mult(channel_mult: str | Sequence[float], image_size: int) -> tuple[float, ...]:
    """"" → the default for `image_size`; "1,2,2" or [1, 2, 2] → (1, 2, 2)."""
    if channel_mult in ("", None):
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"model config: no default channel_mult for image_size={image_size} (defaults exist for "
                f"{sorted(DEFAULT_CHANNEL_MULT)}); set channel_mult explicitly, e.g. \"1,2,2\""
            )
        return DEFAULT_CHANNEL_MULT[image_size]
    try:
        items = channel_mult.split(",") if isinstance(channel_mult, str) else list(channel_mult)
        mult = tuple(_number(m) for m in items)
    except (TypeError, ValueError):
        raise ValueError(
            f"model config: channel_mult={channel_mult!r} is not a list of numbers; use e.g. \"1,2,2\" or \"\""
        ) from None
    if not mult or any(m <= 0 for m in mult):
        raise ValueError(f"model config: channel_mult={channel_mult!r} must hold positive numbers, e.g. \"1,2,2\"")
    return mult


def parse_attention_resolutions(resolutions: int | str | Sequence[int], image_size: int) -> tuple[int, ...]:
    """Pixel resolutions (16, "32,16,8", [32, 16]) → downsampling factors image_size // r."""
    try:
        if isinstance(resolutions, str):
            items = [r for r in resolutions.split(",") if r.strip()]
        elif isinstance(resolutions, int):
            items = [resolutions]
        else:
            items = list(resolutions)
        res = [int(r) for r in items]
    except (TypeError, ValueError):
        raise ValueError(
            f"model config: attention_resolutions={resolutions!r} is not a list of integers; use e.g. 16 or \"32,16,8\""
        ) from None
    bad = [r for r in res if r <= 0 or image_size % r]
    if bad:
        raise ValueError(
            f"model config: attention_resolutions {bad} do not divide image_size={image_size}; "
            f"use pixel resolutions such as {image_size // 16} or \"{image_size // 8},{image_size // 16}\""
        )
    return tuple(image_size // r for r in res)


def resolve_model_path(model_path: str | os.PathLike) -> str:
    """Absolute path of the checkpoint, found as `util.files.resolve_path` finds files; accepts the
    imagenet_256.pt / imagenet256.pt spellings for each other. A missing file resolves to the path as
    given, so the loader's error names it."""
    found = resolve_path(model_path)
    alias = FILE_ALIASES.get(found.name)
    if not found.is_file() and alias:
        other = resolve_path(Path(os.path.expanduser(os.fspath(model_path))).with_name(alias))
        found = other if other.is_file() else found
    return os.path.abspath(found)


def _number(s: str | float) -> float:
    value = float(s)
    return int(value) if value.is_integer() else value
