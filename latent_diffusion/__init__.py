"""Latent DCDP: the CompVis VQ-f4 LDMs (ffhq-ldm-vq-4, cin256-v2) and the latent purification prior."""
from .autoencoder import VQConfig, VQModel
from .loading import build_latent_model, ema_key, load_latent_model, parse_model_config
from .model import LatentDiffusion, LatentModelConfig
from .prior import LatentPrior
from .schedule import latent_ddim_timesteps, ldm_betas, purify_latent
from .unet import UNetConfig, UNetModel

__all__ = [
    "LatentDiffusion",
    "LatentModelConfig",
    "LatentPrior",
    "UNetConfig",
    "UNetModel",
    "VQConfig",
    "VQModel",
    "build_latent_model",
    "ema_key",
    "latent_ddim_timesteps",
    "ldm_betas",
    "load_latent_model",
    "parse_model_config",
    "purify_latent",
]
