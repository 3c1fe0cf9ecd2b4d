"""How to drive an mlx-lm model's own modules: its embedding prologue, decoder layers, final
norm and head, each layer's attention window, and rotary positions per token.

The wrapper in :mod:`.streams` runs the layers itself (streams enter half-way up the stack),
so it needs the pieces of the family's ``__call__`` around the layer loop. They are found by
what the model has, never by its name:

* the decoder: the submodule that owns ``model.layers`` (``model.model`` in mlx-lm);
* the prologue: whatever the decoder's own ``__call__`` does to the token embeddings before
  its first layer, measured once by running it up to that layer (Gemma scales them by
  sqrt(hidden)); a family that does more than scale them cannot be driven this way;
* the final norm: the decoder's ``norm`` (or ``final_layernorm``, ``ln_f``, ...);
* the head: ``lm_head`` when the model has one, else the tied embedding; a
  ``final_logit_softcapping`` in the model's args caps the logits as the family does;
* windows: the cache ``make_cache()`` gives each layer (a ``RotatingKVCache(max_size=w)``
  marks a sliding-window layer; without ``make_cache``, layers marked ``use_sliding`` take the
  config's ``sliding_window``); layers whose cache holds recurrent state instead of keys and
  values cannot verify a tree;
* rotary positions: every attention's ``rope`` module is wrapped in :class:`TokenRoPE`, so tree
  nodes and streams each get their own position through the family's own RoPE variant.

A family written for this project (OPT, which mlx-lm lacks) defines ``embed(tokens,
positions)`` and ``head(h)`` itself; the wrapper uses those where they exist.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn

FINAL_NORMS = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")


@dataclasses.dataclass(frozen=True)
class TokenPositions:
    """Rotary positions, one per token: ``positions [L]`` for the ``L`` tokens of a pass.

    A cache view's ``offset`` is one of these during a tree step; :class:`TokenRoPE` lays the
    tokens along the batch axis so that ``mx.fast.rope`` takes one offset per token. An
    unwrapped RoPE module fails loudly on it rather than rotating every token alike.
    """

    positions: mx.array


class TokenRoPE(nn.Module):
    """A family's RoPE module that also takes :class:`TokenPositions` as its offset."""

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.rope = rope

    def __call__(self, x: mx.array, offset: Union[int, mx.array, TokenPositions] = 0, **kwargs) -> mx.array:
        if not isinstance(offset, TokenPositions):
            return self.rope(x, offset=offset, **kwargs)
        b, h, length, d = x.shape  # [B, H, L, D] -> [B * L, H, 1, D]: one position per batch row
        rows = x.transpose(0, 2, 1, 3).reshape(b * length, h, 1, d)
        pos = mx.broadcast_to(offset.positions, (b, length)).reshape(-1)
        out = self.rope(rows, offset=pos, **kwargs)
        return out.reshape(b, length, h, d).transpose(0, 2, 1, 3)


class _Reached(Exception):
    def __init__(self, hidden: mx.array):
        super().__init__("first layer reached")
        self.hidden = hidden


class _StopAtLayer(nn.Module):
    """Stands in for a decoder layer (its attributes read through, for loops that look at
    them) and stops the forward pass with the layer's input."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        object.__setattr__(self, "_layer", layer)

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "_layer"), name)

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any):
        raise _Reached(x)


class UnsupportedFamily(ValueError):
    """The model cannot be driven by the wrapper (a clear message says why)."""


class Family:
    """The pieces of one mlx-lm model that the stream wrapper drives (see the module doc).

    ``windows``: per layer, the attention window (None for full attention). ``plain_only``:
    None, or why the model cannot verify a draft tree (layers that keep recurrent state instead
    of keys and values); such a model decodes plainly through mlx-lm's own loop and caches.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = model.layers
        self.windows, blocker = _layer_windows(model)
        self.plain_only = (
            f"{getattr(model, 'model_type', type(model).__name__)}: {blocker}" if blocker else None
        )
        if self.plain_only:
            return  # nothing below is driven for it
        self.decoder = _decoder(model)
        self.own_embed = callable(getattr(model, "embed", None)) and callable(getattr(model, "head", None))
        self.norm = None if self.own_embed else _final_norm(self.decoder)
        args = getattr(model, "args", None)
        self.softcap = getattr(args, "final_logit_softcapping", None)
        self.embed_scale = None if self.own_embed else _embedding_scale(self)
        wrapped = _wrap_ropes(self.layers)
        self.rotary = wrapped > 0

    # -- the family's pieces -----------------------------------------------------------------
    def embed(self, tokens: mx.array, positions: Optional[mx.array]) -> mx.array:
        """``tokens [B, T]`` -> ``[B, T, h]``, the input of the first layer."""
        if self.own_embed:
            return self.model.embed(tokens, positions)
        h = self.decoder.embed_tokens(tokens)
        return h if self.embed_scale is None else h * self.embed_scale.astype(h.dtype)

    def head(self, h: mx.array) -> mx.array:
        """Final norm and LM head (the same for the main stream and the streams)."""
        if self.own_embed:
            return self.model.head(h)
        h = self.norm(h)
        if "lm_head" in self.model:
            out = self.model.lm_head(h)
        else:
            out = self.decoder.embed_tokens.as_linear(h)
        if self.softcap:
            out = mx.tanh(out / self.softcap) * self.softcap
        return out

    @property
    def max_positions(self) -> Optional[int]:
        """The model's context length: its learned position table's (OPT), else the config's
        ``max_position_embeddings`` (None when the config gives none)."""
        own = getattr(self.model, "max_positions", None)
        if own is not None:
            return own
        return getattr(getattr(self.model, "args", None), "max_position_embeddings", None)

    @property
    def model_dtype(self):
        return self.decoder.embed_tokens.weight.dtype if "embed_tokens" in self.decoder else mx.float32


def _decoder(model: nn.Module) -> nn.Module:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or not layers:
        raise UnsupportedFamily(f"{type(model).__name__} has no list of decoder layers (model.layers).")
    for _, module in model.named_modules():
        own = module.get("layers")  # model.layers may be a copy (mlx-lm's pipeline_layers slice)
        if isinstance(own, list) and len(own) == len(layers) and all(a is b for a, b in zip(own, layers)):
            return module
    raise UnsupportedFamily(f"The module that owns {type(model).__name__}.layers was not found.")


def _final_norm(decoder: nn.Module) -> nn.Module:
    for name in FINAL_NORMS:
        if name in decoder:
            return decoder[name]
    raise UnsupportedFamily(
        f"{type(decoder).__name__} has no final norm under any of the names {FINAL_NORMS}."
    )


def _layer_windows(model: nn.Module) -> tuple[tuple[Optional[int], ...], Optional[str]]:
    """Each layer's attention window and, where a layer cannot verify a tree, why not: from the
    caches ``make_cache()`` gives (``RotatingKVCache(max_size=w)``: window w), else, for a model
    without one that marks its sliding layers (``use_sliding`` / ``is_sliding``), the config's
    ``sliding_window`` (mlx-lm then windows those layers through their masks)."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    n = len(model.layers)
    if not hasattr(model, "make_cache"):
        window = getattr(getattr(model, "args", None), "sliding_window", None)
        marks = [bool(getattr(layer, "use_sliding", False) or getattr(layer, "is_sliding", False))
                 for layer in model.layers]
        return tuple(window if (mark and window) else None for mark in marks), None
    windows, blocker = [], None
    for i, c in enumerate(model.make_cache()):
        if isinstance(c, RotatingKVCache):
            windows.append(c.max_size)
        elif isinstance(c, KVCache):
            windows.append(None)
        else:
            windows.append(None)
            blocker = blocker or (
                f"layer {i} keeps a {type(c).__name__} (recurrent or chunked state), which cannot verify "
                "a draft tree in one pass"
            )
    if len(windows) != n:
        blocker = blocker or f"make_cache() gives {len(windows)} caches for {n} layers"
    return tuple(windows), blocker


def _embedding_scale(family: Family) -> Optional[mx.array]:
    """Run the decoder's own ``__call__`` up to its first layer and compare with the plain
    embedding: None when they are equal, else the constant factor the family applies."""
    decoder = family.decoder
    if "embed_tokens" not in decoder:
        raise UnsupportedFamily(f"{type(decoder).__name__} has no embed_tokens.")
    tokens = mx.array([[1, 2, 3, 4, 5]], dtype=mx.int32)
    n = len(family.layers)
    saved = decoder["layers"]
    decoder["layers"] = [_StopAtLayer(layer) for layer in saved]
    try:
        decoder(tokens, cache=[None] * n)
    except _Reached as reached:
        hidden = reached.hidden
    else:
        raise UnsupportedFamily(f"{type(decoder).__name__}'s forward pass never reached its first layer.")
    finally:
        decoder["layers"] = saved
    plain = decoder.embed_tokens(tokens)
    if hidden.shape != plain.shape:
        raise UnsupportedFamily(f"{type(decoder).__name__} changes the embeddings' shape before its layers.")
    if mx.array_equal(hidden, plain).item():
        return None
    hidden32, plain32 = hidden.astype(mx.float32), plain.astype(mx.float32)
    estimate = ((hidden32 * plain32).sum() / (plain32 * plain32).sum()).item()
    # the family may round its factor to its own precision (Gemma: bfloat16)
    for candidate in (estimate, *(mx.array(estimate, t).astype(mx.float32).item() for t in (mx.bfloat16, mx.float16))):
        scale = mx.array(candidate, mx.float32)
        if mx.array_equal(plain * scale.astype(plain.dtype), hidden).item():
            return scale
    if mx.allclose(plain32 * estimate, hidden32, rtol=1e-3, atol=1e-6).item():
        return mx.array(estimate, mx.float32)
    raise UnsupportedFamily(
        f"{type(decoder).__name__} transforms its token embeddings before the first layer in a way "
        "other than a constant scale; the stream wrapper cannot drive it."
    )


def _wrap_ropes(layers: list) -> int:
    """Wrap every attention's ``rope`` module in :class:`TokenRoPE` (once); returns how many."""
    count = 0
    for layer in layers:
        for _, module in layer.named_modules():
            rope = module.get("rope") if isinstance(module, nn.Module) else None
            if isinstance(rope, nn.Module) and not isinstance(rope, TokenRoPE) and not isinstance(module, TokenRoPE):
                module["rope"] = TokenRoPE(rope)
                count += 1
            elif isinstance(rope, TokenRoPE):
                count += 1
    return count
