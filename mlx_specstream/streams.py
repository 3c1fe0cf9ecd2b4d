"""Speculative Streaming around an mlx-lm model: stream embeddings, multi-stream attention
in the top N_s layers, the optional tree-pruning adapter and stream-only LoRA.

The model is mlx-lm's own implementation of its family (:mod:`.models`); :mod:`.family`
finds its embedding prologue, layers, final norm and head. This module owns the forward pass
that runs the lower layers on main-stream tokens only, inserts γ stream tokens per node at
the input of layer ``N - N_s`` and runs the upper layers on both (DESIGN.md rules 2-6).
Plain models (no ``speculative_streaming`` block) use the same pass.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Iterable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import PassCache, reserve_all
from .config import SpecStreamConfig
from .family import Family, TokenPositions, UnsupportedFamily
from .tree import Tree, ancestor_mask, causal_mask, path_matrix, stream_layout

# ``[S, 1]`` 1.0 for stream rows, 0.0 for main rows, while the multi-stream layers run (None
# elsewhere): stream-only LoRA reads it, because mlx-lm's layers call a linear with x alone.
_STREAM_ROWS: contextvars.ContextVar[Optional[mx.array]] = contextvars.ContextVar("stream_rows", default=None)


@contextlib.contextmanager
def stream_rows(rows: Optional[mx.array]):
    token = _STREAM_ROWS.set(rows)
    try:
        yield
    finally:
        _STREAM_ROWS.reset(token)


class LowRankResidual(nn.Module):
    """``x + up(down(x))`` with ``up`` zero-initialised, so it starts as the identity."""

    def __init__(self, dims: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dims, rank, bias=False)
        self.up = nn.Linear(rank, dims, bias=False)
        self.up.weight = mx.zeros_like(self.up.weight)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.up(self.down(x))


class StreamLoRALinear(nn.Module):
    """A linear layer whose LoRA delta applies to stream tokens only (lossless mode).

    The rank-``ρ`` projection is scaled by the pass's stream rows (:func:`stream_rows`: 1 for
    stream tokens, 0 for main ones) before the up-projection, which is fused with the add (``addmm``): main-stream rows
    get ``y + 0``, exactly the base layer's output, so the main stream stays the base model's.
    (Masking costs two small matmuls over main rows; slicing the stream rows out and
    concatenating them back costs more operations, which dominate on small models. Masking the
    ``[S, ρ]`` projection instead of the ``[S, out]`` delta, and ``addmm`` instead of a matmul,
    a scale and an add, leaves two extra operations per linear.)
    """

    def __init__(self, base: nn.Module, in_dims: int, out_dims: int, rank: int, scale: float):
        super().__init__()
        self.base = base
        self.lora_a = mx.zeros((rank, in_dims))
        self.lora_b = mx.zeros((out_dims, rank))
        self.scale = scale

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        rows = _STREAM_ROWS.get()
        if rows is None:
            return y
        low = (x @ self.lora_a.T).astype(y.dtype) * rows.astype(y.dtype)
        return mx.addmm(y, low, self.lora_b.T.astype(y.dtype), alpha=self.scale)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a forward pass needs about the layout of its new tokens, on the device.

    Built once per tree shape (and per prompt length for prefill), then reused every step.
    ``T`` main tokens; ``num_streams`` streams (g <= γ) for each of ``stream_nodes``;
    ``S = T + len(stream_nodes) * g``. ``*_contiguous``: the tokens' positions are consecutive
    (prefill, a single token), so rotary embeddings take one offset for all of them.
    """

    tree: Optional[Tree]
    n_main: int
    depth: np.ndarray  # [T] host copy
    main_mask: Optional[mx.array]  # [T, T] or None for a single token
    main_offsets: mx.array  # [T]
    stream_nodes: np.ndarray  # [n]
    num_streams: int  # streams per stream node (the first g of the model's γ)
    msa_mask: Optional[mx.array]  # [S, S]
    msa_offsets: Optional[mx.array]  # [S]
    # acceptance helpers (tree plans only)
    parent_index: Optional[mx.array] = None  # [T], root -> 0
    ancestors: Optional[mx.array] = None  # [T, T] bool
    paths: Optional[np.ndarray] = None  # [T, D + 1] host
    paths_dev: Optional[mx.array] = None
    depth_dev: Optional[mx.array] = None
    draft_depth: Optional[mx.array] = None  # [T - 1] stream index (0-based) of each draft node
    draft_rank: Optional[mx.array] = None  # [T - 1]
    width: int = 0
    main_contiguous: bool = True
    msa_contiguous: bool = True

    @property
    def is_chain(self) -> bool:
        """Every node's parent is the node before it: accepted paths are prefixes, already in place."""
        return self.tree is not None and all(p == i - 1 for i, p in enumerate(self.tree.parents))


def _consecutive(offsets: np.ndarray) -> bool:
    return bool(np.array_equal(offsets, np.arange(len(offsets))))


def _plan(
    main_mask: np.ndarray, depth: np.ndarray, stream_nodes: np.ndarray, num_streams: int, tree=None
) -> Plan:
    t = len(depth)
    msa_mask = msa_offsets = m_offsets = None
    if num_streams and len(stream_nodes):
        m, m_offsets = stream_layout(main_mask, depth, stream_nodes, num_streams)
        msa_mask, msa_offsets = mx.array(m), mx.array(m_offsets)
    extra = {}
    if tree is not None:
        parents = tree.parents
        paths = path_matrix(parents, depth)
        extra = dict(
            parent_index=mx.array(np.maximum(parents, 0)),
            ancestors=mx.array(ancestor_mask(parents)),
            paths=paths,
            paths_dev=mx.array(paths),
            depth_dev=mx.array(depth),
            draft_depth=mx.array(depth[1:] - 1),
            draft_rank=mx.array(tree.ranks[1:]),
            width=max(tree.width(), default=0),
        )
    return Plan(
        main_contiguous=_consecutive(depth),
        msa_contiguous=msa_offsets is None or _consecutive(np.asarray(m_offsets)),
        tree=tree,
        n_main=t,
        depth=depth,
        main_mask=None if t == 1 else mx.array(main_mask),
        main_offsets=mx.array(depth),
        stream_nodes=stream_nodes,
        num_streams=num_streams if len(stream_nodes) else 0,
        msa_mask=msa_mask,
        msa_offsets=msa_offsets,
        **extra,
    )


@functools.lru_cache(maxsize=256)
def tree_plan(tree: Tree, num_streams: int) -> Plan:
    """Plan for one speculative step: streams on every node (any node may be accepted).

    Only the first ``min(γ, depth of the tree)`` streams run: the next tree uses no others,
    and stream j never sees streams above j (rule 3), so dropping them changes nothing else.
    """
    return _tree_plan(tree, min(num_streams, tree.max_depth))


@functools.lru_cache(maxsize=256)
def _tree_plan(tree: Tree, streams_per_node: int) -> Plan:
    return _plan(ancestor_mask(tree.parents), tree.depth, np.arange(tree.size), streams_per_node, tree)


@functools.lru_cache(maxsize=64)
def chain_plan(num_drafts: int) -> Plan:
    """Plan for verifying a chain of ``num_drafts`` external drafts (no streams)."""
    return tree_plan(Tree(tuple((0,) * d for d in range(num_drafts + 1))), 0)


def prefill_plan(length: int, num_streams: int) -> Plan:
    """Plan for a prompt: causal, streams on the last token only (they draft the first tree)."""
    nodes = np.array([length - 1]) if num_streams else np.zeros(0, dtype=np.int64)
    return _plan(causal_mask(length), np.arange(length, dtype=np.int32), nodes, num_streams)


AR_PLAN = _plan(np.ones((1, 1), dtype=bool), np.zeros(1, dtype=np.int32), np.zeros(0, np.int64), 0)


def _layer_mask(cache: Sequence, local: Optional[mx.array], n: int, window: Optional[int],
                positions: mx.array) -> Optional[mx.array]:
    """Local ``[n, n]`` mask -> the mask over the cache buffer (the local one without a cache),
    limited to the layer's attention ``window``."""
    if cache:
        return cache[0].attention_mask(local, n, window, positions)
    if window is None:
        return local
    near = positions[:, None] - positions[None, :] < window
    return near if local is None else local & near


def run_layers(family: Family, h: mx.array, indices: Iterable[int], cache: Sequence, local: Optional[mx.array],
               positions: mx.array, contiguous: bool) -> mx.array:
    """Run decoder layers ``indices`` over ``h [B, n, h]``: new tokens laid out by the local
    mask ``[n, n]`` (None: all see all) at absolute ``positions [n]``; ``cache`` (per layer, or
    empty) receives their keys/values. Each layer gets the mask of its attention window."""
    n = h.shape[1]
    rope_offset = (cache[0].offset if cache else 0) if contiguous else TokenPositions(positions)
    masks: dict = {}
    for i in indices:
        window = family.windows[i]
        if window not in masks:
            masks[window] = _layer_mask(cache, local, n, window, positions)
        h = family.layers[i](h, masks[window], PassCache(cache[i] if cache else None, rope_offset))
    return h


def _stream_rows(n_main: int, total: int) -> mx.array:
    """``[total, 1]``: 0.0 for the ``n_main`` main tokens, 1.0 for the stream tokens after them."""
    return mx.array((np.arange(total) >= n_main).astype(np.float32)[:, None])


@dataclasses.dataclass
class StepOutput:
    logits: mx.array  # [T, V] main-stream logits of the (kept) nodes
    stream_hidden: Optional[mx.array]  # [n, g, h] stream states of stream_nodes, before the head
    plan: Plan  # the plan actually run (a pruned subtree's when pruning dropped nodes)
    keep: Optional[np.ndarray] = None  # kept node indices of the original plan, if pruned


class SpecStreamModel(nn.Module):
    """An mlx-lm model plus its Speculative Streaming extras (or none, for a plain model)."""

    def __init__(self, base: nn.Module, spec: Optional[SpecStreamConfig] = None):
        super().__init__()
        self.base = base
        self.spec = spec
        self.family = Family(base)  # not a parameter: references into ``base``
        if self.family.plain_only and spec is not None and spec.num_streams > 0:
            raise UnsupportedFamily(f"This model cannot carry speculative streams ({self.family.plain_only}).")
        n_layers, h = len(base.layers), _hidden_size(base)
        if spec is not None and spec.num_streams > 0:
            spec.validate(num_layers=n_layers)
            self.stream_embeddings = mx.random.normal((spec.num_streams, h)) * 0.02
            if spec.stream_init == "linear":
                self.stream_init = LowRankResidual(h, spec.stream_init_rank)
            if spec.pruning is not None:
                self.pruning = LowRankResidual(h, spec.pruning.rank)

    # -- structure ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.base.layers)

    @property
    def num_streams(self) -> int:
        return self.spec.num_streams if self.spec is not None else 0

    @property
    def msa_start(self) -> int:
        return self.spec.msa_start(self.num_layers) if self.num_streams else self.num_layers

    @property
    def has_pruning(self) -> bool:
        return "pruning" in self

    @property
    def max_positions(self) -> Optional[int]:
        return self.family.max_positions

    def attach_stream_lora(self) -> None:
        """Wrap the targeted linears of the MSA layers (call after base weights are loaded)."""
        lora = self.spec.stream_lora if self.spec is not None else None
        if lora is None or not self.num_streams:
            return
        for i in range(self.msa_start, self.num_layers):
            layer = self.base.layers[i]
            found = 0
            for path, module in list(layer.named_modules()):
                name = path.rsplit(".", 1)[-1]
                if name not in lora.target_modules or not hasattr(module, "weight"):
                    continue
                out_dims, in_dims = _linear_dims(module)
                parent = layer
                for part in path.split(".")[:-1]:
                    parent = parent[part] if isinstance(parent, dict) else getattr(parent, part)
                setattr(parent, name, StreamLoRALinear(module, in_dims, out_dims, lora.rank, lora.scale))
                found += 1
            if not found:
                raise ValueError(
                    f"stream_lora.target_modules {list(lora.target_modules)} match no linear layer "
                    f"in decoder layer {i}; use Hugging Face names such as 'q_proj'."
                )

    def stream_lora_modules(self) -> dict[str, StreamLoRALinear]:
        """``"{layer}.{path}" -> module`` for every stream-only LoRA linear."""
        out = {}
        for i in range(self.msa_start, self.num_layers):
            for path, module in self.base.layers[i].named_modules():
                if isinstance(module, StreamLoRALinear):
                    out[f"{i}.{path}"] = module
        return out

    # -- forward -----------------------------------------------------------------------------
    def head(self, h: mx.array) -> mx.array:
        return self.family.head(h)

    def stream_logits(self, stream_hidden: mx.array) -> mx.array:
        """``[..., γ, h]`` -> ``[..., γ, V]``: same final norm and head as the main stream."""
        return self.family.head(stream_hidden)

    def pruning_logits(self, hidden: mx.array) -> mx.array:
        """Early next-token logits from the main state at the streams' insertion point."""
        return self.family.head(self.pruning(hidden))

    def _insert_streams(self, m: mx.array, nodes: np.ndarray, num_streams: int) -> mx.array:
        """``M [B, T, h]`` -> stream tokens ``[B, n * g, h]``, node-major: f(M[t]) + P[j], j <= g."""
        src = m[:, mx.array(nodes)] if len(nodes) != m.shape[1] else m
        if "stream_init" in self:
            src = self.stream_init(src)
        s = src[:, :, None, :] + self.stream_embeddings[:num_streams].astype(src.dtype)
        return s.reshape(m.shape[0], -1, m.shape[-1])

    def forward(
        self,
        tokens: mx.array,
        cache: Sequence,
        plan: Plan,
        streams: bool = True,
        prune_threshold: Optional[float] = None,
    ) -> StepOutput:
        """Run one pass over ``tokens [1, T]`` laid out by ``plan``.

        Writes the keys/values of every new token into ``cache`` (uncommitted); the caller
        commits the accepted ones. With ``streams`` False (or a plain model) only the main
        stream runs, through the same layers: the autoregressive baseline.
        """
        family = self.family
        offset = cache[0].offset if cache else 0
        streams = streams and self.num_streams > 0 and plan.msa_mask is not None
        split = self.msa_start if streams else self.num_layers
        if cache and isinstance(offset, int):  # eager pass (a compiled step's buffers are sized by its caller)
            reserve_all(cache, offset + (plan.msa_mask.shape[0] if streams else plan.n_main))

        pos = plan.main_offsets + offset
        h = family.embed(tokens, pos)
        h = run_layers(family, h, range(split), cache, plan.main_mask, pos, plan.main_contiguous)
        if not streams:
            return StepOutput(family.head(h)[0], None, plan)

        keep = None
        if prune_threshold and self.has_pruning and plan.tree is not None and plan.n_main > 1:
            keep = self._prune(h, tokens, plan, prune_threshold)
            if keep is not None:
                # the same streams per node: the next tree is drafted to the full tree's depth
                plan = _tree_plan(plan.tree.subtree(keep.tolist()), plan.num_streams)
                h = h[:, mx.array(keep)]

        x = mx.concatenate([h, self._insert_streams(h, plan.stream_nodes, plan.num_streams)], axis=1)
        with stream_rows(_stream_rows(plan.n_main, plan.msa_mask.shape[0])):
            x = run_layers(family, x, range(split, self.num_layers), cache, plan.msa_mask,
                           plan.msa_offsets + offset, plan.msa_contiguous)
        t = plan.n_main
        stream_h = x[0, t:].reshape(len(plan.stream_nodes), plan.num_streams, -1)
        return StepOutput(family.head(x[:, :t])[0], stream_h, plan, keep)

    def _prune(self, h: mx.array, tokens: mx.array, plan: Plan, threshold: float) -> Optional[np.ndarray]:
        """Drop children whose early parent->child probability is below ``threshold``."""
        logp = nn.log_softmax(self.pruning_logits(h[0]).astype(mx.float32), axis=-1)
        child_p = mx.exp(logp[plan.parent_index[1:], tokens[0, 1:]])
        probs = np.array(child_p)
        parents = plan.tree.parents
        kept = np.ones(plan.n_main, dtype=bool)
        for i in range(1, plan.n_main):
            kept[i] = kept[parents[i]] and probs[i - 1] >= threshold
        if kept.all():
            return None
        return np.flatnonzero(kept)

    def __call__(self, tokens: mx.array) -> mx.array:
        """Whole-sequence main-stream logits ``[B, T] -> [B, T, V]`` (no cache), for checks."""
        if self.family.plain_only:
            return self.base(tokens)
        plan = prefill_plan(tokens.shape[1], 0)
        h = self.family.embed(tokens, plan.main_offsets)
        h = run_layers(self.family, h, range(self.num_layers), [], plan.main_mask, plan.main_offsets, True)
        return self.family.head(h)

    def check_family(self, tokens: Optional[mx.array] = None) -> None:
        """Raise :class:`~.family.UnsupportedFamily` unless driving the base's pieces
        reproduces its own logits: catches a family whose forward pass does something the
        wrapper does not (an unknown prologue, a head transform)."""
        if self.family.plain_only:
            return  # decoded by mlx-lm's own forward pass
        tokens = mx.array([[1, 2, 3, 4, 5]], dtype=mx.int32) if tokens is None else tokens
        expected = self.base(tokens).astype(mx.float32)
        got = self(tokens).astype(mx.float32)
        tol = 1e-3 if self.family.model_dtype == mx.float32 else 5e-2
        err = mx.abs(got - expected).max().item()
        if not err <= tol * (1.0 + mx.abs(expected).max().item()):
            raise UnsupportedFamily(
                f"Driving the {getattr(self.base, 'model_type', type(self.base).__name__)} model's layers does "
                f"not reproduce its own logits (max difference {err:.3g}): its forward pass does something "
                "the stream wrapper does not know. Please report the model type."
            )

    def all_logits(
        self, tokens: mx.array, stream_delta: Optional[mx.array] = None
    ) -> tuple[mx.array, mx.array, Optional[mx.array]]:
        """Reference pass over ``tokens [B, T]`` with streams on every position (no cache).

        Returns main ``[B, T, V]``, stream ``[B, T, γ, V]`` and pruning ``[B, T, V]`` (or None)
        logits: what a trainer computes in parallel over a sequence. ``stream_delta``
        ``[B, T, γ, h]`` is added to the stream tokens where they are inserted (visibility tests).
        """
        b, t = tokens.shape
        g = self.num_streams
        plan = _plan(causal_mask(t), np.arange(t, dtype=np.int32), np.arange(t), g)
        family = self.family
        h = family.embed(tokens, plan.main_offsets)
        h = run_layers(family, h, range(self.msa_start), [], plan.main_mask, plan.main_offsets, True)
        prune = self.pruning_logits(h) if self.has_pruning else None
        streams = self._insert_streams(h, plan.stream_nodes, g)
        if stream_delta is not None:
            streams = streams + stream_delta.reshape(streams.shape)
        x = mx.concatenate([h, streams], axis=1)
        with stream_rows(_stream_rows(t, plan.msa_mask.shape[0])):
            x = run_layers(family, x, range(self.msa_start, self.num_layers), [], plan.msa_mask,
                           plan.msa_offsets, plan.msa_contiguous)
        stream_h = x[:, t:].reshape(b, t, g, -1)
        return family.head(x[:, :t]), self.stream_logits(stream_h), prune


def _hidden_size(base: nn.Module) -> int:
    args = getattr(base, "args", None)
    if not getattr(args, "hidden_size", None):
        raise ValueError(f"{type(base).__name__} has no args.hidden_size; the stream wrapper needs the model width.")
    return args.hidden_size


def _linear_dims(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a float or quantized linear layer."""
    w = module.weight
    if "scales" in module:
        return w.shape[0], module.scales.shape[-1] * module.group_size
    return w.shape[0], w.shape[1]
