"""Quantize base weights tensor by tensor, exactly as mlx-lm quantizes a model, and measure
the error each kind of tensor takes.

Which layers are quantized, and with which bits and group size, is decided by mlx-lm's own
``quantize_model`` on the lazy skeleton (after ``sanitize()``): layers that can be quantized
and whose input width divides by the group size, with the family's ``quant_predicate``
where it has one (Qwen3-MoE keeps its router at 8 bits). The ``quantization`` entry it
returns goes into config.json, so mlx-lm's loader (and ours, which is mlx-lm's) rebuilds the
same layers. Stream extras (embeddings, adapters) stay in float.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

BITS = (4, 8)
_CHUNK_ELEMENTS = 2**20  # rows per error-statistics chunk: about this many weights
GROUP_SIZES = (32, 64, 128)


@dataclasses.dataclass
class QuantPlan:
    """layers: quantized layer path -> its ``{"group_size", "bits", "mode"}``; shapes: every
    parameter of the quantized skeleton; config: the ``quantization`` entry for config.json."""

    layers: dict[str, dict[str, Any]]
    shapes: dict[str, tuple[int, ...]]
    config: dict[str, Any]

    def params_of(self, name: str):
        """The layer params when ``name`` (a ``.weight``) is quantized, else None."""
        if not name.endswith(".weight"):
            return None
        return self.layers.get(name[: -len(".weight")])


def plan_quantization(skeleton: nn.Module, bits: int, group_size: int) -> QuantPlan:
    """Quantize the skeleton lazily in place with mlx-lm's ``quantize_model``."""
    from mlx_lm.utils import quantize_model

    own = getattr(skeleton, "quant_predicate", None)
    default = {"group_size": group_size, "bits": bits, "mode": "affine"}
    layers: dict[str, dict[str, Any]] = {}

    def predicate(path: str, module: nn.Module):
        choice = own(path, module) if own is not None else True
        if choice:
            layers[path] = {**default, **choice} if isinstance(choice, dict) else dict(default)
        return choice

    with contextlib.redirect_stdout(io.StringIO()):  # its "[INFO] bits per weight" line
        _, config = quantize_model(skeleton, {}, group_size, bits, quant_predicate=predicate)
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(skeleton.parameters())}
    layers = {p: q for p, q in layers.items() if p + ".scales" in shapes}
    return QuantPlan(layers, shapes, config["quantization"])


def quantize_weight(w: mx.array, bits: int, group_size: int) -> tuple[mx.array, mx.array, mx.array]:
    """``w [..., out, in]`` -> packed ``weight [..., out, in * bits / 32]`` (uint32), ``scales`` and
    ``biases`` ``[..., out, in / group_size]`` in ``w``'s dtype (MLX affine quantization)."""
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

    def add(self, name: str, original: mx.array, packed: tuple[mx.array, mx.array, mx.array],
            bits: int | None = None, group_size: int | None = None) -> None:
        """original: the float weight ``[..., out, in]`` before quantization (any float dtype);
        bits/group_size: the layer's own when they differ from the report's.

        Rows are compared in chunks so the temporaries stay small next to the weight itself.
        """
        rows = original.shape[0]
        step = max(1, _CHUNK_ELEMENTS // max(1, original.size // max(rows, 1)))
        err_sq = norm_sq = worst = 0.0
        for r in range(0, rows, step):
            w = original[r : r + step].astype(mx.float32)
            chunk = tuple(p[r : r + step] for p in packed)
            deq = mx.dequantize(*chunk, group_size=group_size or self.group_size, bits=bits or self.bits)
            diff = w - deq.astype(mx.float32)
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
