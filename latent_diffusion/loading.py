"""Build the LDM from a model-configuration dict (our YAML, ``kind: latent``) and load its weights strictly.

Checkpoint layout (CompVis LatentDiffusion, a Lightning ``.ckpt`` whose ``state_dict`` holds):
- 12 schedule buffers (``betas``, ``alphas_cumprod``, …): checked against ours, then dropped;
- ``model.diffusion_model.*``: the UNet; ``model_ema.*``: its EMA copy, one buffer per UNet parameter
  named with every dot removed (``model_ema.diffusion_modelinput_blocks41qkvweight``), plus
  ``model_ema.decay`` and ``model_ema.num_updates``;
- ``first_stage_model.*``: the VQ autoencoder; ``cond_stage_model.embedding.weight`` (class-conditional).
The standalone VQ checkpoint holds the autoencoder keys without prefix plus 55 training-loss tensors
(``loss.*``), which inference does not use and which are dropped explicitly.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from util.checkpoints import CheckpointError, load_strict
from guided_diffusion.unet import resolve_model_path

from .autoencoder import VQConfig
from .checkpoint_io import read_checkpoint
from .model import CondStageConfig, DiffusionConfig, LatentDiffusion, LatentModelConfig
from .unet import UNetConfig

log = logging.getLogger(__name__)

LDM_DOWNLOAD_PAGE = "https://github.com/CompVis/latent-diffusion#model-zoo"
UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."


@dataclasses.dataclass
class LatentModelSpec:
    """A parsed ``kind: latent`` model configuration: the network plus where its weights come from."""

    network: LatentModelConfig
    name: str = "latent diffusion model"
    model_path: str | None = None  # LDM .ckpt; None -> random weights (tests only)
    model_download: str = LDM_DOWNLOAD_PAGE
    first_stage_path: str | None = None  # VQ .ckpt; read only if the LDM file has no first_stage_model.* keys
    first_stage_download: str = LDM_DOWNLOAD_PAGE
    use_ema: bool = True


_SECTIONS = {"unet": UNetConfig, "first_stage": VQConfig, "cond_stage": CondStageConfig, "diffusion": DiffusionConfig}
_TOP_KEYS = {
    "kind", "name", "model_path", "model_download", "first_stage_path", "first_stage_download", "use_ema", "class_label",
}


def _section(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(values).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    return cls(**values)


def parse_model_config(config: dict) -> LatentModelSpec:
    """Validate a ``kind: latent`` model-configuration dict (unknown keys fail) into a LatentModelSpec.

    ``kind`` may be absent (the driver pops it before handing the dict over).
    """
    if config.get("kind", "latent") != "latent":
        raise ValueError(f"model config: kind must be 'latent' for a latent diffusion model, got {config.get('kind')!r}")
    unknown = sorted(set(config) - _TOP_KEYS - set(_SECTIONS))
    if unknown:
        valid = ", ".join(sorted(_TOP_KEYS | set(_SECTIONS)))
        raise ValueError(f"model config: unknown key(s) {', '.join(unknown)}; valid keys: {valid}")
    sections = {
        key: (None if config.get(key) is None else _section(cls, config[key], f"model config '{key}'"))
        for key, cls in _SECTIONS.items()
    }
    for key in ("unet", "first_stage"):
        if sections[key] is None:
            raise ValueError(f"model config: the '{key}' section is required")
    network = LatentModelConfig(
        unet=sections["unet"],
        first_stage=sections["first_stage"],
        cond_stage=sections["cond_stage"],
        diffusion=sections["diffusion"] or DiffusionConfig(),
        class_label=config.get("class_label"),
    )
    _check_class_label(network)
    top = {k: config[k] for k in _TOP_KEYS - {"kind", "class_label"} if config.get(k) is not None}
    return LatentModelSpec(network=network, **top)


def _check_class_label(cfg: LatentModelConfig) -> None:
    if cfg.cond_stage is None:
        if cfg.class_label is not None:
            raise ValueError("model config: class_label is set but the model has no cond_stage; remove class_label")
        return
    n = cfg.cond_stage.n_classes
    if not isinstance(cfg.class_label, int) or not 0 <= cfg.class_label < n:
        raise ValueError(
            f"model config: class_label must be an integer in [0, {n - 1}] ({n - 1} = null class), got {cfg.class_label!r}"
        )


def ema_key(unet_key: str) -> str:
    """``model.diffusion_model.out.2.weight`` -> ``model_ema.diffusion_modelout2weight`` (LitEma's naming)."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


def _select_unet_weights(sd: dict, unet_keys: list[str], use_ema: bool, where: str) -> dict:
    """Drop the model_ema.* entries; with use_ema and EMA present, put the EMA copy in place of model.*."""
    ema = {k: sd.pop(k) for k in list(sd) if k.startswith(EMA_PREFIX)}
    if not ema or not use_ema:
        if use_ema and any(k.startswith(UNET_PREFIX) for k in sd):
            log.warning("%s has no model_ema.* weights; using its raw model.* weights", where)
        return sd
    wanted = {ema_key(k): k for k in unet_keys}
    missing = [k for k in wanted if k not in ema]
    extra = [k for k in ema if k not in wanted and k not in ("model_ema.decay", "model_ema.num_updates")]
    if missing or extra:
        raise CheckpointError(
            f"{where}: EMA weights do not match the UNet config ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(extra)} unexpected, e.g. {extra[:2]}); check the unet section or set use_ema: false"
        )
    for s_name, key in wanted.items():
        sd[key] = ema[s_name]
    return sd


def _check_schedule(sd: dict, model: LatentDiffusion, where: str) -> None:
    """Pop the stored schedule buffers and check them against diffusion.{timesteps, linear_start, linear_end}."""
    for name, ours in model.schedule.items():
        if name not in sd:
            continue
        stored = sd.pop(name).double()
        if stored.shape != ours.shape or not torch.allclose(stored, ours, rtol=1e-4, atol=1e-6):
            raise CheckpointError(
                f"{where}: schedule buffer '{name}' differs from the model config's diffusion section "
                f"(timesteps, linear_start, linear_end); fix the config to match the checkpoint"
            )


def _first_stage_weights(spec: LatentModelSpec) -> dict:
    """The standalone VQ checkpoint's weights under the first_stage_model. prefix, loss.* dropped."""
    what = f"{spec.name} first stage (VQ autoencoder)"
    sd = read_checkpoint(spec.first_stage_path, what=what, source=spec.first_stage_download)
    # loss.* are the training losses (LPIPS net, PatchGAN discriminator): not part of the autoencoder.
    return {FIRST_STAGE_PREFIX + k: v for k, v in sd.items() if not k.startswith("loss.")}


def _ldm_weights(spec: LatentModelSpec, model: LatentDiffusion) -> dict:
    """The LDM checkpoint's weights, schedule checked, EMA selected, first stage completed from first_stage_path."""
    sd = read_checkpoint(spec.model_path, what=spec.name, source=spec.model_download)
    _check_schedule(sd, model, spec.model_path)
    unet_keys = [UNET_PREFIX + k for k, _ in model.model.diffusion_model.named_parameters()]
    sd = _select_unet_weights(sd, unet_keys, spec.use_ema, spec.model_path)
    if not any(k.startswith(FIRST_STAGE_PREFIX) for k in sd):
        if spec.first_stage_path is None:
            raise CheckpointError(
                f"{spec.name}: '{spec.model_path}' has no first_stage_model.* weights; set first_stage_path in the "
                f"model config to the VQ checkpoint (download: {spec.first_stage_download})"
            )
        sd.update(_first_stage_weights(spec))
    return sd


def _check_codebook(sd: dict, model: LatentDiffusion, path: str) -> None:
    key = FIRST_STAGE_PREFIX + "quantize.embedding.weight"
    want = tuple(model.first_stage_model.quantize.embedding.weight.shape)
    if key in sd and tuple(sd[key].shape) != want:
        raise CheckpointError(
            f"first stage: codebook in '{path}' is {tuple(sd[key].shape)}, the config expects {want}; "
            f"an early vq-f4.zip held the vq-f16 weights (CompVis/latent-diffusion#4), re-download it"
        )


def build_latent_model(config: dict | LatentModelConfig) -> LatentDiffusion:
    """The network with random weights (build it under ``torch.device('meta')`` to only inspect shapes)."""
    network = parse_model_config(config).network if isinstance(config, dict) else config
    return LatentDiffusion(network)


def load_latent_model(config: dict, device: torch.device | str = "cpu") -> LatentDiffusion:
    """Build the LDM of a ``kind: latent`` model config and load its checkpoints strictly, in eval mode, frozen.

    EMA weights replace the UNet's when present and ``use_ema`` is true. ``model_path: null`` leaves the
    UNet random (tests); the first stage is then read from ``first_stage_path`` if given. Raises
    CheckpointError in one line naming the file, where it goes and the download page.
    """
    spec = parse_model_config(config)
    # Relative paths: the current directory first, then the repository root.
    spec.model_path = None if spec.model_path is None else resolve_model_path(spec.model_path)
    spec.first_stage_path = None if spec.first_stage_path is None else resolve_model_path(spec.first_stage_path)
    if spec.model_path is not None:
        with torch.device("meta"):  # every weight comes from the files: skip the random initialisation
            model = LatentDiffusion(spec.network)
        sd, path = _ldm_weights(spec, model), spec.model_path
        model = model.to_empty(device=device)
    else:
        model = LatentDiffusion(spec.network)
        log.warning("%s: model_path is null, the UNet has random weights", spec.name)
        if spec.first_stage_path is None:
            return model.eval().requires_grad_(False).to(device)
        random_rest = {k: v for k, v in model.state_dict().items() if not k.startswith(FIRST_STAGE_PREFIX)}
        sd, path = {**random_rest, **_first_stage_weights(spec)}, spec.first_stage_path
    _check_codebook(sd, model, path)
    load_strict(model, sd, what=spec.name, path=path, source=spec.model_download)
    return model.eval().requires_grad_(False).to(device)
