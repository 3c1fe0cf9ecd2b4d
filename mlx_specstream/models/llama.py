"""Llama family: Llama, Mistral, SmolLM, TinyLlama; Qwen2 (q/k/v biases) and Qwen3 (q/k RMSNorm).

Hugging Face parameter names throughout, so conversion is a copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from .base import (
    BaseModelArgs, Context, RotaryCausalLM, RotaryTables, activation, attention, proj, qkv_projections,
    split_heads,
)
from .fused import projections


@dataclasses.dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    rope_parameters: Optional[dict[str, Any]] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        # transformers >= 5 moves rope_theta/scaling into rope_parameters.
        if self.rope_parameters:
            params = dict(self.rope_parameters)
            self.rope_theta = float(params.pop("rope_theta", self.rope_theta))
            if params.get("rope_type", "default") != "default" and self.rope_scaling is None:
                self.rope_scaling = params

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
        )
        self.scale = self.head_dim**-0.5
        h, bias = args.hidden_size, args.qkv_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=args.attention_bias)
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, ctx: Context, cache, rope: RotaryTables) -> mx.array:
        q, k, v = qkv_projections(self, x, ctx)
        q, k, v = split_heads(q, self.n_heads), split_heads(k, self.n_kv_heads), split_heads(v, self.n_kv_heads)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.apply(q, ctx.rope), rope.apply(k, ctx.rope)
        return proj(self.o_proj, attention(q, k, v, ctx, cache, self.scale), ctx)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, i, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = activation(args.hidden_act)

    def __call__(self, x: mx.array, ctx: Context) -> mx.array:
        gate, up = projections(self, "mlp", x, lambda layer, h: proj(layer, h, ctx))
        return proj(self.down_proj, self.act(gate) * up, ctx)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, rope: RotaryTables):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self._rope = rope  # shared tables, not a parameter

    def __call__(self, x: mx.array, ctx: Context, cache) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), ctx, cache, self._rope)
        return h + self.mlp(self.post_attention_layernorm(h), ctx)


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, rope: RotaryTables):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, rope) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(RotaryCausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self._rope = RotaryTables(args.head_dim, args.rope_theta, args.rope_scaling)
        self.model = LlamaModel(args, self._rope)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
