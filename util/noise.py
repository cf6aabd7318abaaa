"""Per-image randomness: image b of a batch draws from its own generator, on the CPU.

Drawing each image from its own generator makes its draws independent of the batch it is in and the same
on every device (the draws are moved to the device afterwards).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator]


def randn_per_image(shape: Sequence[int], generators: Sequence[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape` (B, ...), image b drawn on the CPU from generators[b].

    Drawing each image from its own generator makes its noise independent of the batch it is in and
    the same on every device.
    """
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} generators for batch {shape[0]}")
    draws = [torch.randn(tuple(shape[1:]), generator=g) for g in generators]
    return torch.stack(draws).to(device=device, dtype=dtype)


def draw_per_image(y: torch.Tensor, generator, draw: Callable[[torch.Tensor, torch.Generator], torch.Tensor]):
    """Apply `draw(y_cpu, generator)` to the whole batch, or to each image with its own generator."""
    y_cpu = y.detach().to("cpu")
    if isinstance(generator, torch.Generator):
        out = draw(y_cpu, generator)
    else:
        generators = list(generator)
        if len(generators) != y.shape[0]:
            raise ValueError(f"noise: got {len(generators)} generators for a batch of {y.shape[0]}; "
                             f"pass one torch.Generator per image (or a single one)")
        out = torch.cat([draw(y_cpu[b:b + 1], g) for b, g in enumerate(generators)])
    return out.to(device=y.device, dtype=y.dtype)
