"""Training modes: which parameters train, and how the result is merged for saving.

* ``shared`` (the paper's): peft LoRA (``lora_rank > 0``) or full fine-tuning
  (``lora_rank == 0``) shared by main stream and streams, plus the extras. Saving merges
  LoRA into the base weights.
* ``lossless``: the HF model is frozen; stream embeddings, stream-only LoRA in the MSA
  layers (``lora_rank > 0``) and the pruning adapter train. The main stream is the base model.
* ``num_streams == 0`` in shared mode is plain fine-tuning, the quality baseline.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from mlx_specstream.config import SpecStreamConfig

from .backbone import DEFAULT_ATTENTION_TARGETS
from .model import SpecStreamLM


def prepare(hf: nn.Module, spec: SpecStreamConfig, *, lora_rank: int, lora_alpha: Optional[float],
            lora_targets: Optional[tuple[str, ...]], seed: int) -> tuple[SpecStreamLM, Optional[Any]]:
    """Wrap ``hf`` for training in ``spec.mode``; returns the model and the peft model (or None).

    Shared-mode LoRA targets default to the family's attention projections (q, k, v, o),
    the same linears stream-only LoRA targets in lossless mode.
    """
    peft_model = None
    if spec.mode == "lossless":
        hf.requires_grad_(False)
    elif lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora_rank, lora_alpha=float(lora_alpha or 2 * lora_rank), lora_dropout=0.0,
                         target_modules=list(lora_targets or DEFAULT_ATTENTION_TARGETS[hf.config.model_type]),
                         bias="none")
        peft_model = get_peft_model(hf, cfg)  # replaces the targeted linears inside ``hf`` in place
    else:
        hf.requires_grad_(True)
    model = SpecStreamLM(hf, spec, seed=seed)
    return model, peft_model


def merge_for_save(model: SpecStreamLM, peft_model: Optional[Any], *, dtype: Optional[torch.dtype] = None) -> None:
    """Fold peft LoRA into the base weights (in place), leaving plain HF modules; with ``dtype``
    cast the whole model to it (the base's dtype: float32 trainables go back to bfloat16 / float16)."""
    if peft_model is not None:
        peft_model.merge_and_unload()
    if dtype is not None:
        model.to(dtype=dtype)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
