"""OpenAI consistency models (CD/CT checkpoints) as DCDP purifiers.

- `network`: the CM UNet F (guided-diffusion layout, q|k|v-major 1x1-Conv2d attention).
- `preconditioning`: D(x, σ) = c_skip·x + c_out·F(c_in·x, 250·ln σ) with the boundary condition.
- `loading`: model YAML → `ConsistencyDenoiser`, checkpoints loaded strictly.
- `purifier`: `ConsistencyPurifier`, one consistency step (plus optional refinements) per purification.
"""
from .loading import MODEL_CONFIG_DEFAULTS, load_consistency_model
from .network import CMAttentionBlock, ConsistencyUNet, build_network
from .preconditioning import (
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    ConsistencyDenoiser,
    boundary_scalings,
    karras_sigmas,
    noise_conditioning,
)
from .purifier import (
    CM_OPTION_DEFAULTS,
    SIGMA_SCHEDULES,
    ConsistencyPurifier,
    direct_sigma,
    refinement_sigmas,
    sigma_from_timestep,
)

__all__ = [
    "MODEL_CONFIG_DEFAULTS",
    "load_consistency_model",
    "CMAttentionBlock",
    "ConsistencyUNet",
    "build_network",
    "SIGMA_DATA",
    "SIGMA_MAX",
    "SIGMA_MIN",
    "ConsistencyDenoiser",
    "boundary_scalings",
    "karras_sigmas",
    "noise_conditioning",
    "CM_OPTION_DEFAULTS",
    "SIGMA_SCHEDULES",
    "ConsistencyPurifier",
    "direct_sigma",
    "refinement_sigmas",
    "sigma_from_timestep",
]
