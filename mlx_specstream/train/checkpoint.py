"""Resumable training checkpoints of the PyTorch trainer, written atomically
(:func:`mlx_specstream.train_common.files.atomic_directory`).

Resume checkpoints live in ``{checkpoint_dir}/step-{N:08d}/``: ``trainable.safetensors``
(every trainable parameter by its name in :class:`SpecStreamLM`), ``optimizer.pt``
(optimizer + scheduler state, RNG state) and ``state.json`` (step, fingerprint, metrics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlx_specstream.train_common.files import atomic_directory, checkpoint_path, keep_newest, write_state


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().contiguous().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(checkpoint_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], *, keep: int = 2, scaler: Any = None) -> Path:
    """Write ``step-{step}`` atomically, then delete all but the newest ``keep`` checkpoints.

    ``scaler`` (float16's loss scaler) is saved when enabled; RNG states cover CPU and CUDA.
    """
    from safetensors.torch import save_file

    final = checkpoint_path(checkpoint_dir, step)
    with atomic_directory(final, overwrite=True) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        blob = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.random.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            blob["cuda_rng"] = torch.cuda.get_rng_state_all()
        if scaler is not None and scaler.is_enabled():
            blob["scaler"] = scaler.state_dict()
        torch.save(blob, tmp / "optimizer.pt")
        write_state(tmp, state, step)
    keep_newest(checkpoint_dir, keep)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, *, scaler: Any = None) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its ``state.json``."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainable.safetensors"))
    own = {k for k, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != own:
        diff = sorted(set(tensors) ^ own)[:8]
        raise ValueError(f"Checkpoint {path} does not match this model's trainable parameters (e.g. {diff}); "
                         "resume with the same arguments it was trained with.")
    model.load_state_dict(tensors, strict=False)
    blob = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.random.set_rng_state(blob["rng"])
    if "cuda_rng" in blob and torch.cuda.is_available() and len(blob["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    if scaler is not None and "scaler" in blob:
        scaler.load_state_dict(blob["scaler"])
    return json.loads((path / "state.json").read_text())
