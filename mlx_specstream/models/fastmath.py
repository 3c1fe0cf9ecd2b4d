"""Exponentials for the attention softmax and the gated activations, fast on every back-end.

MLX's CPU back-end evaluates ``exp`` (and ``sigmoid``, ``tanh``, ``softmax``, which use it)
with its own polynomial, one element at a time, on hosts without its SIMD specialisations
(x86-64): ~23 ns per element on a 2-core x86 host, where ``power`` (libm's ``powf``) takes
~10 ns. Small models are dominated by these elementwise exps once a step carries more than a
few tokens (a draft tree plus its stream tokens), so on such hosts every exp here is
``2 ** (x * log2 e)``. The result agrees with ``mx.exp`` to a few float32 ulps (both scale
``x`` by log2 e in float32 first). Elsewhere (Apple silicon, CUDA) the native ops are used.

The choice is made when a function is traced and holds for the whole process (AR and
speculative steps alike, so both compute the same function); ``SPECSTREAM_POW_EXP=0`` or
``=1`` overrides the host check, for measurements.
"""

from __future__ import annotations

import math
import os
import platform
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

ENV = "SPECSTREAM_POW_EXP"
LOG2E = 1.4426950408889634
_GELU_C = math.sqrt(2.0 / math.pi)


_X86 = platform.machine().lower() in ("x86_64", "amd64")


def _host_wants_pow() -> bool:
    return _X86 and mx.default_device() == mx.cpu  # asked each time: the default device can change


def override() -> Optional[str]:
    """``"0"`` or ``"1"`` when ``SPECSTREAM_POW_EXP`` decides, else None (the host does)."""
    value = os.environ.get(ENV)
    return value if value in ("0", "1") else None


def pow_exp_enabled() -> bool:
    """True when exps are computed through ``power`` (see the module docstring)."""
    value = override()
    return value == "1" if value is not None else _host_wants_pow()


def _pow_exp(x: mx.array) -> mx.array:
    return mx.power(mx.array(2.0, x.dtype), x * LOG2E)


def exp(x: mx.array) -> mx.array:
    return _pow_exp(x) if pow_exp_enabled() else mx.exp(x)


def _sigmoid_denominator(z: mx.array) -> mx.array:
    """``1 + exp(-z)``, its exponent capped at 80 (sigmoid(-80) ~ 2e-35): never infinite, so
    ``x / (1 + exp(-z))`` and its gradient stay finite for very negative ``z``."""
    return 1.0 + _pow_exp(mx.minimum(-z, 80.0))


def sigmoid(x: mx.array) -> mx.array:
    if not pow_exp_enabled():
        return mx.sigmoid(x)
    return 1.0 / _sigmoid_denominator(x)


def silu(x: mx.array) -> mx.array:
    if not pow_exp_enabled():
        return nn.silu(x)
    return x / _sigmoid_denominator(x)


def gelu_tanh(x: mx.array) -> mx.array:
    """``0.5 x (1 + tanh(u)) = x sigmoid(2u)``, ``u = sqrt(2/pi) (x + 0.044715 x^3)``."""
    if not pow_exp_enabled():
        return nn.gelu_approx(x)
    return x / _sigmoid_denominator(2.0 * _GELU_C * (x + 0.044715 * x * x * x))


def quick_gelu(x: mx.array) -> mx.array:
    if not pow_exp_enabled():
        return nn.gelu_fast_approx(x)
    return x / _sigmoid_denominator(1.702 * x)


def _pow_softmax(x: mx.array, axis: int) -> mx.array:
    e = _pow_exp(x - mx.max(x, axis=axis, keepdims=True))
    return e / mx.sum(e, axis=axis, keepdims=True)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    return _pow_softmax(x, axis) if pow_exp_enabled() else mx.softmax(x, axis=axis)


def scaled_dot_product_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Optional[mx.array]
) -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` (bool ``mask`` ``[S, K]``, True = may attend),
    written out with :func:`softmax` when exps go through ``power``.

    q ``[B, Hq, S, D]``, k/v ``[B, Hkv, K, D]`` with Hkv dividing Hq -> ``[B, Hq, S, D]``.
    """
    if not pow_exp_enabled():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    b, hq, s, d = q.shape
    hkv, n_keys = k.shape[1], k.shape[2]
    rep = hq // hkv
    # the query heads of one key/value head, stacked along the rows: [B, Hkv, rep * S, D]
    scores = (q * scale).reshape(b, hkv, rep * s, d) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = scores.reshape(b, hkv, rep, s, n_keys)
        scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
        scores = scores.reshape(b, hkv, rep * s, n_keys)
    out = _pow_softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype) @ v
    return out.reshape(b, hq, s, v.shape[-1])
