"""Where training runs: the device (``--device``) and torchrun / DDP plumbing.

One process trains on the device :func:`resolve_device` picks (``auto``: CUDA, then MPS,
then CPU). Under ``torchrun`` (``WORLD_SIZE > 1``) each rank takes GPU ``LOCAL_RANK`` and
the process group uses NCCL (CUDA) or gloo (CPU); rank 0 alone writes checkpoints and the
output directory.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as tdist

from mlx_specstream.train_common.options import DEVICES


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """``--device`` -> a torch device type (``cuda``, ``mps`` or ``cpu``; no index).

    ``auto`` picks CUDA, then MPS, then CPU. Naming a device PyTorch cannot use raises a
    ValueError that says so and what to pass instead.
    """
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}.")
    cuda, mps = torch.cuda.is_available(), _mps_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name == "cuda" and not cuda:
        raise ValueError("--device cuda: PyTorch sees no CUDA device (torch.cuda.is_available() is False). "
                         "Install a CUDA build of PyTorch on a machine with an NVIDIA GPU, or pass --device auto "
                         "or --device cpu.")
    if name == "mps" and not mps:
        raise ValueError("--device mps: PyTorch's MPS back-end is not available (needs Apple silicon and macOS 12.3+). "
                         "Pass --device auto or --device cpu.")
    return torch.device(name)


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
    def from_env(cls, device: str = "auto") -> "DistContext":
        """One process on ``resolve_device(device)``, or a torchrun rank (``WORLD_SIZE > 1``)."""
        kind = resolve_device(device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=torch.device("cuda", torch.cuda.current_device()) if kind.type == "cuda" else kind)
        if kind.type == "mps":
            raise ValueError("torchrun with --device mps is not supported (one MPS device per machine); "
                             "train in one process, or pass --device cpu.")
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        use_cuda = kind.type == "cuda"
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
        # NCCL reduces device tensors only; gloo takes CPU ones (self.device is the CPU there).
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's value of ``flag`` on every rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        tdist.broadcast(t, 0)
        return bool(t.item())

    def close(self) -> None:
        if self.initialized_here and tdist.is_initialized():
            tdist.destroy_process_group()
