"""Uniform access to the pieces of a Hugging Face causal LM that Speculative Streaming reuses.

No model code is forked: :class:`Backbone` only finds the embedding, decoder layers, rotary
table, final norm and LM head of a loaded ``transformers`` model, so :mod:`.model` can run
the decoder layers itself with its own masks and positions.

Families (``config.model_type``): llama, mistral, qwen2, qwen3, phi (rotary, possibly
partial) and opt (learned absolute positions with Hugging Face's offset of 2, optional
``project_in``/``project_out``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

ROTARY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi")
SUPPORTED_MODEL_TYPES = ROTARY_FAMILIES + ("opt",)

# Linear layers inside one decoder layer that stream-only LoRA targets by default.
DEFAULT_ATTENTION_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
}


def check_model_type(model_type: Optional[str]) -> str:
    """Return ``model_type`` if supported, else raise a ValueError that lists the families."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Unsupported model_type {model_type!r}. Speculative Streaming training supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return model_type


def _sliding_window(config: Any) -> Optional[int]:
    """The attention window of windowed layers, or None if every layer attends globally.

    Qwen2/Qwen3 set ``sliding_window`` to None unless ``use_sliding_window``; Mistral keeps it.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


class Backbone:
    """References into a loaded HF causal LM (``hf``), plus the few family-specific calls.

    Holds no parameters of its own (it is not an ``nn.Module``), so the owner registers
    ``hf`` once. Works on a peft-wrapped model too (peft replaces linears in place).
    """

    def __init__(self, hf: nn.Module):
        config = hf.config
        self.family = check_model_type(getattr(config, "model_type", None))
        self.config = config
        self.hf = hf
        inner = hf.model.decoder if self.family == "opt" else hf.model
        self.inner = inner
        self.layers: nn.ModuleList = inner.layers
        self.num_layers = len(self.layers)
        self.hidden_size = int(config.hidden_size)
        self.lm_head: nn.Module = hf.lm_head
        if self.family == "opt":
            self.final_norm = inner.final_layer_norm
            self.project_out = inner.project_out
            self.rotary = None
        else:
            self.final_norm = inner.final_layernorm if self.family == "phi" else inner.norm
            self.project_out = None
            self.rotary = inner.rotary_emb
        self.sliding_window = _sliding_window(config)

    @property
    def attn_implementation(self) -> str:
        return getattr(self.config, "_attn_implementation", None) or "eager"

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` and positions ``[B, T]`` -> input of layer 0, ``[B, T, h]``."""
        inner = self.inner
        x = inner.embed_tokens(input_ids)
        if self.family == "opt":
            if inner.project_in is not None:
                x = inner.project_in(x)
            # Learned positions enter here only; streams inherit their main token's.
            x = x + inner.embed_positions(None, 0, position_ids=positions)
        elif self.family == "phi":
            x = inner.embed_dropout(x)
        return x

    def position_embeddings(self, x: torch.Tensor, positions: torch.Tensor) -> Optional[tuple]:
        """Rotary ``(cos, sin)`` for ``positions`` ``[B, L]`` (None for OPT)."""
        if self.rotary is None:
            return None
        return self.rotary(x, position_ids=positions)

    def attention_mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Boolean ``[B, 1, L, L]`` (True = may attend) in the form the attention backend wants."""
        if self.attn_implementation == "sdpa":
            return allowed
        # eager attention adds the mask to the scores
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    def run_layer(self, layer: nn.Module, x: torch.Tensor, mask: torch.Tensor,
                  pos_emb: Optional[tuple], positions: torch.Tensor) -> torch.Tensor:
        """One HF decoder layer on ``x`` ``[B, L, h]`` with our mask and positions."""
        if pos_emb is None:
            out = layer(x, attention_mask=mask, position_ids=positions)
        else:
            out = layer(x, attention_mask=mask, position_embeddings=pos_emb, position_ids=positions)
        return out[0] if isinstance(out, tuple) else out

    def head_modules(self) -> list[nn.Module]:
        """Final norm, OPT project_out, LM head: whichever exist, in order."""
        return [m for m in (self.final_norm, self.project_out, self.lm_head) if m is not None]

    def head(self, x: torch.Tensor, *, detach_weights: bool = False) -> torch.Tensor:
        """Hidden states ``[..., h]`` -> logits ``[..., V]`` (final norm, project_out, LM head).

        ``detach_weights`` runs the same modules with detached parameters, so a loss on the
        output trains only what produced ``x`` (used by the pruning adapter).
        """
        for m in self.head_modules():
            if detach_weights:
                params = {k: v.detach() for k, v in m.named_parameters()}
                x = torch.func.functional_call(m, params, (x,))
            else:
                x = m(x)
        return x
