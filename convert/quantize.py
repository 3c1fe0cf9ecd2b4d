"""Quantize base weights tensor by tensor, exactly as the runtime's loader expects, and
measure the error each kind of tensor takes.

Which layers are quantized is decided by the runtime (``loading.quantize_base`` on the lazy
skeleton: linear and embedding layers whose input width divides by the group size); the
loader re-quantizes the layers whose ``.scales`` it finds, so the two always agree.
Stream extras (embeddings, adapters) stay in float.
"""

from __future__ import annotations

import dataclasses
import re

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_specstream.loading import quantize_base

BITS = (4, 8)
_CHUNK_ELEMENTS = 2**20  # rows per error-statistics chunk: about this many weights
GROUP_SIZES = (32, 64, 128)


def quantized_shapes(skeleton: nn.Module, bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """Quantize the skeleton (lazily, in place) and return its parameter shapes afterwards.

    A layer ``X`` is quantized iff ``X.scales`` is among the returned names.
    """
    quantize_base(skeleton, bits, group_size)
    return {k: tuple(v.shape) for k, v in tree_flatten(skeleton.parameters())}


def quantize_weight(w: mx.array, bits: int, group_size: int) -> tuple[mx.array, mx.array, mx.array]:
    """``w [out, in]`` -> packed ``weight [out, in * bits / 32]`` (uint32), ``scales`` and
    ``biases`` ``[out, in / group_size]`` in ``w``'s dtype (MLX affine quantization)."""
    return mx.quantize(w, group_size=group_size, bits=bits)


def tensor_kind(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj``; ``lm_head.weight`` -> ``lm_head``."""
    kind = re.sub(r"^.*?layers\.\d+\.", "", name)
    if kind == name:
        kind = re.sub(r"^model\.(decoder\.)?", "", name)
    return kind.removesuffix(".weight")


@dataclasses.dataclass
class KindError:
    """Quantization error of one kind of tensor: relative Frobenius error ||W - Q(W)|| / ||W||
    (mean and worst over the tensors of the kind) and the largest absolute error."""

    kind: str
    tensors: int = 0
    mean_rel: float = 0.0
    max_rel: float = 0.0
    max_abs: float = 0.0


class QuantReport:
    """Per-kind quantization error, accumulated one tensor at a time."""

    def __init__(self, bits: int, group_size: int):
        self.bits, self.group_size = bits, group_size
        self.kinds: dict[str, KindError] = {}

    def add(self, name: str, original: mx.array, packed: tuple[mx.array, mx.array, mx.array]) -> None:
        """original: the float weight ``[out, in]`` before quantization (any float dtype).

        Rows are compared in chunks so the temporaries stay small next to the weight itself.
        """
        rows = original.shape[0]
        step = max(1, _CHUNK_ELEMENTS // max(1, original.size // max(rows, 1)))
        err_sq = norm_sq = worst = 0.0
        for r in range(0, rows, step):
            w = original[r : r + step].astype(mx.float32)
            chunk = tuple(p[r : r + step] for p in packed)
            diff = w - mx.dequantize(*chunk, group_size=self.group_size, bits=self.bits).astype(mx.float32)
            stats = mx.stack([mx.sum(diff * diff), mx.sum(w * w), mx.max(mx.abs(diff))])
            e, n, m = stats.tolist()
            err_sq, norm_sq, worst = err_sq + e, norm_sq + n, max(worst, m)
        rel = (err_sq**0.5) / max(norm_sq**0.5, 1e-30)
        kind = tensor_kind(name)
        k = self.kinds.setdefault(kind, KindError(kind))
        k.mean_rel = (k.mean_rel * k.tensors + rel) / (k.tensors + 1)
        k.tensors += 1
        k.max_rel, k.max_abs = max(k.max_rel, rel), max(k.max_abs, worst)

    def table(self) -> str:
        """A plain-text table, one row per tensor kind."""
        rows = [f"quantization error ({self.bits}-bit, group size {self.group_size}); rel = ||W - Q(W)|| / ||W||",
                f"{'tensor kind':<28} {'count':>5} {'mean rel':>10} {'max rel':>10} {'max abs':>10}"]
        for k in self.kinds.values():
            rows.append(f"{k.kind:<28} {k.tensors:>5} {k.mean_rel:>10.2e} {k.max_rel:>10.2e} {k.max_abs:>10.2e}")
        return "\n".join(rows)
