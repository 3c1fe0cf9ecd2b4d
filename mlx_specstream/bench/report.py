"""Benchmark output: a markdown report, the JSON file, and an optional PNG plot (matplotlib)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

SPEEDUP_RULE = (
    "speedup = median over repeats of (SS decode tokens/s / AR decode tokens/s); decode tokens/s of a "
    "repeat = total decode tokens / total decode time over its prompts (prefill excluded); modes "
    "interleaved per prompt in one process."
)


def _quality(q: dict) -> str:
    if "rouge1" in q:
        return f"R-1 {q['rouge1']:.2f} / R-Lsum {q['rougeLsum']:.2f}"
    if "exact_match" in q:
        return f"EM {q['exact_match']:.3f}"
    return "-"


def markdown(result: dict) -> str:
    """A table with one row per mode, then acceptance, settings and tuning lines."""
    s = result["settings"]
    ar_rate = result["ar_decode_tokens_per_sec"]
    lines = [
        f"## specstream bench: {Path(s['model']).name} on {Path(s['data']).name} "
        f"({result['num_samples']} prompts x {s['repeats']} repeats)",
        "",
        "| mode | decode tok/s | vs AR | tokens/step | latency s | peak GB | identical | quality |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["modes"].items():
        ident = m.get("identical_fraction")
        rel = m["decode_tokens_per_sec"] / ar_rate if ar_rate else 0.0
        lines.append(
            f"| {name} | {m['decode_tokens_per_sec']:.1f} | {rel:.2f}x | {m['tokens_per_step']:.2f} | "
            f"{m['latency_s']:.3f} | {m['peak_memory_gb']:.4f} | {'-' if ident is None else f'{ident:.3f}'} | "
            f"{_quality(m['quality'])} |"
        )
    acc = ", ".join(f"{a:.2f}" for a in result["stream_acceptance"]) or "-"
    dist = ", ".join(f"{k}: {v:.2f}" for k, v in result["tokens_per_step_distribution"].items()) or "-"
    lines += [
        "",
        f"**speedup {result['speedup']:.2f}x**, tokens/step {result['tokens_per_step']:.2f}, "
        f"identical to AR {result['identical_fraction']:.3f}, "
        f"peak memory SS/AR {result['ss_peak_memory_gb'] / result['ar_peak_memory_gb']:.3f}",
        f"- per-repeat speedups: {', '.join(f'{x:.2f}' for x in result['speedup_per_repeat'])}",
        f"- stream acceptance (steps accepting >= j drafts, j = 1..): {acc}",
        f"- tokens per step distribution: {dist}",
    ]
    for b in result["baselines"]:
        lines.append(f"- SS vs {b['name']}: {b['ss_speedup_over']:.2f}x")
    tree = (f"tree {s['tree']} ({s['tree_size']} nodes)" if s["num_streams"] else
            "no speculative streams in this model: SS runs the autoregressive path (speedup 1 by construction)")
    lines += [
        f"- {tree}, max tokens {s['max_tokens']}, temp {s['temp']}, device {s['device']}, BLAS {s['blas']}",
        f"- {SPEEDUP_RULE}",
    ]
    t = result.get("tune")
    if t:
        lines += [
            "",
            f"### tuning: chose tree {t['tree']} ({t['size']} nodes), saved to {t['saved_to']}",
            "| | expected (tuning, calibration prompts) | measured (this benchmark) |",
            "|---|---|---|",
            f"| tokens/step | {t['expected_tokens_per_step']:.2f} | {t['measured_tokens_per_step']:.2f} |",
            f"| speedup | {t['expected_speedup']:.2f}x | {t['measured_speedup']:.2f}x |",
            f"| SS decode tok/s | {t['expected_ss_tokens_per_sec']:.1f} | {t['measured_ss_tokens_per_sec']:.1f} |",
            f"| AR decode tok/s | {t['expected_ar_tokens_per_sec']:.1f} | {t['measured_ar_tokens_per_sec']:.1f} |",
        ]
        lines += ["", *_tune_details(t)]
    return "\n".join(lines)


def tune_markdown(result: dict) -> str:
    """``specstream tune``'s report: the chosen tree, what it is expected to give, and why."""
    s = result["settings"]
    saved = f"saved to {result['saved_to']}" if result["saved_to"] else "not saved (--no-save)"
    lines = [
        f"## specstream tune: {Path(s['model']).name} on {result['calibration_prompts']} prompts of "
        f"{Path(s['data']).name}",
        "",
        f"**chose tree {result['tree']}** ({result['size']} nodes; the model's default was "
        f"{result['previous_tree']}), {saved}",
        f"- expected on the calibration prompts: {result['expected_speedup']:.2f}x, "
        f"{result['expected_tokens_per_step']:.2f} tokens/step, SS {result['expected_ss_tokens_per_sec']:.1f} "
        f"vs AR {result['expected_ar_tokens_per_sec']:.1f} decode tokens/s",
        *_tune_details(result),
        f"- max tokens {s['max_tokens']}, device {s['device']}, BLAS {s['blas']}; check it with "
        f"`specstream bench` on other prompts (calibrating on the benchmark's own prompts is optimistic)",
    ]
    return "\n".join(lines)


def _shown_sizes(depth: int, costs: list) -> list[int]:
    """Tree sizes whose cost a report shows for one depth: 2, 4, 8, 16, 32 where timed, and the
    largest size timed (when tune skipped a depth's bigger trees, it may be none of those)."""
    timed = [n for n, c in enumerate(costs, 1) if c is not None and n > depth]
    return [n for n in timed if n in (2, 4, 8, 16, 32) or n == timed[-1]]


def _tune_details(t: dict) -> list[str]:
    """The measurements behind a tuned tree: step costs, acceptance, candidates, finalists."""
    lines = [
        f"- step cost: AR {1e3 * t['step_cost_ar_s']:.2f} ms; tree of n nodes, depth d (d: n ms): "
        + "; ".join(f"d={d}: " + ", ".join(f"{n}: {1e3 * costs[n - 1]:.2f}" for n in _shown_sizes(int(d), costs))
                    for d, costs in t["step_cost_s"].items())
        + _untimed(t),
        "- rank acceptance P(stream j's rank-r token is the main stream's), rows j = 1..: "
        + "; ".join(" ".join(f"{p:.2f}" for p in row[:4]) for row in t["rank_acceptance"]),
        "- best candidates by the step-cost model: " + ", ".join(
            f"{c['tree']} ({c['size']} nodes, {c['tokens_per_step']:.2f} tok/step, {c['speedup']:.2f}x)"
            for c in t["candidates"][:4]),
        "- finalists timed in generations from the calibration prompts: " + ", ".join(
            f"{f['tree']} ({f['speedup']:.2f}x, {f['tokens_per_step']:.2f} tok/step; modelled "
            f"{f['modelled_speedup']:.2f}x)" for f in t.get("finalists", [])),
    ]
    if t["expected_speedup"] < 1.0:
        then = ("saved as the model's default on this device: it now decodes without speculation here unless asked "
                "(`--speculate`, a `--tree`, `speculate=True`)" if t.get("saved_to")
                else "decode without speculation here (`--no-speculate`, `speculate=False`)")
        lines.append(f"- **no tree is expected to beat plain decoding on this device** (best "
                     f"{t['expected_speedup']:.2f}x): {then}")
    return lines


def _untimed(t: dict) -> str:
    """Why some tree shapes have no step cost (tune skips a depth's bigger trees once they cannot pay)."""
    timed, total = t.get("cost_shapes_timed", 0), t.get("cost_shapes_total", 0)
    if not total or timed >= total:
        return ""
    return (f" ({timed} of {total} shapes timed: a depth's bigger trees were skipped once even its best "
            f"tree, at the cost measured, would decode below {t.get('cost_prune_below', 0):.0%} of plain decoding's speed)")


def write_json(result: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def plot(result: dict, path: str | os.PathLike) -> Optional[str]:
    """Speedup vs tree size (tuning's expectation and the measured point), else decode tok/s
    per mode. Returns None when written, or why not (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no plot written."
    fig, ax = plt.subplots(figsize=(6, 4))
    t = result.get("tune")
    if t:
        sizes = sorted(t["best_speedup_by_size"], key=int)
        ax.plot([int(n) for n in sizes], [t["best_speedup_by_size"][n] for n in sizes], "o-",
                label="modelled (best tree of each size)")
        finalists = t.get("finalists", [])
        if finalists:
            ax.plot([f["size"] for f in finalists], [f["speedup"] for f in finalists], "gs",
                    label="finalists, timed on calibration prompts")
        ax.plot([result["settings"]["tree_size"]], [result["speedup"]], "r*", markersize=14, label="measured")
        ax.set_xlabel("tree size (nodes)")
        ax.set_ylabel("speedup over autoregressive")
        ax.legend()
    else:
        names = list(result["modes"])
        ax.bar(names, [result["modes"][n]["decode_tokens_per_sec"] for n in names])
        ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{Path(result['settings']['model']).name}: speedup {result['speedup']:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
