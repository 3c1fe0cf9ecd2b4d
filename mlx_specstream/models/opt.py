"""OPT (Hugging Face ``OPTForCausalLM``) in mlx-lm's model-file interface.

mlx-lm has no OPT, so this file supplies one in the same shape as mlx-lm's own model files
(``ModelArgs``, ``Model`` with ``layers``, ``sanitize`` and ``__call__(inputs, cache)``; each
decoder layer is called as ``layer(x, mask, cache)`` and attends through
``cache.update_and_fetch`` and mlx-lm's ``scaled_dot_product_attention``), so mlx-lm's
``generate_step`` / ``stream_generate`` and its ``KVCache`` run it unchanged. Parameter names
are Hugging Face's, so a checkpoint's weights load as they are.

Architecture: learned absolute position embeddings with OPT's offset of 2 (position ``p`` reads
row ``p + 2`` of ``embed_positions``), pre- or post-LayerNorm (``do_layer_norm_before``), the
configured activation (ReLU for every released OPT), biases (``enable_bias``), optional
``project_in`` / ``project_out`` when ``word_embed_proj_dim != hidden_size`` (opt-350m), an
optional final LayerNorm (absent for post-LN models and with ``_remove_final_layer_norm``), and
an LM head tied to the token embedding unless ``tie_word_embeddings`` is false.

Positions are added at the embedding only, never inside attention (there is no rotary module):
a token's position is fixed once it is embedded, and its keys/values in the cache carry it.
That is what lets Speculative Streaming's stream tokens inherit the main token's position
(DESIGN.md rule 4): the stream wrapper calls :meth:`Model.embed` with whatever absolute
positions it wants (several tokens may share one, and they need not be consecutive), drives
:attr:`Model.layers` itself, and finishes with :meth:`Model.head`. :meth:`Model.__call__` is
built from the same three pieces, so the plain and speculative paths cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask, scaled_dot_product_attention

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2

# Hugging Face ``activation_function`` names -> MLX functions computing the same formula.
ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,  # exact (erf)
    "gelu_new": nn.gelu_approx,  # tanh approximation
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_fast": nn.gelu_approx,  # the same tanh formula, written differently
    "quick_gelu": nn.gelu_fast_approx,  # x * sigmoid(1.702 x)
    "silu": nn.silu,
    "swish": nn.silu,
}


@dataclass
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
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"Unsupported activation_function {self.activation_function!r}; "
                f"supported: {sorted(ACTIVATIONS)}."
            )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, bias = args.hidden_size, args.enable_bias
        self.n_heads = args.num_attention_heads
        self.head_dim = dim // self.n_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def __call__(
        self,
        x: mx.array,
        mask: Optional[mx.array] = None,
        cache: Optional[Any] = None,
    ) -> mx.array:
        B, L, _ = x.shape
        queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)

        queries = queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = keys.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        values = values.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)

        # No rotary embedding: positions were added once, at the embedding.
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)

        output = scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=self.scale, mask=mask
        )
        output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.out_proj(output)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, affine = args.hidden_size, args.layer_norm_elementwise_affine
        self.do_layer_norm_before = args.do_layer_norm_before
        self.self_attn = Attention(args)
        self.self_attn_layer_norm = nn.LayerNorm(dim, affine=affine)
        self.fc1 = nn.Linear(dim, args.ffn_dim, bias=args.enable_bias)
        self.fc2 = nn.Linear(args.ffn_dim, dim, bias=args.enable_bias)
        self.final_layer_norm = nn.LayerNorm(dim, affine=affine)
        self.act = ACTIVATIONS[args.activation_function]

    def __call__(
        self,
        x: mx.array,
        mask: Optional[mx.array] = None,
        cache: Optional[Any] = None,
    ) -> mx.array:
        pre = self.do_layer_norm_before
        h = self.self_attn_layer_norm(x) if pre else x
        x = x + self.self_attn(h, mask, cache)
        if not pre:
            x = self.self_attn_layer_norm(x)

        h = self.final_layer_norm(x) if pre else x
        x = x + self.fc2(self.act(self.fc1(h)))
        return x if pre else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, proj_dim = args.hidden_size, args.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(args.vocab_size, proj_dim)
        self.embed_positions = nn.Embedding(args.max_position_embeddings + POSITION_OFFSET, dim)
        if proj_dim != dim:
            self.project_in = nn.Linear(proj_dim, dim, bias=False)
            self.project_out = nn.Linear(dim, proj_dim, bias=False)
        if args.do_layer_norm_before and not args._remove_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(dim, affine=args.layer_norm_elementwise_affine)
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
        """Number of usable positions (0 .. max_positions - 1) of the learned table."""
        return self.args.max_position_embeddings

    def embed(self, tokens: mx.array, positions: mx.array) -> mx.array:
        """Input hidden states ``[B, T, hidden]`` for ``tokens [B, T]`` at absolute ``positions``.

        ``positions`` is ``[T]`` (shared by the batch) or ``[B, T]`` of ints; it need not be
        consecutive, and several tokens may share a position (speculative stream tokens take
        their main token's). Position ``p`` reads row ``p + 2`` of the learned table.
        """
        dec = self.model.decoder
        x = dec.embed_tokens(tokens)
        if "project_in" in dec:
            x = dec.project_in(x)
        return x + dec.embed_positions(positions + POSITION_OFFSET)

    def head(self, h: mx.array) -> mx.array:
        """Logits ``[..., vocab]`` from the last decoder layer's hidden states."""
        dec = self.model.decoder
        if "final_layer_norm" in dec:
            h = dec.final_layer_norm(h)
        if "project_out" in dec:
            h = dec.project_out(h)
        if self.args.tie_word_embeddings:
            return dec.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def _positions(self, length: int, cache) -> mx.array:
        offset = cache[0].offset if cache is not None and cache[0] is not None else 0
        if isinstance(offset, mx.array) and offset.ndim > 0:
            # Batched cache (left padding gives negative offsets): [B, T] positions; padded
            # slots read the padding row, as Hugging Face's do, and are masked out anyway.
            return mx.maximum(offset[:, None] + mx.arange(length)[None], -1)
        offset = int(offset)
        if offset + length > self.max_positions:
            raise ValueError(
                f"OPT has {self.max_positions} learned positions; positions up to "
                f"{offset + length - 1} were requested."
            )
        return mx.arange(offset, offset + length)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = self.embed(inputs, self._positions(inputs.shape[1], cache))

        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])

        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.head(h)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        # Checkpoints saved from ``OPTModel`` (not ``OPTForCausalLM``) lack the ``model.`` prefix.
        weights = {
            (f"model.{k}" if k.startswith("decoder.") else k): v for k, v in weights.items()
        }
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights
