"""Mixed precision (``--dtype``): frozen weights in a low-precision dtype, trainables in float32.

* the base model loads in ``--dtype`` (float32, bfloat16 or float16): frozen weights stay
  there (lossless mode's base, the base under LoRA);
* every trainable parameter (LoRA, stream embeddings, adapters; all weights in full
  fine-tuning) is float32, so AdamW's state is float32 too;
* the forward runs under ``torch.autocast`` in ``--dtype``; logits go to float32 for the loss;
* float16 scales the loss (``torch.amp.GradScaler``) so small gradients do not flush to zero;
* the saved model directory casts back to the base's dtype.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """``--dtype`` name -> torch dtype (ValueError listing the choices otherwise)."""
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}.")
    return DTYPES[name]


def upcast_trainable(model: nn.Module) -> None:
    """Hold every trainable parameter in float32 (frozen ones keep their dtype)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """``torch.autocast`` in ``dtype`` on ``device`` (nothing for float32)."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def grad_scaler(device: torch.device, dtype: torch.dtype) -> "torch.amp.GradScaler":
    """A loss scaler, enabled for float16 only (bfloat16 has float32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
