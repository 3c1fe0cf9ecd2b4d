"""A key/value cache read whole through a mask, that commits an accepted tree path by
gathering it into place.

Each step writes the keys/values of all its new tokens (tree nodes, then stream tokens) at
``[offset, offset + S)``. Attention always reads the **whole buffer** through a mask that
shows the committed prefix ``[0, offset)`` plus the step's own tokens as its local mask
allows: shapes depend on the buffer's size, not on ``offset``, so a decoding step traces once
per buffer size and runs as one compiled graph (:mod:`.compiled`), with ``offset`` a device
scalar. The buffer grows in steps of ``QUANTUM`` tokens, just ahead of what the next step
needs: every key read costs an exp in the softmax, so keys far past the offset would cost
time, and a few sizes serve every prompt length (one trace each).
Nothing is committed until the generator knows which nodes were accepted: ``commit(path)``
gathers their entries to ``[offset, offset + len(path))`` and advances ``offset``. Rejected
nodes and stream tokens stay behind as garbage, hidden by the mask and overwritten by the
next step, so stream keys/values never enter the cache for good.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .family import TokenPositions

QUANTUM = 32  # buffer sizes are multiples of this
Offset = Union[int, mx.array]


class KVCache:
    """One layer's buffer. ``offset`` is a host int when used eagerly, a scalar array inside
    a compiled step (see :meth:`view`)."""

    def __init__(self, capacity: int = 0):
        self.capacity = capacity  # token capacity; allocated on first write
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset: Offset = 0

    @classmethod
    def view(cls, keys: mx.array, values: mx.array, offset: Offset) -> "KVCache":
        """A cache over existing buffers ``[B, H, C, D]`` (inside a compiled step)."""
        c = cls(keys.shape[2])
        c.keys, c.values, c.offset = keys, values, offset
        return c

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` tokens, rounded up to ``QUANTUM`` (outside compiled steps:
        their shapes are fixed)."""
        if needed <= self.capacity:
            return
        self.capacity = -(-needed // QUANTUM) * QUANTUM
        if self.keys is not None:
            self.keys, self.values = _grow(self.keys, self.capacity), _grow(self.values, self.capacity)

    def attention_mask(self, local: Optional[mx.array], n: int, window: Optional[int] = None,
                       positions: Optional[mx.array] = None) -> mx.array:
        """``[n, C]`` bool (True = may attend): the committed prefix, then ``local`` ``[n, n]``
        (None = every new token sees every other) over the new tokens, nothing beyond; with a
        ``window``, only keys less than ``window`` positions behind each query (``positions``
        ``[n]``, absolute)."""
        return buffer_mask(local, n, self.offset, self.capacity, window, positions)

    # -- mlx-lm's cache protocol (plain decoding through an mlx-lm model's own __call__) ------
    def make_mask(self, n: int, window_size: Optional[int] = None, return_array: bool = False, **kwargs):
        """mlx-lm's ``make_mask``: causal over ``n`` new tokens after the committed prefix."""
        if isinstance(self.offset, int):
            self.reserve(self.offset + n)
        positions = mx.arange(n, dtype=mx.int32) + _as_array(self.offset)
        local = mx.array(np.tril(np.ones((n, n), dtype=bool))) if n > 1 else None
        return self.attention_mask(local, n, window_size, positions)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last ``n`` committed entries (they are overwritten by later writes)."""
        n = min(int(self.offset), n)
        self.offset -= n
        return n

    @property
    def meta_state(self) -> str:
        return str(int(self.offset))

    @meta_state.setter
    def meta_state(self, v: str) -> None:
        self.offset = int(v)

    def empty(self) -> bool:
        return self.keys is None

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write ``S`` new entries ``[B, H, S, D]`` at ``offset``; return the whole buffers."""
        if isinstance(self.offset, int):
            self.reserve(self.offset + k.shape[2])
        if self.keys is None:
            b, h, _, _ = k.shape
            self.keys = mx.zeros((b, h, self.capacity, k.shape[3]), k.dtype)
            self.values = mx.zeros((b, h, self.capacity, v.shape[3]), v.dtype)
        start = _as_array(self.offset)
        self.keys = mx.slice_update(self.keys, k, start, axes=(2,))
        self.values = mx.slice_update(self.values, v, start, axes=(2,))
        return self.keys, self.values

    def commit(self, path: Optional[Sequence[int]], count: int = 0) -> None:
        """Keep new entries ``path`` (indices relative to ``offset``), or the first ``count`` if None."""
        if path is None:
            self.offset += count
            return
        n = len(path)
        if list(path) != list(range(n)):  # otherwise a prefix of the new tokens is already in place
            self.gather(mx.array(list(path), dtype=mx.int32))
        self.offset += n

    def gather(self, path: mx.array) -> None:
        """Copy new entries ``path`` ``[n]`` (relative to ``offset``) to ``[offset, offset + n)``;
        ``offset`` is left to the caller (device-side commit inside a compiled step)."""
        start = _as_array(self.offset)
        idx = path + start
        self.keys = mx.slice_update(self.keys, mx.take(self.keys, idx, axis=2), start, axes=(2,))
        self.values = mx.slice_update(self.values, mx.take(self.values, idx, axis=2), start, axes=(2,))

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self) -> tuple[Optional[mx.array], Optional[mx.array]]:
        return self.keys, self.values

    @state.setter
    def state(self, v: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = v
        self.capacity = self.keys.shape[2]


class PassCache:
    """What one layer's attention sees during a forward pass: the layer's cache (or none) and
    the rotary offset of the pass's tokens (a scalar for consecutive positions, else
    :class:`~.family.TokenPositions`). Built per pass, so the positions are passed in, never
    stored on the model or the cache."""

    def __init__(self, cache: Optional[KVCache], offset: Union[Offset, TokenPositions]):
        self.cache = cache
        self.offset = offset

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        return (k, v) if self.cache is None else self.cache.update_and_fetch(k, v)


def buffer_mask(local: Optional[mx.array], n: int, offset: Offset, capacity: int,
                window: Optional[int] = None, positions: Optional[mx.array] = None) -> mx.array:
    """The attention mask of ``n`` new tokens written at ``offset`` into a ``capacity`` buffer.

    Example, ``offset`` 2, ``capacity`` 6, local = a 2-token chain::

        key      0 1 | 2 3 | 4 5
        token 0  1 1 | 1 0 | 0 0
        token 1  1 1 | 1 1 | 0 0
    """
    keys = mx.arange(capacity, dtype=mx.int32)
    rel = keys - _as_array(offset)  # key index - offset
    prefix = rel < 0
    if local is None:
        mask = mx.broadcast_to((rel < n)[None, :], (n, capacity))
    else:
        inside = (rel >= 0) & (rel < n)
        cols = mx.take(local, mx.clip(rel, 0, n - 1), axis=1)  # [n, C]: local[:, rel]
        mask = prefix[None, :] | (inside[None, :] & cols)
    if window is not None:
        # a committed key's index is its position; a new token's index is >= its position, and
        # the keys a new token sees among the new ones are its ancestors, always in the window
        mask = mask & (positions[:, None] - keys[None, :] < window)
    return mask


def _as_array(offset: Offset) -> mx.array:
    return offset if isinstance(offset, mx.array) else mx.array(offset, dtype=mx.int32)


def _grow(buf: mx.array, capacity: int) -> mx.array:
    b, h, c, d = buf.shape
    return mx.concatenate([buf, mx.zeros((b, h, capacity - c, d), buf.dtype)], axis=2)


def reserve_all(cache: Sequence[KVCache], needed: int) -> None:
    """Room for ``needed`` tokens in every layer (the same capacity everywhere, so one mask
    fits all layers)."""
    for c in cache:
        c.reserve(needed)


def make_cache(num_layers: int, capacity: int = 0) -> list[KVCache]:
    """One cache per layer; ``capacity``: room for that many tokens at the first write."""
    return [KVCache(capacity) for _ in range(num_layers)]
