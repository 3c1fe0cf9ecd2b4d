"""torchrun / DDP plumbing: nothing home-made, just torch.distributed set up from the env.

Under ``torchrun`` (``WORLD_SIZE > 1``) the process group uses NCCL on GPUs and gloo on
CPU; rank 0 alone writes checkpoints and the output directory.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as tdist


@dataclasses.dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        use_cuda = torch.cuda.is_available()
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        here = not tdist.is_initialized()
        if here:
            tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
        return cls(rank, world, local_rank, local_world, device, here)

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum a dict of floats over ranks (same keys on every rank)."""
        if not self.enabled:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        tdist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's value of ``flag`` on every rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)])
        tdist.broadcast(t, 0)
        return bool(t.item())

    def close(self) -> None:
        if self.initialized_here and tdist.is_initialized():
            tdist.destroy_process_group()
