"""Decoding steps as compiled graphs: one trace per step kind, reused for every step.

Why: a small model's decoding step is a few hundred tiny operations, and launching them one
at a time costs more than their arithmetic (tens of microseconds each on a CPU). A compiled
step fuses the elementwise work (rotary embeddings, masks, activations, acceptance) and no
longer rebuilds the graph in Python every step. Its shapes are static between cache
growths: the buffers grow in 32-token quanta and the offset is a device scalar (see
:mod:`.cache`), so one trace per buffer size serves every step of every generation with the
same step kind, tree and sampler.

Every step function maps ``(tokens, offset, keys, values)`` to ``(depth, path, bonus,
next_tokens, next_offset, keys, values)``; ``keys``/``values`` are the per-layer cache buffers
``[1, H, C, D]``, ``offset`` the committed length (an int32 scalar). The step commits its
accepted path into place in every layer's cache (DESIGN.md rule 8): ``depth`` (scalar) is the
accepted node's depth d, ``path`` ``[D + 1]`` the tokens from the root to it (padded past d),
``bonus`` ``[1]`` the main stream's next token there. The step emits ``path[1 : d + 1]`` and
``bonus``, and the next step starts at ``next_offset = offset + d + 1`` from ``next_tokens``
(the bonus token, then the new drafts), both on the device, so it can be launched before this
step's tokens are read (:mod:`.generate`). Kinds:

* ``"ar"``: one token, plain decoding (d = 0).
* ``"tree"``: verify the draft tree, walk it, gather the accepted path into place, draft the
  next tree from the accepted node's streams.
* ``"chain"``: verify an external drafter's chain (prompt lookup) with the main stream only;
  a chain's accepted path is already in place. ``next_tokens`` is the bonus alone.
* ``"pruned"``: a tree step with tree pruning; run eagerly (the kept subtree changes every step).
"""

from __future__ import annotations

import collections
import functools
from typing import Callable, Optional

import mlx.core as mx

from .cache import KVCache
from .sampling import SamplingParams, make_sampler
from .streams import Plan
from .verify import accept, draft

StepFn = Callable[..., tuple]

# id(model) -> (model, {(kind, plan key, sampling, compiled): step}), most recent last.
# A compiled step holds its model, so the table keeps at most MAX_MODELS models alive; an id
# cannot be reused while its model is in the table.
MAX_MODELS = 4
_TABLES: "collections.OrderedDict[int, tuple[object, dict]]" = collections.OrderedDict()


def step_function(model, kind: str, plan: Plan, sampling: SamplingParams, compile: bool = True,
                  prune_threshold: Optional[float] = None) -> StepFn:
    """The (cached) step of ``kind`` for ``model`` and ``plan``; ``compile=False`` gives the same
    function run eagerly (always, for ``"pruned"`` steps, with their ``prune_threshold``). A
    compiled step retraces once per cache buffer size."""
    compile = compile and kind != "pruned"
    key = (kind, plan.tree, plan.n_main, sampling, compile, prune_threshold)
    table = _model_table(model)
    fn = table.get(key)
    if fn is None:
        extra = (prune_threshold,) if kind == "pruned" else ()
        fn = functools.partial(_KINDS[kind], model, plan, make_sampler(sampling), *extra)
        if compile:
            # Parameters are read at every call (not frozen into the trace), and sampling
            # advances the global random state as eager code would.
            if sampling.greedy:
                fn = mx.compile(fn, inputs=model.state)
            else:
                fn = mx.compile(fn, inputs=[model.state, mx.random.state], outputs=mx.random.state)
        table[key] = fn
    return fn


def _model_table(model) -> dict:
    key = id(model)
    entry = _TABLES.get(key)
    if entry is None:
        entry = _TABLES[key] = (model, {})
        while len(_TABLES) > MAX_MODELS:
            _TABLES.popitem(last=False)
    _TABLES.move_to_end(key)
    return entry[1]


def clear() -> None:
    """Forget every compiled step (and release the models they hold)."""
    _TABLES.clear()


def _views(keys, values, offset) -> list[KVCache]:
    return [KVCache.view(k, v, offset) for k, v in zip(keys, values)]


def _buffers(cache: list[KVCache]) -> tuple[list[mx.array], list[mx.array]]:
    return [c.keys for c in cache], [c.values for c in cache]


def _ar_step(model, plan, sampler, tokens, offset, keys, values):
    cache = _views(keys, values, offset)
    out = model.forward(tokens[None], cache, plan, streams=False)
    bonus = sampler(out.logits)
    return (mx.array(0, dtype=mx.int32), tokens, bonus, bonus, offset + 1, *_buffers(cache))


def _tree_step(model, plan, sampler, tokens, offset, keys, values):
    cache = _views(keys, values, offset)
    out = model.forward(tokens[None], cache, plan, streams=True)
    chosen = sampler(out.logits)
    best, path_tokens = accept(tokens, chosen, plan)
    bonus = chosen[best][None]
    drafts = draft(model, out.stream_hidden[best], plan)
    if not plan.is_chain:  # a chain's accepted path is already in place
        path = plan.paths_dev[best]
        for c in cache:
            c.gather(path)  # entries past the accepted depth are garbage beyond the new offset
    depth = plan.depth_dev[best]
    return (depth, path_tokens, bonus, mx.concatenate([bonus, drafts]), offset + depth + 1, *_buffers(cache))


def _pruned_step(model, plan, sampler, threshold, tokens, offset, keys, values):
    cache = _views(keys, values, offset)
    out = model.forward(tokens[None], cache, plan, True, threshold)
    run = out.plan  # the kept subtree's plan
    if out.keep is not None:
        tokens = tokens[mx.array(out.keep)]
    chosen = sampler(out.logits)
    best, path_tokens = accept(tokens, chosen, run)
    bonus = chosen[best][None]
    drafts = draft(model, out.stream_hidden[best], plan)  # the next tree is the full tree again
    path = run.paths_dev[best]
    # the layers below the streams wrote every node, the ones above only the kept nodes
    below = path if out.keep is None else mx.array(out.keep)[path]
    for i, c in enumerate(cache):
        c.gather(below if i < model.msa_start else path)
    depth = run.depth_dev[best]
    return (depth, path_tokens, bonus, mx.concatenate([bonus, drafts]), offset + depth + 1, *_buffers(cache))


def _chain_step(model, plan, sampler, tokens, offset, keys, values):
    cache = _views(keys, values, offset)
    out = model.forward(tokens[None], cache, plan, streams=False)
    chosen = sampler(out.logits)
    best, path_tokens = accept(tokens, chosen, plan)
    bonus = chosen[best][None]
    depth = best.astype(mx.int32)  # a chain's node index is its depth
    return (depth, path_tokens, bonus, bonus, offset + depth + 1, *_buffers(cache))


_KINDS = {"ar": _ar_step, "tree": _tree_step, "chain": _chain_step, "pruned": _pruned_step}
