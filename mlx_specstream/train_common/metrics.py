"""Per-stream metric names, sums and summaries, as both trainers log them.

A step's metrics are sums: ``{name}.ce_sum`` (cross-entropy), ``{name}.correct`` (top-1
hits) and ``{name}.count`` (targets) for each loss term ``name`` of :func:`stream_names`,
plus ``loss_sum`` and ``steps``; they add up over steps, micro-batches and ranks, and
:func:`summarize` turns them into losses and accuracies.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

PRUNE_LOSS_WEIGHT = 0.1


def stream_names(num_streams: int, pruning: bool) -> list[str]:
    """Metric names: ``main``, ``stream1`` .. ``stream{γ}``, then ``prune`` if present."""
    return ["main"] + [f"stream{j}" for j in range(1, num_streams + 1)] + (["prune"] if pruning else [])


def add_into(total: dict[str, float], part: Mapping[str, float]) -> dict[str, float]:
    """``total[k] += part[k]`` for every key (missing keys start at 0); returns ``total``."""
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + float(v)
    return total


def summarize(sums: Mapping[str, float]) -> dict[str, float]:
    """Summed metrics -> ``{name}.loss`` and ``{name}.acc`` per stream (NaN when no targets),
    plus ``loss`` (mean per step) when the sums hold ``loss_sum`` and ``steps``."""
    out = {}
    for key, n in sums.items():
        if key.endswith(".count"):
            name = key[: -len(".count")]
            out[f"{name}.loss"] = sums.get(f"{name}.ce_sum", 0.0) / n if n else float("nan")
            out[f"{name}.acc"] = sums.get(f"{name}.correct", 0.0) / n if n else float("nan")
    if "loss_sum" in sums:
        out["loss"] = sums["loss_sum"] / max(1.0, sums.get("steps", 0.0))
    return out


def postfix(summary: Mapping[str, float], names: list[str], tok_s: float) -> dict[str, str]:
    """The progress bar's fields: loss, per-stream accuracies, tokens/s."""
    accs = "/".join(f"{summary.get(f'{n}.acc', float('nan')):.2f}" for n in names if n != "prune")
    return {"loss": f"{summary.get('loss', float('nan')):.3f}", "acc": accs, "tok/s": f"{tok_s:.0f}"}


def eval_at(history: Sequence[dict[str, Any]], step: int) -> Optional[dict[str, float]]:
    """The evaluation logged at ``step``, or None."""
    return next((h["eval"] for h in reversed(history) if "eval" in h and h["step"] == step), None)


def run_metrics(*, step: int, totals: Mapping[str, float], history: Sequence[dict[str, Any]],
                final_eval: Optional[dict[str, float]], parameters: tuple[int, int], examples: tuple[int, int, int],
                **extra: Any) -> dict[str, Any]:
    """``train_metrics.json``: the run's summed training metrics, the final and initial
    evaluations, ``parameters`` (trainable, total) and ``examples`` (trained on, dropped,
    evaluated on), plus ``extra``."""
    return {
        "steps": step,
        "train": summarize(totals) if totals else {},
        "eval": final_eval,
        "initial_eval": eval_at(history, 0),
        "trainable_parameters": parameters[0],
        "total_parameters": parameters[1],
        "train_examples": examples[0],
        "dropped_examples": examples[1],
        "eval_examples": examples[2],
        **extra,
    }
