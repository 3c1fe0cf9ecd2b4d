"""The teacher-forced multi-stream forward of training, in memory linear in the sequence length.

It runs the runtime's own pieces (:func:`~mlx_specstream.streams.run_layers`, the family's
embedding and head, :meth:`SpecStreamModel._insert_streams`, the ``stream_rows`` context of
stream-only LoRA), so training and decoding share one implementation of the stream semantics
(DESIGN.md rules 2-5), and it equals :meth:`SpecStreamModel.all_logits` without building its
``[S, S]`` mask (``S = T (1 + γ)``):

1. :func:`main_pass`: the main tokens go once through every layer with a key/value cache
   (:func:`~mlx_specstream.cache.make_cache`), as a prefill does, in pieces of
   ``prefill_chunk`` tokens. Kept: the main hidden state ``M`` at the streams' insertion
   point, each multi-stream (MSA) layer's main keys/values, the final main hidden state. In
   lossless mode all of it is frozen (the main stream is the base model's).
2. :func:`stream_chunk`: the streams of positions ``[a, b)`` (γ rows each, ``f(M[t]) + P[j]``)
   run through the MSA layers as new tokens, like a tree step's streams at inference: stream
   (t, j) attends to the main keys at positions <= t (and, in a sliding-window layer, within
   the window of its position t + j) and to streams (t, 1..j) of its own node; rotary position
   t + j. The nodes lie along the batch axis (``[B * n, γ]`` rows), each with the main keys
   followed by its own γ stream keys (:class:`StreamChunkCache`): a node's attention is
   ``γ x (b + γ)`` (main keys past t masked), and no work goes to pairs of nodes that never
   see each other (one row of all ``n γ`` streams would cost ``n γ x (b + n γ)``).
   Stream keys/values never enter the main cache. Chunks are independent given the frozen
   main pass, so the lossless trainer takes each chunk's gradient on its own and adds them up.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from mlx_specstream.cache import PassCache, make_cache, reserve_all
from mlx_specstream.streams import SpecStreamModel, run_layers, stream_rows


@dataclasses.dataclass
class MainPass:
    """Frozen main-stream states of a batch ``[B, T]``.

    ``inserted`` ``[B, T, h]``: M, the input of the first MSA layer; ``final`` ``[B, T, h]``:
    the last layer's output (before the final norm); ``keys`` / ``values``: per MSA layer
    (absolute index), ``[B, H_kv, T, D]`` main keys/values as that layer's attention stores them.
    """

    inserted: mx.array
    final: mx.array
    keys: dict[int, mx.array]
    values: dict[int, mx.array]

    @property
    def length(self) -> int:
        return self.inserted.shape[1]


def main_pass(model: SpecStreamModel, tokens: mx.array, prefill_chunk: int = 512, frozen: bool = True) -> MainPass:
    """Run ``tokens [B, T]`` through every layer (main stream only), keeping what the stream
    chunks need. ``frozen`` (lossless mode): evaluated piece by piece, no gradient flows
    through it; otherwise (shared mode) it stays a lazy graph to differentiate."""
    family = model.family
    b, t = tokens.shape
    n_layers, split = model.num_layers, model.msa_start
    cache = make_cache(n_layers)
    reserve_all(cache, t)
    inserted, final = [], []
    for a in range(0, t, prefill_chunk):
        e = min(t, a + prefill_chunk)
        n = e - a
        pos = mx.arange(a, e, dtype=mx.int32)
        local = mx.array(np.tril(np.ones((n, n), dtype=bool))) if n > 1 else None
        h = family.embed(tokens[:, a:e], pos)
        h = run_layers(family, h, range(split), cache, local, pos, True)
        inserted.append(h)
        h = run_layers(family, h, range(split, n_layers), cache, local, pos, True)
        final.append(h)
        for c in cache:
            c.commit(None, n)
        if frozen:
            mx.eval(inserted[-1], final[-1], *[c.state for c in cache[split:]])
    cat = (lambda xs: xs[0] if len(xs) == 1 else mx.concatenate(xs, axis=1))
    out = MainPass(
        inserted=cat(inserted),
        final=cat(final),
        keys={i: cache[i].keys[:, :, :t] for i in range(split, n_layers)},
        values={i: cache[i].values[:, :, :t] for i in range(split, n_layers)},
    )
    if not frozen:
        return out
    out = MainPass(
        inserted=mx.stop_gradient(out.inserted), final=mx.stop_gradient(out.final),
        keys={i: mx.stop_gradient(k) for i, k in out.keys.items()},
        values={i: mx.stop_gradient(v) for i, v in out.values.items()},
    )
    mx.eval(out.inserted, out.final, out.keys, out.values)
    return out


class StreamChunkCache:
    """One MSA layer's keys/values for a chunk of streams laid out node by node along the batch
    axis (``[B * n, γ]`` rows: node t of batch row i is batch entry ``i * n + (t - a)``): each
    node attends to the frozen main keys of positions ``[lo, b)`` (``lo`` > 0 only in a
    sliding-window layer) followed by its own γ stream keys, never stored.

    Per node, the attention is then ``γ x (b - lo + γ)``: no node sees another node's streams,
    so nothing is spent on the ``n γ x n γ`` block a single row of nodes would need.
    """

    def __init__(self, keys: mx.array, values: mx.array, layout: "ChunkLayout", window: Optional[int]):
        self.layout, self.window = layout, window
        self.lo = layout.key_start(window)
        self.main_keys, self.main_values = keys[:, :, self.lo: layout.b], values[:, :, self.lo: layout.b]
        self.offset = layout.b  # unused: the rows' rotary positions are passed per token

    def attention_mask(self, local, n: int, window: Optional[int] = None, positions=None) -> mx.array:
        """``[B * n, 1, γ, b - lo + γ]`` for the layers of ``window`` (True = may attend):
        stream (t, j) sees main positions ``lo <= p <= t`` (with a window, ``t + j - p < window``)
        and streams (t, 1..j)."""
        return self.layout.mask(window)

    def with_main(self, keys: mx.array, values: mx.array) -> "StreamChunkCache":
        """The same view over other main keys/values (already sliced to ``[lo, b)``)."""
        view = StreamChunkCache.__new__(StreamChunkCache)
        view.layout, view.window, view.lo, view.offset = self.layout, self.window, self.lo, self.offset
        view.main_keys, view.main_values = keys, values
        return view

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        return self._per_node(self.main_keys, k), self._per_node(self.main_values, v)

    def _per_node(self, main: mx.array, new: mx.array) -> mx.array:
        bsz, heads, length, dims = main.shape
        n = self.layout.b - self.layout.a
        main = mx.broadcast_to(main[:, None], (bsz, n, heads, length, dims)).reshape(bsz * n, heads, length, dims)
        return mx.concatenate([main, new], axis=2)


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """The streams of positions ``[a, b)`` of a batch of ``batch`` rows, node by node along the
    batch axis: rows ``[batch * n, γ]``, rotary ``positions`` (t + j) of the same shape."""

    a: int
    b: int
    num_streams: int
    batch: int

    @classmethod
    def of(cls, a: int, b: int, num_streams: int, batch: int = 1) -> "ChunkLayout":
        return cls(a, b, num_streams, batch)

    @property
    def positions(self) -> mx.array:
        g, n = self.num_streams, self.b - self.a
        pos = np.arange(self.a, self.b, dtype=np.int32)[:, None] + np.arange(1, g + 1, dtype=np.int32)
        return mx.array(np.broadcast_to(pos[None], (self.batch, n, g)).reshape(self.batch * n, g))

    def key_start(self, window: Optional[int]) -> int:
        """First main position any stream of the chunk sees in a layer of ``window``."""
        return 0 if window is None else max(0, self.a + 1 - window)

    def mask(self, window: Optional[int]) -> mx.array:
        g, n, lo = self.num_streams, self.b - self.a, self.key_start(window)
        t = np.arange(self.a, self.b)[:, None, None]  # [n, 1, 1]
        j = np.arange(1, g + 1)[None, :, None]  # [1, γ, 1]
        p = np.arange(lo, self.b)[None, None, :]  # [1, 1, b - lo]
        main = p <= t
        if window is not None:
            main = main & (t + j - p < window)
        main = np.broadcast_to(main, (n, g, self.b - lo))
        local = np.broadcast_to(np.tril(np.ones((g, g), dtype=bool)), (n, g, g))
        m = np.concatenate([main, local], axis=-1)[None]  # [1, n, γ, K]
        m = np.broadcast_to(m, (self.batch, n, g, m.shape[-1])).reshape(self.batch * n, 1, g, m.shape[-1])
        return mx.array(m)


class _Layers:
    """What :func:`run_layers` reads of a family (``windows``, ``layers``), with every layer
    run under :func:`mx.checkpoint` (recomputed in the backward pass instead of kept)."""

    def __init__(self, family, rows: mx.array):
        self.windows = family.windows
        self.layers = [_checkpointed(layer, rows) for layer in family.layers]


def _checkpointed(layer, rows: mx.array):
    def call(h, mask, pass_cache):
        view = pass_cache.cache

        def inner(params, h, main_keys, main_values):
            layer.update(params)
            # the recomputation runs outside the caller's context: set the stream rows again
            with stream_rows(rows):
                return layer(h, mask, PassCache(view.with_main(main_keys, main_values), pass_cache.offset))
        # the main keys/values are inputs, not captured constants: in shared mode they need gradients
        return mx.checkpoint(inner)(layer.trainable_parameters(), h, view.main_keys, view.main_values)
    return call


def stream_chunk(model: SpecStreamModel, inserted: mx.array, keys: dict[int, mx.array],
                 values: dict[int, mx.array], layout: ChunkLayout, grad_checkpoint: bool = False) -> mx.array:
    """Stream hidden states ``[B, b - a, γ, h]`` (before the final norm) of positions ``[a, b)``.

    ``inserted`` ``[B, b - a, h]``: M of those positions; ``keys`` / ``values``: per MSA layer,
    the main keys/values of positions ``[0, b)`` at least (:class:`MainPass`)."""
    g, n_layers, split = model.num_streams, model.num_layers, model.msa_start
    bsz, n = inserted.shape[0], layout.b - layout.a
    assert layout.batch == bsz and layout.num_streams == g
    x = model._insert_streams(inserted, np.arange(n), g).reshape(bsz * n, g, -1)  # nodes along the batch axis
    windows = model.family.windows
    view = {i: StreamChunkCache(keys[i], values[i], layout, windows[i]) for i in range(split, n_layers)}
    # run_layers reads masks from cache[0] and layer i's keys from cache[i]
    caches: Sequence = [view[split]] * split + [view[i] for i in range(split, n_layers)]
    rows = mx.ones((g, 1), dtype=mx.float32)
    family = _Layers(model.family, rows) if grad_checkpoint else model.family
    with stream_rows(rows):
        x = run_layers(family, x, range(split, n_layers), caches, None, layout.positions, False)
    return x.reshape(bsz, n, g, -1)


def chunk_bounds(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut into pieces of at most ``chunk`` positions."""
    return [(a, min(end, a + chunk)) for a in range(start, end, chunk)]


def chunked_logits(model: SpecStreamModel, tokens: mx.array, chunk: int = 64, prefill_chunk: int = 512,
                   grad_checkpoint: bool = False) -> tuple[mx.array, mx.array, Optional[mx.array]]:
    """Main ``[B, T, V]``, stream ``[B, T, γ, V]`` and pruning logits (or None), as
    :meth:`SpecStreamModel.all_logits` gives them, through the chunked pass (for checks:
    this materialises every logit)."""
    main = main_pass(model, tokens, prefill_chunk)
    t, g = main.length, model.num_streams
    bsz = tokens.shape[0]
    parts = [stream_chunk(model, main.inserted[:, a:b], main.keys, main.values, ChunkLayout.of(a, b, g, bsz),
                          grad_checkpoint)
             for a, b in chunk_bounds(0, t, chunk)]
    streams = mx.concatenate(parts, axis=1)
    prune = model.pruning_logits(main.inserted) if model.has_pruning else None
    return model.head(main.final), model.stream_logits(streams), prune
