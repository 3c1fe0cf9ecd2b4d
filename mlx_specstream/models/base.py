"""Pieces every model family shares: the forward context, rotary tables, attention.

A forward pass processes ``S`` new tokens per layer. Their keys/values are written into the
layer's cache at ``[offset, offset + S)`` and attention runs over the whole cache buffer with
an explicit boolean mask, so one code path serves prefill, autoregressive steps and tree steps
with speculative streams (whose keys/values land in scratch space and are never committed).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from . import fastmath
from .fused import projections


@dataclasses.dataclass
class BaseModelArgs:
    @classmethod
    def from_dict(cls, params: dict[str, Any]):
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in names})


@dataclasses.dataclass
class Context:
    """What every layer of one forward pass needs, built once per pass.

    positions: ``[S]`` int32 rotary positions of the new tokens.
    mask: ``[S, K]`` bool (True = may attend) over the ``K`` keys attention reads (the whole
        cache buffer, see :mod:`..cache`; the new tokens alone without a cache), or None when
        every query sees every key.
    n_main: how many of the S tokens are main-stream tokens (they come first); the rest
        are speculative-stream tokens, seen by stream-only adapters.
    stream_rows: ``[S, 1]`` 1.0 for stream tokens, 0.0 for main ones (None: no stream
        tokens); stream-only adapters scale their delta by it.
    rope: per-family rotary tables for ``positions`` (cos, sin), or None.
    """

    positions: mx.array
    mask: Optional[mx.array]
    n_main: int
    rope: Optional[tuple[mx.array, mx.array]] = None
    stream_rows: Optional[mx.array] = None


def proj(layer: nn.Module, x: mx.array, ctx: Context) -> mx.array:
    """Apply a linear layer; stream-only adapters also need to know where streams start."""
    if getattr(layer, "stream_only", False):
        return layer(x, ctx.stream_rows)
    return layer(x)


def qkv_projections(attn: nn.Module, x: mx.array, ctx: Context) -> Sequence[mx.array]:
    """q, k, v ``[B, S, H * D]`` of an attention module with ``q_proj``/``k_proj``/``v_proj``:
    one matmul when they are fused (:mod:`.fused`), three otherwise."""
    return projections(attn, "self_attn", x, lambda layer, h: proj(layer, h, ctx))


class RotaryTables:
    """Rotary embedding with per-token positions, Hugging Face (split-halves) layout.

    ``mx.fast.rope`` takes one offset per batch row, not one per token, so tree nodes
    gather their own cos/sin here. Covers rope_scaling types default, linear and llama3.
    """

    def __init__(self, dims: int, base: float, scaling: Optional[dict[str, Any]] = None):
        if dims % 2:
            raise ValueError(f"Rotary dimension must be even, got {dims}.")
        self.dims = dims
        inv_freq = 1.0 / (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))
        self.inv_freq = _scale_inv_freq(inv_freq, scaling)
        mx.eval(self.inv_freq)  # not lazy: generation may run on another thread (MLX streams are per-thread)

    def tables(self, positions: mx.array) -> tuple[mx.array, mx.array]:
        """positions ``[S]`` -> (cos, sin) each ``[S, dims]``."""
        freqs = positions.astype(mx.float32)[:, None] * self.inv_freq[None, :]
        emb = mx.concatenate([freqs, freqs], axis=-1)
        return mx.cos(emb), mx.sin(emb)

    def apply(self, x: mx.array, rope: tuple[mx.array, mx.array]) -> mx.array:
        """x ``[B, H, S, D]``; rotates the first ``dims`` features of each head."""
        cos, sin = rope
        cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
        d = self.dims
        xr, xp = (x[..., :d], x[..., d:]) if d < x.shape[-1] else (x, None)
        half = d // 2
        rotated = mx.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
        out = xr * cos + rotated * sin
        return out if xp is None else mx.concatenate([out, xp], axis=-1)


def _scale_inv_freq(inv_freq: mx.array, scaling: Optional[dict[str, Any]]) -> mx.array:
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = mx.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        return mx.where(mid, smoothed, out)
    raise ValueError(
        f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3). "
        "Remove rope_scaling from config.json only if the model was trained without it."
    )


class RotaryCausalLM(nn.Module):
    """What the rotary families share around their decoder ``self.model``.

    Subclasses set ``self.args``, ``self._rope`` (a :class:`RotaryTables`), ``self.model``
    (with ``embed_tokens``, ``layers`` and the final norm named by ``final_norm``) and, when
    embeddings are untied, ``self.lm_head``.
    """

    final_norm = "norm"

    @property
    def layers(self) -> list:
        return self.model.layers

    @property
    def max_positions(self):
        return None  # rotary positions have no hard limit

    def rope_tables(self, positions: mx.array):
        return self._rope.tables(positions)

    def embed(self, tokens: mx.array, positions: mx.array) -> mx.array:
        return self.model.embed_tokens(tokens)

    def head(self, h: mx.array) -> mx.array:
        h = getattr(self.model, self.final_norm)(h)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights


def attention(
    q: mx.array, k: mx.array, v: mx.array, ctx: Context, cache, scale: float
) -> mx.array:
    """q ``[B, Hq, S, D]``, k/v ``[B, Hkv, S, D]`` -> ``[B, S, Hq * D]``.

    Grouped-query attention (Hkv divides Hq) as in ``mx.fast.scaled_dot_product_attention``,
    which runs unless exps go through ``power`` (:mod:`.fastmath`).
    """
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
    out = fastmath.scaled_dot_product_attention(q, k, v, scale, ctx.mask)
    b, h, s, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def split_heads(x: mx.array, n_heads: int) -> mx.array:
    """``[B, S, H * D]`` -> ``[B, H, S, D]``."""
    b, s, _ = x.shape
    return x.reshape(b, s, n_heads, -1).transpose(0, 2, 1, 3)


ACTIVATIONS = {
    "silu": fastmath.silu,
    "gelu": nn.gelu,
    "gelu_new": fastmath.gelu_tanh,
    "gelu_pytorch_tanh": fastmath.gelu_tanh,
    "gelu_fast": fastmath.gelu_tanh,  # the same tanh formula, written differently
    "quick_gelu": fastmath.quick_gelu,
    "relu": nn.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"Unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]
