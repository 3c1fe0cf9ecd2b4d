"""OPT: learned absolute positions (offset 2), pre/post LayerNorm, ReLU, optional project_in/out.

Positions are added at the embedding layer only, so speculative streams inherit the
main token's position (DESIGN.md rule 4).
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelArgs, Context, activation, attention, proj, qkv_projections, split_heads

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2


@dataclasses.dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    ffn_dim: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int = 0
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if not self.word_embed_proj_dim:
            self.word_embed_proj_dim = self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads.")


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, bias = args.hidden_size, args.enable_bias
        self.n_heads = args.num_attention_heads
        self.scale = (h // self.n_heads) ** -0.5
        self.q_proj = nn.Linear(h, h, bias=bias)
        self.k_proj = nn.Linear(h, h, bias=bias)
        self.v_proj = nn.Linear(h, h, bias=bias)
        self.out_proj = nn.Linear(h, h, bias=bias)

    def __call__(self, x: mx.array, ctx: Context, cache) -> mx.array:
        q, k, v = (split_heads(t, self.n_heads) for t in qkv_projections(self, x, ctx))
        return proj(self.out_proj, attention(q, k, v, ctx, cache, self.scale), ctx)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, affine = args.hidden_size, args.layer_norm_elementwise_affine
        self.pre_norm = args.do_layer_norm_before
        self.self_attn = Attention(args)
        self.self_attn_layer_norm = nn.LayerNorm(h, affine=affine)
        self.fc1 = nn.Linear(h, args.ffn_dim, bias=args.enable_bias)
        self.fc2 = nn.Linear(args.ffn_dim, h, bias=args.enable_bias)
        self.final_layer_norm = nn.LayerNorm(h, affine=affine)
        self.act = activation(args.activation_function)

    def __call__(self, x: mx.array, ctx: Context, cache) -> mx.array:
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self.self_attn(h, ctx, cache)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + proj(self.fc2, self.act(proj(self.fc1, h, ctx)), ctx)
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, proj_dim = args.hidden_size, args.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(args.vocab_size, proj_dim)
        self.embed_positions = nn.Embedding(args.max_position_embeddings + POSITION_OFFSET, h)
        if proj_dim != h:
            self.project_in = nn.Linear(proj_dim, h, bias=False)
            self.project_out = nn.Linear(h, proj_dim, bias=False)
        if args.do_layer_norm_before and not args._remove_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(h, affine=args.layer_norm_elementwise_affine)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]


class OPTModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.decoder = OPTDecoder(args)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = OPTModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.word_embed_proj_dim, args.vocab_size, bias=False)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.decoder.layers

    @property
    def max_positions(self) -> int:
        """Learned positions end here; rotary families have no hard limit."""
        return self.args.max_position_embeddings

    def rope_tables(self, positions: mx.array):
        return None

    def embed(self, tokens: mx.array, positions: mx.array) -> mx.array:
        dec = self.model.decoder
        x = dec.embed_tokens(tokens)
        if "project_in" in dec:
            x = dec.project_in(x)
        return x + dec.embed_positions(positions + POSITION_OFFSET)

    def head(self, h: mx.array) -> mx.array:
        dec = self.model.decoder
        if "final_layer_norm" in dec:
            h = dec.final_layer_norm(h)
        if "project_out" in dec:
            h = dec.project_out(h)
        if self.args.tie_word_embeddings:
            return dec.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
        return weights
