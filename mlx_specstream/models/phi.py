"""Phi (phi-1, phi-1.5, phi-2): partial rotary, parallel attention + MLP, LayerNorm, biases."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from .base import (
    BaseModelArgs, Context, RotaryCausalLM, RotaryTables, activation, attention, proj, qkv_projections,
    split_heads,
)


@dataclasses.dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: Optional[int] = None
    partial_rotary_factor: float = 0.5
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    rope_parameters: Optional[dict[str, Any]] = None
    hidden_act: str = "gelu_new"
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.qk_layernorm:
            raise ValueError("Phi with qk_layernorm=true is not supported yet; no released Phi uses it.")
        if self.rope_parameters:
            params = dict(self.rope_parameters)
            self.rope_theta = float(params.pop("rope_theta", self.rope_theta))
            self.partial_rotary_factor = float(
                params.pop("partial_rotary_factor", self.partial_rotary_factor)
            )
            if params.get("rope_type", "default") != "default" and self.rope_scaling is None:
                self.rope_scaling = params

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        hd, h = args.head_dim, args.hidden_size
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(h, self.n_heads * hd, bias=True)
        self.k_proj = nn.Linear(h, self.n_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(h, self.n_kv_heads * hd, bias=True)
        self.dense = nn.Linear(self.n_heads * hd, h, bias=True)

    def __call__(self, x: mx.array, ctx: Context, cache, rope: RotaryTables) -> mx.array:
        q, k, v = qkv_projections(self, x, ctx)
        q, k, v = split_heads(q, self.n_heads), split_heads(k, self.n_kv_heads), split_heads(v, self.n_kv_heads)
        q, k = rope.apply(q, ctx.rope), rope.apply(k, ctx.rope)
        return proj(self.dense, attention(q, k, v, ctx, cache, self.scale), ctx)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.hidden_size, args.intermediate_size)
        self.fc2 = nn.Linear(args.intermediate_size, args.hidden_size)
        self.act = activation(args.hidden_act)

    def __call__(self, x: mx.array, ctx: Context) -> mx.array:
        return proj(self.fc2, self.act(proj(self.fc1, x, ctx)), ctx)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, rope: RotaryTables):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self._rope = rope

    def __call__(self, x: mx.array, ctx: Context, cache) -> mx.array:
        h = self.input_layernorm(x)
        return x + self.self_attn(h, ctx, cache, self._rope) + self.mlp(h, ctx)


class PhiModel(nn.Module):
    def __init__(self, args: ModelArgs, rope: RotaryTables):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, rope) for _ in range(args.num_hidden_layers)]
        self.final_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)


class Model(RotaryCausalLM):
    final_norm = "final_layernorm"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        rotary_dims = int(args.partial_rotary_factor * args.head_dim)
        self._rope = RotaryTables(rotary_dims, args.rope_theta, args.rope_scaling)
        self.model = PhiModel(args, self._rope)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=True)
