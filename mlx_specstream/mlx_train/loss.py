"""The training objective (DESIGN.md rule 10) over the chunked forward, with its gradients.

``L = a_0 CE(main) + sum_j a_j CE(stream j) + w_p CE(prune)``, each CE averaged over that
stream's valid (completion) targets in the whole optimizer step (every micro-batch of a
gradient-accumulation group: the counts are known on the host before any forward pass, so
accumulating micro-batches gives exactly the gradient of one large batch). The PyTorch
trainer's loss (``mlx_specstream.train.loss``) is the one-batch case.

In lossless mode the main stream is the frozen base: its CE is a constant, computed for the
report without gradients. The stream loss is a sum over position chunks that share only the
frozen main pass, so each chunk's gradient is taken on its own and added up; memory holds
one chunk. Logits are computed only for rows with a target, ``head_rows`` at a time (each
piece under :func:`mx.checkpoint`, so its ``[rows, V]`` logits are recomputed, not kept).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from mlx_specstream.streams import SpecStreamModel
from mlx_specstream.train_common.metrics import PRUNE_LOSS_WEIGHT, stream_names

from .data import IGNORE_INDEX, stream_targets
from .forward import ChunkLayout, chunk_bounds, main_pass, stream_chunk

LOGITS_BUDGET = 1 << 25  # logits per head piece (128 MB in float32)


@dataclasses.dataclass
class Options:
    """How the forward pass is cut: ``chunk_size`` positions of streams per chunk,
    ``prefill_chunk`` main tokens per prefill piece, ``head_rows`` rows per head piece
    (None: a budget of :data:`LOGITS_BUDGET` logits), ``grad_checkpoint`` per MSA layer."""

    chunk_size: int = 64
    prefill_chunk: int = 512
    head_rows: Optional[int] = None
    grad_checkpoint: bool = False
    prune_loss_weight: float = PRUNE_LOSS_WEIGHT


def _ce_rows(model: SpecStreamModel, hidden: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    logits = model.head(hidden).astype(mx.float32)
    ce = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return ce, (mx.argmax(logits, axis=-1) == targets).astype(mx.float32)


def head_ce(model: SpecStreamModel, hidden: mx.array, targets: mx.array, head_rows: int) -> tuple[mx.array, mx.array]:
    """Per-row CE ``[R]`` and correctness ``[R]`` of ``hidden [R, h]`` against ``targets [R]``,
    through the final norm and head (the head's weights are constants here: frozen base)."""
    r = hidden.shape[0]
    if r <= head_rows:
        return _ce_rows(model, hidden, targets)
    ces, oks = [], []
    for s in range(0, r, head_rows):
        y = targets[s: s + head_rows]
        ce, ok = mx.checkpoint(lambda h, y=y: _ce_rows(model, h, y))(hidden[s: s + head_rows])
        ces.append(ce)
        oks.append(ok)
    return mx.concatenate(ces), mx.concatenate(oks)


@dataclasses.dataclass
class Rows:
    """Rows of one chunk with a target, grouped by stream: ``index [R]`` into the chunk's
    flattened ``[B, n, γ]`` stream rows, ``targets [R]``, ``weights [R]`` (a_j / count_j),
    ``segments``: ``(name, start, end)`` per stream."""

    index: mx.array
    targets: mx.array
    weights: mx.array
    segments: list[tuple[str, int, int]]


def _select(tgt: np.ndarray, names: Sequence[str], weights: Sequence[float], counts: dict[str, int]) -> Optional[Rows]:
    """``tgt [B, n, k]`` (k streams with names/weights) -> the rows with a valid target."""
    idx, ys, ws, segments, start = [], [], [], [], 0
    k = tgt.shape[-1]
    for j, (name, w) in enumerate(zip(names, weights)):
        flat = np.flatnonzero(tgt[..., j] != IGNORE_INDEX)  # over [B, n]
        if not len(flat):
            continue
        idx.append(flat * k + j)
        ys.append(tgt[..., j].reshape(-1)[flat])
        ws.append(np.full(len(flat), w / max(1, counts[name]), np.float32))
        segments.append((name, start, start + len(flat)))
        start += len(flat)
    if not idx:
        return None
    return Rows(mx.array(np.concatenate(idx).astype(np.int32)), mx.array(np.concatenate(ys).astype(np.int32)),
                mx.array(np.concatenate(ws)), segments)


def count_targets(labels: Sequence[np.ndarray], num_streams: int, pruning: bool) -> dict[str, int]:
    """Valid targets per stream name over every micro-batch of a step."""
    names = stream_names(num_streams, pruning)
    counts = dict.fromkeys(names, 0)
    for lab in labels:
        tgt = stream_targets(lab, num_streams)
        for j in range(num_streams + 1):
            counts[names[j]] += int((tgt[..., j] != IGNORE_INDEX).sum())
        if pruning:
            counts["prune"] += int((tgt[..., 0] != IGNORE_INDEX).sum())
    return counts


def _add(totals: dict, name: str, ce: mx.array, ok: mx.array, s: int, e: int) -> None:
    for key, v in ((f"{name}.ce_sum", ce[s:e].sum()), (f"{name}.correct", mx.stop_gradient(ok[s:e]).sum())):
        totals[key] = totals[key] + v if key in totals else v


def batch_loss(model: SpecStreamModel, ids: np.ndarray, labels: np.ndarray, counts: dict[str, int],
               opts: Options, grads: bool = True) -> tuple[mx.array, dict[str, mx.array], Optional[dict]]:
    """One micro-batch ``ids, labels [B, T]``: its share of the step's loss (a 0-d array), metric
    sums ``{name}.{ce_sum,correct}`` and, with ``grads``, the gradient of that share with respect
    to ``model.trainable_parameters()``. ``counts``: :func:`count_targets` of the whole step."""
    if model.spec.mode == "shared":
        from .shared import shared_batch_loss

        return shared_batch_loss(model, ids, labels, counts, opts, grads)
    g = model.num_streams
    names = stream_names(g, model.has_pruning)
    weights = model.spec.weights()
    head_rows = opts.head_rows or max(16, LOGITS_BUDGET // _vocab(model))
    tgt = stream_targets(labels, g)
    main = main_pass(model, mx.array(ids), opts.prefill_chunk)
    h = main.final.shape[-1]
    totals: dict[str, mx.array] = {}
    loss = mx.array(0.0)
    acc = None

    def accumulate(value_grads):
        nonlocal acc
        acc = value_grads if acc is None else tree_map(lambda x, y: x + y, acc, value_grads)
        mx.eval(acc)

    # main stream: the frozen base, a constant of the loss
    rows = _select(tgt[..., :1], ["main"], [weights[0]], counts)
    if rows is not None:
        ce, ok = head_ce(model, main.final.reshape(-1, h)[rows.index], rows.targets, head_rows)
        loss = loss + (ce * rows.weights).sum()
        _add(totals, "main", ce, ok, 0, len(rows.targets))
        mx.eval(loss, totals)

    # pruning adapter: head(o(M)) against the next token, M and the head frozen
    if model.has_pruning and rows is not None:
        prows = _select(tgt[..., :1], ["prune"], [opts.prune_loss_weight], counts)

        def prune_loss(model):
            m = main.inserted.reshape(-1, h)[prows.index]
            ce, ok = head_ce(model, model.pruning(m), prows.targets, head_rows)
            return (ce * prows.weights).sum(), ce, ok

        loss = _run(model, prune_loss, grads, accumulate, totals, prows, loss)

    # streams, chunk by chunk over the positions that have any stream target
    has = (tgt[..., 1:] != IGNORE_INDEX).any(axis=(0, 2))
    positions = np.flatnonzero(has)
    if len(positions):
        for a, b in chunk_bounds(int(positions[0]), int(positions[-1]) + 1, opts.chunk_size):
            srows = _select(tgt[:, a:b, 1:], names[1: g + 1], weights[1:], counts)
            if srows is None:
                continue
            layout = ChunkLayout.of(a, b, g, ids.shape[0])

            def chunk_loss(model, layout=layout, srows=srows):
                x = stream_chunk(model, main.inserted[:, layout.a: layout.b], main.keys, main.values, layout,
                                 opts.grad_checkpoint)
                ce, ok = head_ce(model, x.reshape(-1, h)[srows.index], srows.targets, head_rows)
                return (ce * srows.weights).sum(), ce, ok

            loss = _run(model, chunk_loss, grads, accumulate, totals, srows, loss)
    return loss, totals, acc


def _run(model, fn, grads: bool, accumulate, totals: dict, rows: Rows, loss: mx.array) -> mx.array:
    if grads:
        (value, ce, ok), g = nn.value_and_grad(model, fn)(model)
        accumulate(g)
    else:
        value, ce, ok = fn(model)
    for name, s, e in rows.segments:
        _add(totals, name, mx.stop_gradient(ce), ok, s, e)
    loss = loss + mx.stop_gradient(value)
    mx.eval(loss, totals)
    return loss


def _vocab(model: SpecStreamModel) -> int:
    args = getattr(model.base, "args", None)
    return int(getattr(args, "vocab_size", 0) or 32000)
