"""Decoding steps as compiled graphs: one trace per step kind, reused for every step.

Why: a small model's decoding step is a few hundred tiny operations, and launching them one
at a time costs more than their arithmetic (tens of microseconds each on a CPU). A compiled
step fuses the elementwise work (rotary embeddings, masks, activations, acceptance) and no
longer rebuilds the graph in Python every step. Its shapes are static between cache
growths: the buffers grow in 32-token quanta and the offset is a device scalar (see
:mod:`.cache`), so one trace per buffer size serves every step of every generation with the
same step kind, tree and sampler.

Every step function maps ``(tokens, offset, keys, values)`` to ``(info, next_tokens,
next_offset, keys, values)``; ``keys``/``values`` are the per-layer cache buffers
``[1, H, C, D]``, ``offset`` the committed length (an int32 scalar):

* ``"ar"``: one token, plain decoding. info ``[1]`` = the next token.
* ``"tree"``: verify the draft tree, walk it, gather the accepted path into place in every
  layer's cache, draft the next tree from the accepted node's streams (DESIGN.md rule 8).
  info ``[D + 3]`` = (depth d of the accepted node, its path's tokens ``[D + 1]``, bonus token).
* ``"chain"``: verify an external drafter's chain (prompt lookup) with the main stream only;
  a chain's accepted path is already in place. info as for ``"tree"``.

``next_tokens`` is the next step's input (the bonus token, then the new drafts) and
``next_offset = offset + d + 1`` (``+ 1`` for ``"ar"``): every input of the next step is on
the device, so it can be launched before this step's tokens are read (:mod:`.generate`).
"""

from __future__ import annotations

import collections
import functools
from typing import Callable

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


def step_function(model, kind: str, plan: Plan, sampling: SamplingParams, compile: bool = True) -> StepFn:
    """The (cached) step of ``kind`` for ``model`` and ``plan``; ``compile=False`` gives the same
    function run eagerly. A compiled step retraces once per cache buffer size."""
    key = (kind, plan.tree, plan.n_main, sampling, compile)
    table = _model_table(model)
    fn = table.get(key)
    if fn is None:
        fn = functools.partial(_KINDS[kind], model, plan, make_sampler(sampling))
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
    nxt = sampler(out.logits)
    return (nxt, nxt, offset + 1, *_buffers(cache))


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
    info = mx.concatenate([depth[None], path_tokens, bonus])
    return (info, mx.concatenate([bonus, drafts]), offset + depth + 1, *_buffers(cache))


def _chain_step(model, plan, sampler, tokens, offset, keys, values):
    cache = _views(keys, values, offset)
    out = model.forward(tokens[None], cache, plan, streams=False)
    chosen = sampler(out.logits)
    best, path_tokens = accept(tokens, chosen, plan)
    bonus = chosen[best][None]
    depth = best.astype(mx.int32)  # a chain's node index is its depth
    info = mx.concatenate([depth[None], path_tokens, bonus])
    return (info, bonus, offset + depth + 1, *_buffers(cache))


_KINDS = {"ar": _ar_step, "tree": _tree_step, "chain": _chain_step}
