"""Multi-stream attention without an ``[L, L]`` tensor (``L = T(1 + γ)``), for training.

The MSA layers run Hugging Face's own decoder layers on ``T`` main rows followed by ``n·γ``
stream rows (node-major, :mod:`.layout`); only the attention inside them is replaced, by
:func:`msa_attention_forward`, registered with transformers as ``"specstream_msa"`` and
selected by :func:`msa_layers` while the MSA layers run. It splits the rows:

* **main rows** attend to main keys exactly as transformers computes them (its own ``sdpa`` or
  ``eager`` function, with the lower layers' mask), so the main stream matches HF's logits;
* **stream j** (queries ``(t, j)`` for the ``n`` nodes ``t >= start``) is ordinary causal
  attention over the ``T`` main keys -- stream (t, j) sees main positions ``<= t`` (within
  the layer's window relative to its rotary position ``t + j``, as :func:`.backbone.window_mask`)
  -- plus the γ x γ within-node block: keys ``(t, 1..j)``.

The two parts merge by their log-sum-exps inside one fused ``scaled_dot_product_attention``
call per stream: the j within-node scores ``s_i = q_(t,j) . k_(t,i) * scale`` (computed
apart, ``[B, H, n, γ, γ]``) enter as j extra key "slots" in front of the main keys. Slot
i's key is nonzero only in an extra head dimension, where the query holds ``s_i`` (divided by
that key entry and the scale); its value is a unit vector in another extra dimension, so the kernel's single softmax over
``[slots, main keys]`` returns the main part's output plus each slot's weight ``a_i``, and
the stream's output is ``out[:D] + sum_i a_i v_(t,i)``. With the slots first, "main keys
``<= t``" is the lower-right causal pattern (:func:`lower_right_causal_attention`): no mask
at all when the batch is only right-padded and the layer has no window, so flash /
memory-efficient kernels apply; otherwise a boolean ``[B, 1, n, j + T]`` mask (the size of an
ordinary padded fine-tune's mask).

Worked example, T = 3, γ = 2, stream j = 2 (keys: slots 2, 1, then main 0..2)::

              slot2 slot1  m0 m1 m2
    (0, 2)      1     1     1  .  .
    (1, 2)      1     1     1  1  .
    (2, 2)      1     1     1  1  1        <- lower-right causal, Lq = 3, Lk = 5
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

IMPLEMENTATION = "specstream_msa"


@dataclasses.dataclass
class MSAPlan:
    """What the MSA attention needs besides q, k, v; passed to HF layers as their ``attention_mask``.

    ``valid`` ``[B, T]`` and ``positions`` ``[B, T]`` describe the main tokens; streams exist for
    nodes ``start..T-1``. ``main_masks`` maps a layer window (None = global) to the backend mask
    of the main rows (None: sdpa's own causal path). ``causal_only``: padding, if any, is only on
    the right, so causality alone hides it from every valid query. ``max_position`` is
    ``positions.max()``. ``window`` is the current layer's (set by :meth:`for_layer`).
    """

    n_main: int
    num_streams: int
    start: int
    valid: torch.Tensor
    positions: torch.Tensor
    main_masks: dict
    base_implementation: str
    causal_only: bool
    max_position: int
    window: Optional[int] = None

    @property
    def n_nodes(self) -> int:
        return self.n_main - self.start

    def for_layer(self, window: Optional[int]) -> "MSAPlan":
        return dataclasses.replace(self, window=window)

    def stream_mask(self, j: int) -> Optional[torch.Tensor]:
        """Boolean ``[B, 1, n, j + T]`` for stream j (slots first), or None when the lower-right
        causal pattern is the whole rule (no left padding, no window that binds)."""
        window = self.window
        if window is not None and self.max_position + j < window:
            window = None  # no query reaches as far as the window
        if self.causal_only and window is None:
            return None
        T, dev = self.n_main, self.valid.device
        t = torch.arange(self.start, T, device=dev)
        main = (torch.arange(T, device=dev)[None, :] <= t[:, None])[None] & self.valid[:, None, :]  # [B, n, T]
        if window is not None:
            q_pos = self.positions[:, self.start:] + j  # stream (t, j) sits at position t + j
            main = main & ((q_pos[:, :, None] - self.positions[:, None, :]) < window)
        slots = torch.ones(main.shape[0], self.n_nodes, j, dtype=torch.bool, device=dev)
        return torch.cat([slots, main], -1)[:, None]


def is_right_padded(valid: torch.Tensor) -> bool:
    """True if no valid token follows a padding token in any row of ``valid`` ``[B, T]``."""
    return not bool((valid[:, 1:] & ~valid[:, :-1]).any())


def _base_attention(module: nn.Module, implementation: str) -> Callable:
    """transformers' attention function for ``implementation`` (the family's own eager one)."""
    if implementation == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[implementation]


def _repeat_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, Hkv, L, D]`` -> ``[B, Hkv * n_rep, L, D]`` (GQA keys/values per query head)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def lower_right_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout: float = 0.0,
                                 scale: Optional[float] = None, use_bias: Optional[bool] = None) -> torch.Tensor:
    """``scaled_dot_product_attention`` where query ``i`` of ``n`` sees keys ``<= i + S - n`` of ``S``.

    On CUDA (``use_bias`` None) PyTorch's ``causal_lower_right`` bias reaches the flash and
    memory-efficient kernels with no mask. Elsewhere it would be materialized as an ``[n, S]``
    mask (and saved for backward in every layer), so instead ``S - n`` zero queries go in front:
    the pattern becomes the square causal one, which sdpa runs without a mask; their rows are
    dropped. ``q`` ``[B, H, n, D]``, ``k``/``v`` ``[B, H, S, D]``; returns ``[B, H, n, D]``.
    """
    n, S = q.shape[2], k.shape[2]
    if use_bias is None:
        use_bias = q.device.type == "cuda"
    if use_bias:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, S), dropout_p=dropout,
                                              scale=scale)
    front = q.new_zeros(*q.shape[:2], S - n, q.shape[3])
    out = F.scaled_dot_product_attention(torch.cat([front, q], 2), k, v, is_causal=True, dropout_p=dropout,
                                         scale=scale)
    return out[:, :, S - n:]


def stream_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: MSAPlan, *,
                     scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """Attention of the stream rows (module docstring).

    ``q`` ``[B, H, n·γ, D]`` stream queries (node-major); ``key``/``value`` ``[B, Hkv, T + n·γ, D]``
    (main rows first). Returns ``[B, n·γ, H, D]``, the layout HF attention functions return.
    """
    B, H, _, D = q.shape
    T, g, n = plan.n_main, plan.num_streams, plan.n_nodes
    if n == 0:  # no position has a stream target
        return q.new_zeros(B, 0, H, D)
    dt, dev = q.dtype, q.device
    k = _repeat_heads(key, H // key.shape[1]).to(dt)
    v = _repeat_heads(value, H // value.shape[1]).to(dt)
    qs = q.unflatten(2, (n, g))  # [B, H, n, γ, D]
    ks = k[:, :, T:].unflatten(2, (n, g))
    vs = v[:, :, T:].unflatten(2, (n, g))
    with torch.autocast(device_type=dev.type, enabled=False):
        # The γ x γ within-node scores, in float32 (small: [B, H, n, γ, γ]).
        node = torch.matmul(qs.float(), ks.float().transpose(-1, -2)) * scaling
    # Extra head dims: 2 per slot in the query/key (the score as hi + lo parts, so a half-precision
    # query carries it to ~float32 accuracy; the kernel sums both), 1 per slot in the value.
    # Slot keys hold c = scaling^-1/2 (rounded to the dtype) and the query s / (scaling c), so the
    # kernel's (q . k) * scaling is s while the query entries stay near the scores' magnitude.
    extra = 2 * g
    Dp = -(-(D + extra) // 8) * 8  # fused kernels want head dims in multiples of 8
    c = float(torch.tensor(scaling ** -0.5, dtype=dt))
    slot_k = torch.zeros(g, Dp, dtype=dt, device=dev)
    slot_v = torch.zeros(g, Dp, dtype=dt, device=dev)
    for i in range(g):  # key row g-1-i is slot i+1, so keys[g-j:] are slots j..1
        slot_k[g - 1 - i, D + 2 * i: D + 2 * i + 2] = c
        slot_v[g - 1 - i, D + i] = 1
    keys = torch.cat([slot_k.expand(B, H, g, Dp), F.pad(k[:, :, :T], (0, Dp - D))], 2)
    vals = torch.cat([slot_v.expand(B, H, g, Dp), F.pad(v[:, :, :T], (0, Dp - D))], 2)
    outs = []
    for j in range(1, g + 1):
        s = node[:, :, :, j - 1, :j] / (scaling * c)  # the kernel multiplies by c * scaling again
        hi = s.to(dt)
        lo = (s - hi.float()).to(dt)
        aug = torch.stack([hi, lo], -1).flatten(-2)  # [B, H, n, 2j]: slot i at dims D+2(i-1), D+2(i-1)+1
        qj = torch.cat([qs[:, :, :, j - 1], aug, qs.new_zeros(B, H, n, Dp - D - 2 * j)], -1)
        mask = plan.stream_mask(j)
        kj, vj = keys[:, :, g - j:], vals[:, :, g - j:]
        if mask is None:
            o = lower_right_causal_attention(qj, kj, vj, dropout=dropout, scale=scaling)
        else:
            o = F.scaled_dot_product_attention(qj, kj, vj, attn_mask=mask, dropout_p=dropout, scale=scaling)
        weights = o[..., D: D + j]  # [B, H, n, j]: softmax weight of slots 1..j
        outs.append(o[..., :D] + torch.matmul(weights.unsqueeze(-2), vs[:, :, :, :j]).squeeze(-2))
    out = torch.stack(outs, 3).flatten(2, 3)  # [B, H, n·γ, D], node-major
    return out.transpose(1, 2).contiguous()


def msa_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Any, dropout: float = 0.0, scaling: Optional[float] = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface for the MSA layers; ``attention_mask`` is an :class:`MSAPlan`.

    ``query`` ``[B, H, L, D]``, ``key``/``value`` ``[B, Hkv, L, D]`` after the layer's norms and
    rotary embedding. Returns ``([B, L, H, D], None)``.
    """
    plan = attention_mask
    if not isinstance(plan, MSAPlan):
        raise TypeError("specstream_msa attention runs only inside SpecStreamLM's MSA layers.")
    if kwargs.get("softcap") is not None:
        raise ValueError("Attention-logit soft-capping is not supported by Speculative Streaming training.")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    T = plan.n_main
    base = _base_attention(module, plan.base_implementation)
    main, _ = base(module, query[:, :, :T], key[:, :, :T], value[:, :, :T], plan.main_masks[plan.window],
                   dropout=dropout, scaling=scaling, **kwargs)
    streams = stream_attention(query[:, :, T:], key, value, plan, scaling=scaling, dropout=dropout)
    return torch.cat([main, streams.to(main.dtype)], 1), None


def _register() -> None:
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, msa_attention_forward)


_register()


@contextlib.contextmanager
def msa_layers(config: Any) -> Iterator[None]:
    """Route the attention of layers called inside the block to :func:`msa_attention_forward`."""
    previous = config._attn_implementation
    config._attn_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = previous
