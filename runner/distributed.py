"""torchrun: the ranks of one run, sharing its images and its run folder."""
from __future__ import annotations

import os

import torch

from util.errors import DCDPError, RunFolderError


class Distributed:
    """torchrun support: rank r restores images i with i % world == r; rank 0 merges the summaries."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world > 1
        # the ranks of one torchrun share their run's folder lock
        self.run_id = (os.environ.get("TORCHELASTIC_RUN_ID")
                       or f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}") if self.active else None
        if self.active:
            import torch.distributed as dist

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def shard(self, indices: list[int]) -> list[int]:
        return [i for i in indices if i % self.world == self.rank]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, step):
        """Run `step()` on every rank; if it raises a user error on any rank, every rank raises it."""
        error, value = None, None
        try:
            value = step()
        except DCDPError as exc:
            error = exc
        if self.active:
            import torch.distributed as dist

            errors = [None] * self.world
            dist.all_gather_object(errors, None if error is None else str(error))
            first = next((e for e in errors if e is not None), None)
            if first is not None and error is None:
                if value is not None and hasattr(value, "release"):
                    value.release()
                raise RunFolderError(first)
        if error is not None:
            raise error
        return value

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.destroy_process_group()
