"""Atomic directories, resumable training checkpoints and the final model directory.

A directory is written under a hidden temporary name and renamed into place only when
complete, so an interrupted run (Ctrl-C, crash) never leaves a half-written checkpoint or
output: the last complete one stays intact.

Resume checkpoints live in ``{checkpoint_dir}/step-{N:08d}/``: ``trainable.safetensors``
(every trainable parameter by its name in :class:`SpecStreamLM`), ``optimizer.pt``
(optimizer + scheduler state, RNG state) and ``state.json`` (step, fingerprint, metrics).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

CHECKPOINT_PREFIX = "step-"


@contextlib.contextmanager
def atomic_directory(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``final`` when the block succeeds.

    An existing ``final`` is replaced only with ``overwrite``; on any exception (including
    KeyboardInterrupt) the temporary directory is removed and ``final`` is untouched.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite=True (--overwrite) to replace it.")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().contiguous().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(checkpoint_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], *, keep: int = 2, scaler: Any = None) -> Path:
    """Write ``step-{step}`` atomically, then delete all but the newest ``keep`` checkpoints.

    ``scaler`` (float16's loss scaler) is saved when enabled; RNG states cover CPU and CUDA.
    """
    from safetensors.torch import save_file

    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    with atomic_directory(final, overwrite=True) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        blob = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.random.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            blob["cuda_rng"] = torch.cuda.get_rng_state_all()
        if scaler is not None and scaler.is_enabled():
            blob["scaler"] = scaler.state_dict()
        torch.save(blob, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=2, sort_keys=True) + "\n")
    for old in list_checkpoints(checkpoint_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
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


def latest_checkpoint(checkpoint_dir: Path) -> Optional[Path]:
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None
