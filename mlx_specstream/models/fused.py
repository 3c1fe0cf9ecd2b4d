"""Fused input projections for inference: one matmul for q/k/v, one for gate/up.

Why: a small model's decoding step on a CPU is dominated by the fixed cost of each matmul
(a task handed to MLX's worker thread, a BLAS call and its set-up), not by its arithmetic.
Computing q, k and v with one matmul over their concatenated weights, and gate and up with
another, removes three matmuls per decoder layer. Measured on the E2E demo (2-core x86-64,
OpenBLAS; BENCHMARKS.md, ``examples/perf/fused.py``): autoregressive decoding 25% faster,
speculative decoding 4% (a tree step's cost is its wider matmuls themselves).

The fused weight is stored transposed, ``[in, sum of outs]`` (a plain ``x @ W`` call, the
faster BLAS layout here), and the separate layers' weights become views into it, so fusing
costs no memory. Their parameters keep their names and values: saving, quantizing,
adapters and checks see the usual layers. A fused projection is used only while its owner
still holds the layer modules it was built from (quantizing or wrapping a layer afterwards
falls back to the separate matmuls; compiled steps key on which projections are current,
:attr:`~..streams.SpecStreamModel.fusion_state`).
Replacing weights goes through :meth:`~..streams.SpecStreamModel.update`, which unfuses
first. (Array identity cannot tell: a compiled call re-wraps every array of the model state.)
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
ATTR = "_fused"  # per owner module: {group name: FusedProjection}


class FusedProjection:
    """Several ``nn.Linear`` layers reading the same input, as one matmul (a plain object, not
    a module: it adds no parameters)."""

    def __init__(self, owner: nn.Module, names: Sequence[str]):
        layers = [getattr(owner, n) for n in names]
        self.owner, self.names = owner, tuple(names)
        ends = list(itertools.accumulate(layer.weight.shape[0] for layer in layers))
        self.splits = ends[:-1]  # where each layer's outputs start, after the first
        self.weight_t = mx.contiguous(mx.concatenate([layer.weight for layer in layers], axis=0).T)
        has_bias = "bias" in layers[0]
        self.bias = mx.concatenate([layer.bias for layer in layers]) if has_bias else None
        for layer, start, end in zip(layers, [0] + self.splits, ends):  # views into the fused buffer
            layer.weight = self.weight_t[:, start:end].T
            if has_bias:
                layer.bias = self.bias[start:end]
        mx.eval(self.weight_t, [layer.parameters() for layer in layers])
        self.layers = layers

    def current(self) -> bool:
        """Whether the owner still holds the layer modules this projection was built from."""
        get = self.owner.get
        return all(get(name) is layer for name, layer in zip(self.names, self.layers))

    def __call__(self, x: mx.array) -> list[mx.array]:
        y = x @ self.weight_t if self.bias is None else mx.addmm(self.bias, x, self.weight_t)
        return mx.split(y, self.splits, axis=-1)


def fusable(owner: nn.Module, names: Sequence[str]) -> bool:
    """Plain float linears of one dtype, all with or all without a bias."""
    layers = [owner.get(n) for n in names]
    if any(type(layer) is not nn.Linear for layer in layers):
        return False
    dtypes = {layer.weight.dtype for layer in layers}
    biases = {"bias" in layer for layer in layers}
    widths = {layer.weight.shape[1] for layer in layers}
    return len(dtypes) == 1 and len(biases) == 1 and len(widths) == 1 and mx.issubdtype(dtypes.pop(), mx.floating)


def _owners(layers: Sequence[nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    """``(group, owner)`` for every group module (``self_attn``, ``mlp``) the decoder layers have."""
    for layer in layers:
        for group in GROUPS:
            owner = layer.get(group)
            if owner is not None:
                yield group, owner


def fuse_projections(layers: Sequence[nn.Module]) -> list[FusedProjection]:
    """Fuse q/k/v and gate/up of every decoder layer that has them as plain linears; returns
    the fused projections. Call once the weights are final (after loading, casting)."""
    made = []
    for group, owner in _owners(layers):
        if fusable(owner, GROUPS[group]):
            made.append(FusedProjection(owner, GROUPS[group]))
            owner.__dict__.setdefault(ATTR, {})[group] = made[-1]
    return made


def unfuse_projections(layers: Sequence[nn.Module]) -> None:
    """Drop every fused projection; the layers get contiguous copies of their weights (views
    into a transposed buffer would be copied again by every matmul)."""
    for group, owner in _owners(layers):
        proj = owner.__dict__.pop(ATTR, {}).get(group)
        if proj is None:
            continue
        for name, module in zip(proj.names, proj.layers):
            if owner.get(name) is module:
                module.weight = mx.contiguous(module.weight)
                if "bias" in module:
                    module.bias = mx.contiguous(module.bias)
                mx.eval(module.parameters())


def fused(owner: nn.Module, group: str) -> Optional[FusedProjection]:
    """The owner's current fused projection for ``group`` (``"self_attn"``/``"mlp"``), or None."""
    proj = owner.__dict__.get(ATTR, {}).get(group)
    return proj if proj is not None and proj.current() else None


def projections(owner: nn.Module, group: str, x: mx.array, separate: Callable) -> Sequence[mx.array]:
    """The outputs of ``group``'s linears (``GROUPS[group]``, in that order) on ``x``: one matmul
    when they are fused, else ``separate(layer, x)`` for each."""
    proj = fused(owner, group)
    if proj is not None:
        return proj(x)
    return [separate(owner[name], x) for name in GROUPS[group]]
