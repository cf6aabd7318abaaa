"""DCDP in pixel space: the UNet, the diffusion schedule and samplers, the operators and the loop."""
from .solver import data_consistency

__all__ = ["data_consistency"]
