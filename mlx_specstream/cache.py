"""A preallocated key/value cache that commits an accepted tree path by gathering it into place.

Each step writes the keys/values of all its new tokens (tree nodes, then stream tokens) at
``[offset, offset + S)``; attention reads ``[0, offset + S)``. Nothing is committed until the
generator knows which nodes were accepted: ``commit(path)`` gathers their entries to
``[offset, offset + len(path))`` and advances ``offset``. Rejected nodes and stream tokens
stay behind as garbage and are overwritten by the next step, so stream keys/values never
enter the cache for good and the buffer never shrinks or reallocates per step.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx

GROWTH = 256  # extra room taken whenever the buffer must grow


class KVCache:
    def __init__(self, capacity: int = 0):
        self.capacity = capacity  # initial token capacity; allocated on first write
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0

    def _ensure(self, needed: int, like_k: mx.array, like_v: mx.array) -> None:
        if self.keys is not None and self.keys.shape[2] >= needed:
            return
        size = max(needed + GROWTH, self.capacity)
        b, h, _, dk = like_k.shape
        new_k = mx.zeros((b, h, size, dk), like_k.dtype)
        new_v = mx.zeros((b, h, size, like_v.shape[3]), like_v.dtype)
        if self.keys is not None and self.offset:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write ``S`` new entries ``[B, H, S, D]`` after the committed prefix; return all ``offset + S``."""
        end = self.offset + k.shape[2]
        self._ensure(end, k, v)
        self.keys[..., self.offset : end, :] = k
        self.values[..., self.offset : end, :] = v
        return self.keys[..., :end, :], self.values[..., :end, :]

    def commit(self, path: Optional[Sequence[int]], count: int = 0) -> None:
        """Keep new entries ``path`` (indices relative to ``offset``), or the first ``count`` if None."""
        if path is None:
            self.offset += count
            return
        n = len(path)
        if list(path) != list(range(n)):  # a prefix of the new tokens is already in place
            idx = mx.array(path, dtype=mx.int32) + self.offset
            self.keys[..., self.offset : self.offset + n, :] = self.keys[..., idx, :]
            self.values[..., self.offset : self.offset + n, :] = self.values[..., idx, :]
        self.offset += n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def state(self) -> tuple[Optional[mx.array], Optional[mx.array]]:
        return self.keys, self.values


def make_cache(num_layers: int, capacity: int = 0) -> list[KVCache]:
    """One cache per layer; ``capacity`` preallocates room for that many tokens."""
    return [KVCache(capacity) for _ in range(num_layers)]
