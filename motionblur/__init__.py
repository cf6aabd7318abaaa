"""Seeded random motion-blur kernels (see `motionblur.motionblur`)."""
from motionblur.motionblur import motion_kernel

__all__ = ["motion_kernel"]
