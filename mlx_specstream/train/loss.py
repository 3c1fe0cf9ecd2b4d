"""Training objective (DESIGN.md rule 10) and per-stream metrics.

``L = a_0 CE(main, x_{t+1}) + sum_j a_j CE(stream j, x_{t+1+j}) + w_p CE(prune, x_{t+1})``,
each CE averaged over that stream's valid (completion) targets -- in the whole step, when a
step accumulates several micro-batches or DDP ranks (:func:`target_counts`), so the sum of
their losses is the loss of the big batch and its gradient the big batch's gradient.

Logits are computed only at rows with a valid target, and in chunks of at most
:data:`LOSS_CHUNK_ELEMENTS` logits: each chunk's head + cross-entropy is recomputed in the
backward pass (``torch.utils.checkpoint``), so no more than one chunk of ``[rows, V]`` logits
exists at a time, never all ``T (1 + γ)`` rows x vocabulary. Terms whose logits together fit
one chunk (short sequences, small vocabularies) skip the recomputation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from mlx_specstream.train_common.metrics import PRUNE_LOSS_WEIGHT, stream_names

from .layout import IGNORE_INDEX

if TYPE_CHECKING:
    from .model import SpecStreamLM, StreamHidden

# Logits per chunk (rows x vocabulary): 2^24 float32 logits are 64 MiB (plus their gradient); a
# Qwen2-0.5B-sized vocabulary (151,936) takes 110 rows a chunk.
LOSS_CHUNK_ELEMENTS = 1 << 24


def target_counts(targets: torch.Tensor, pruning: bool) -> dict[str, torch.Tensor]:
    """Valid targets per loss term (names from :func:`stream_names`) of ``targets`` ``[B, T, 1 + γ]``.

    Summed over a step's micro-batches (and ranks), they are the ``counts`` that make
    :func:`specstream_loss` of each micro-batch add up to the loss of the whole step.
    """
    per = (targets != IGNORE_INDEX).sum((0, 1)).float()  # [1 + γ]
    names = stream_names(targets.shape[-1] - 1, pruning)
    return {name: per[0] if name == "prune" else per[j] for j, name in enumerate(names)}


def _chunk_ce(model: "SpecStreamLM", hidden: torch.Tensor, target: torch.Tensor, detach_head: bool,
              correct: list):
    """CE sum of one chunk; appends its #correct to ``correct`` (skipped when the list is None:
    the backward pass's recomputation, which needs the CE only)."""
    logits = model.head(hidden, detach_weights=detach_head).float()
    ce_sum = F.cross_entropy(logits, target, reduction="sum")
    if correct is not None:
        correct.append((logits.detach().argmax(-1) == target).sum())
    return ce_sum


def _ce(model: "SpecStreamLM", hidden: torch.Tensor, target: torch.Tensor, *, detach_head: bool = False,
        chunk_elements: int = LOSS_CHUNK_ELEMENTS, plain_elements: int = LOSS_CHUNK_ELEMENTS):
    """Sum CE, #correct and #targets of ``hidden`` ``[..., h]`` against ``target`` ``[...]``.

    Up to ``plain_elements`` logits are computed at once and kept for backward as usual; more
    go in chunks of ``chunk_elements``, each recomputed in backward.
    """
    sel = target != IGNORE_INDEX
    count = sel.sum()
    if not bool(count):
        # Keep the graph connected (DDP expects every parameter to get a gradient).
        zero = hidden.sum() * 0.0
        return zero, zero.detach(), count
    rows, tgt = hidden[sel], target[sel]
    vocab = int(model.hf.config.vocab_size)
    correct: list = []
    if rows.shape[0] * vocab <= plain_elements:
        ce_sum = _chunk_ce(model, rows, tgt, detach_head, correct)
        return ce_sum, correct[0], count
    chunk = max(1, chunk_elements // vocab)
    recompute = torch.is_grad_enabled()
    ce_sum = rows.new_zeros((), dtype=torch.float32)
    for s in range(0, rows.shape[0], chunk):
        args = (model, rows[s: s + chunk], tgt[s: s + chunk], detach_head)
        if recompute:
            # The forward call takes the list out of the box; the recomputation in backward finds
            # it empty and skips the argmax (accuracy is counted once).
            box = {"correct": correct}
            c = torch.utils.checkpoint.checkpoint(lambda *a: _chunk_ce(*a, box.pop("correct", None)), *args,
                                                  use_reentrant=False)
        else:
            c = _chunk_ce(*args, correct)
        ce_sum = ce_sum + c
    return ce_sum, torch.stack(correct).sum(), count


def specstream_loss(model: "SpecStreamLM", hidden: "StreamHidden", targets: torch.Tensor, *,
                    prune_loss_weight: float = PRUNE_LOSS_WEIGHT,
                    counts: Optional[dict[str, torch.Tensor]] = None,
                    chunk_elements: int = LOSS_CHUNK_ELEMENTS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted loss and metrics ``{name}.{ce_sum,correct,count}`` (names from :func:`stream_names`).

    ``targets`` ``[B, T, 1 + γ]`` from :func:`.layout.stream_targets`; stream targets of
    positions before ``hidden.stream_start`` must all be ignored (no stream was computed).
    Each term's CE sum is divided by ``counts[name]`` if given (the step's total, see
    :func:`target_counts`), else by this batch's count. ``chunk_elements`` bounds the logits
    computed at once.
    """
    gamma = model.spec.num_streams
    weights = model.spec.weights()
    assert not (targets[:, : hidden.stream_start, 1:] != IGNORE_INDEX).any()
    loss = hidden.main.new_zeros((), dtype=torch.float32)
    metrics: dict[str, torch.Tensor] = {}
    names = stream_names(gamma, hidden.prune is not None)
    # Terms small enough to keep their logits for backward share one chunk's budget between them.
    kw = dict(chunk_elements=chunk_elements, plain_elements=chunk_elements // len(names))
    for j, name in enumerate(names):
        if name == "prune":
            ce_sum, correct, count = _ce(model, hidden.prune, targets[..., 0], detach_head=True, **kw)
            weight = prune_loss_weight
        else:
            if j == 0:
                ce_sum, correct, count = _ce(model, hidden.main, targets[..., 0], **kw)
            else:
                ce_sum, correct, count = _ce(model, hidden.streams[:, :, j - 1],
                                             targets[:, hidden.stream_start:, j], **kw)
            weight = weights[j]
        norm = counts[name] if counts is not None else count
        loss = loss + weight * ce_sum / norm.clamp(min=1)
        metrics[f"{name}.ce_sum"] = ce_sum.detach()
        metrics[f"{name}.correct"] = correct.detach().float()
        metrics[f"{name}.count"] = count.detach().float()
    return loss, metrics
