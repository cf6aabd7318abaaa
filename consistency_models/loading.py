"""Consistency-model YAML → `ConsistencyDenoiser`, with the checkpoint loaded strictly.

A CM model configuration (`model_configurations/model_config_cm_*.yaml`) holds `kind: consistency`,
the network keys of `network.NETWORK_DEFAULTS`, `use_fp16`, `model_path`, `class_label` and the
preconditioning constants `sigma_data`, `sigma_min`, `sigma_max`. The checkpoints are the plain
key → tensor dicts of openai/consistency_models; `model_path: null` gives random weights.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from util.checkpoints import load_weights
from guided_diffusion.unet import resolve_model_path

from .network import NETWORK_DEFAULTS, NUM_CLASSES, build_network
from .preconditioning import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, ConsistencyDenoiser

KIND = "consistency"
README = "https://github.com/openai/consistency_models#pre-trained-models"
BLOB = "https://openaipublic.blob.core.windows.net/consistency/"
# Files with the keys of our two configurations (the EDM teachers share the keys but not the scalings).
KNOWN_CHECKPOINTS = (
    "cd_imagenet64_l2.pt", "cd_imagenet64_lpips.pt", "ct_imagenet64.pt",
    "cd_bedroom256_lpips.pt", "cd_bedroom256_l2.pt", "ct_bedroom256.pt",
    "cd_cat256_lpips.pt", "cd_cat256_l2.pt", "ct_cat256.pt",
)

MODEL_CONFIG_DEFAULTS = dict(
    kind=KIND,
    **NETWORK_DEFAULTS,
    use_fp16=False,
    model_path=None,
    class_label=None,
    sigma_data=SIGMA_DATA,
    sigma_min=SIGMA_MIN,
    sigma_max=SIGMA_MAX,
)


def download_source(file_name: str) -> str:
    """Where a CM checkpoint can be downloaded, for error messages."""
    if file_name in KNOWN_CHECKPOINTS:
        return f"the openai/consistency_models README ({README}; direct link {BLOB}{file_name})"
    return f"the openai/consistency_models README ({README})"


def resolve_model_config(model_config: Mapping) -> dict:
    """The model config with defaults filled in, checked: unknown keys, `kind`, `class_label`, σ constants."""
    unknown = sorted(set(model_config) - set(MODEL_CONFIG_DEFAULTS))
    if unknown:
        raise ValueError(
            f"consistency model config: unknown key(s) {unknown}; valid keys are {sorted(MODEL_CONFIG_DEFAULTS)}"
        )
    cfg = {**MODEL_CONFIG_DEFAULTS, **model_config}
    if cfg["kind"] != KIND:
        raise ValueError(f"consistency model config: kind is '{cfg['kind']}'; a consistency model config needs kind: {KIND}")
    label = cfg["class_label"]
    if label is not None:
        if not cfg["class_cond"]:
            raise ValueError("consistency model config: class_label is set but class_cond is false; set class_label: null")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_CLASSES:
            raise ValueError(
                f"consistency model config: class_label={label!r} must be an integer in [0, {NUM_CLASSES - 1}] "
                f"or null (a label drawn per image)"
            )
    smin, smax, sdata = (float(cfg[k]) for k in ("sigma_min", "sigma_max", "sigma_data"))
    if not 0 < smin < smax or sdata <= 0:
        raise ValueError(
            f"consistency model config: need 0 < sigma_min ({smin}) < sigma_max ({smax}) and sigma_data ({sdata}) > 0; "
            f"the released checkpoints use 0.002, 80.0 and 0.5"
        )
    return cfg


def load_consistency_model(model_config: Mapping, device: str | torch.device = "cpu") -> ConsistencyDenoiser:
    """Build the denoiser D(x_σ, σ) of a CM model config and load `model_path` strictly.

    Returns the denoiser on `device` in eval mode with frozen parameters. `use_fp16: true` runs the
    network's torso in float16 on CUDA (as the reference's use_fp16); on the CPU everything is float32.
    A missing or mismatching checkpoint raises `CheckpointError` naming the file and its download page.
    """
    cfg = resolve_model_config(model_config)
    net = build_network(**{k: cfg[k] for k in NETWORK_DEFAULTS})
    if cfg["model_path"]:
        path = resolve_model_path(cfg["model_path"])
        name = os.path.basename(path)
        load_weights(net, path, what=f"consistency model ({name})", source=download_source(name))
    device = torch.device(device)
    if cfg["use_fp16"] and device.type == "cuda":
        net.torso_dtype = torch.float16
    denoiser = ConsistencyDenoiser(net, cfg["sigma_data"], cfg["sigma_min"], cfg["sigma_max"])
    return denoiser.to(device).eval().requires_grad_(False)
