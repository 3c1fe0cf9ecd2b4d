"""Tree verification and drafting on the device, vectorised over nodes (DESIGN.md rules 7-8).

Pure functions of arrays and a :class:`~.streams.Plan`: no host synchronisation, so they run
inside a compiled decoding step (:mod:`.compiled`) as well as eagerly.
"""

from __future__ import annotations

import mlx.core as mx

from .streams import Plan


def accept(tokens: mx.array, chosen: mx.array, plan: Plan) -> tuple[mx.array, mx.array]:
    """Walk the tree: the deepest node whose whole path matches the main stream's choices.

    tokens ``[T]`` node tokens, chosen ``[T]`` the main stream's choice at each node (argmax,
    or the node's own sample). A node matches if its token equals its parent's choice; it is
    accepted if it and all its ancestors match. Siblings carry distinct tokens, so the deepest
    accepted node is unique. Returns that node's index (a scalar) and the tokens along its
    path ``[D + 1]`` (padded by repeating the node's token past its depth).

    Example, tree "2,1" (nodes: root, a, b, a0, b0), tokens ``[r, 5, 7, 9, 4]``, chosen
    ``[7, 1, 4, 0, 0]``: b (7) matches the root's choice, b0 (4) matches b's, a does not;
    accepted node 4, path tokens ``[r, 7, 4]``.
    """
    match = (tokens == chosen[plan.parent_index]) | (plan.depth_dev == 0)
    ok = mx.all(match[None, :] | ~plan.ancestors, axis=1)
    best = mx.argmax(mx.where(ok, plan.depth_dev, -1))
    return best, tokens[plan.paths_dev[best]]


def draft(model, stream_hidden: mx.array, plan: Plan) -> mx.array:
    """Stream states ``[γ, h]`` of the accepted node -> draft tokens ``[T - 1]`` of the next tree.

    Node ``(r_1, ..., r_d)`` carries the rank-``r_d`` token of stream ``d`` (rule 7).
    """
    depth = plan.tree.max_depth
    logits = model.stream_logits(stream_hidden[:depth]).astype(mx.float32)  # [D, V]
    k = plan.width
    if k == 1:
        top = mx.argmax(logits, axis=-1)[:, None]
    else:
        part = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]
        order = mx.argsort(-mx.take_along_axis(logits, part, axis=-1), axis=-1)
        top = mx.take_along_axis(part, order, axis=-1)
    return top[plan.draft_depth, plan.draft_rank].astype(mx.int32)
