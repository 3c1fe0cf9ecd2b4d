"""Training objective (DESIGN.md rule 10) and per-stream metrics.

``L = a_0 CE(main, x_{t+1}) + sum_j a_j CE(stream j, x_{t+1+j}) + w_p CE(prune, x_{t+1})``,
each CE averaged over that stream's valid (completion) targets. Logits are computed only at
positions with a valid target, which saves most of the ``[B, T, γ, V]`` memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .layout import IGNORE_INDEX

if TYPE_CHECKING:
    from .model import SpecStreamLM, StreamHidden

PRUNE_LOSS_WEIGHT = 0.1


def stream_names(num_streams: int, pruning: bool) -> list[str]:
    """Metric names: ``main``, ``stream1`` .. ``stream{γ}``, then ``prune`` if present."""
    return ["main"] + [f"stream{j}" for j in range(1, num_streams + 1)] + (["prune"] if pruning else [])


def _ce(model: "SpecStreamLM", hidden: torch.Tensor, target: torch.Tensor, *, detach_head: bool = False):
    """Sum CE, #correct and #targets of ``hidden`` ``[..., h]`` against ``target`` ``[...]``."""
    sel = target != IGNORE_INDEX
    count = sel.sum()
    if not bool(count):
        # Keep the graph connected (DDP expects every parameter to get a gradient).
        zero = hidden.sum() * 0.0
        return zero, zero.detach(), count
    logits = model.head(hidden[sel], detach_weights=detach_head).float()
    tgt = target[sel]
    ce_sum = F.cross_entropy(logits, tgt, reduction="sum")
    correct = (logits.argmax(-1) == tgt).sum()
    return ce_sum, correct, count


def specstream_loss(model: "SpecStreamLM", hidden: "StreamHidden", targets: torch.Tensor, *,
                    prune_loss_weight: float = PRUNE_LOSS_WEIGHT) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted loss and metrics ``{name}.{ce_sum,correct,count}`` (names from :func:`stream_names`).

    ``targets`` ``[B, T, 1 + γ]`` from :func:`.layout.stream_targets`; stream targets of
    positions before ``hidden.stream_start`` must all be ignored (no stream was computed).
    """
    gamma = model.spec.num_streams
    weights = model.spec.weights()
    assert not (targets[:, : hidden.stream_start, 1:] != IGNORE_INDEX).any()
    loss = hidden.main.new_zeros(())
    metrics: dict[str, torch.Tensor] = {}
    for j, name in enumerate(stream_names(gamma, hidden.prune is not None)):
        if name == "prune":
            ce_sum, correct, count = _ce(model, hidden.prune, targets[..., 0], detach_head=True)
            weight = prune_loss_weight
        else:
            if j == 0:
                ce_sum, correct, count = _ce(model, hidden.main, targets[..., 0])
            else:
                ce_sum, correct, count = _ce(model, hidden.streams[:, :, j - 1],
                                             targets[:, hidden.stream_start:, j])
            weight = weights[j]
        loss = loss + weight * ce_sum / count.clamp(min=1)
        metrics[f"{name}.ce_sum"] = ce_sum.detach()
        metrics[f"{name}.correct"] = correct.detach().float()
        metrics[f"{name}.count"] = count.detach().float()
    return loss, metrics


def summarize(metrics: dict[str, float]) -> dict[str, float]:
    """Accumulated sums -> ``{name}.loss`` and ``{name}.acc`` per stream (NaN when no targets)."""
    out = {}
    for key in metrics:
        if key.endswith(".count"):
            name = key[: -len(".count")]
            n = metrics[key]
            out[f"{name}.loss"] = metrics[f"{name}.ce_sum"] / n if n else float("nan")
            out[f"{name}.acc"] = metrics[f"{name}.correct"] / n if n else float("nan")
    return out
