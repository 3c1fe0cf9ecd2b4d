"""Timing: every mode on every prompt, interleaved, repeated; then per-mode summaries.

Conventions (DESIGN.md "Metrics"):

* A generation's **first step** produced its first token (the prefill). Its time is the
  prompt time; **decode** is everything after it: decode tokens = generated tokens (EOS
  included) minus those of the first step, decode time = first step's end -> last step's end.
* **Decode tokens/s of a mode in one repeat** = total decode tokens / total decode time over
  all prompts of that repeat (long generations weigh more, as in a serving log). The reported
  value is the **median over repeats**.
* **speedup** = median over repeats of (SS decode tokens/s / AR decode tokens/s of the same
  repeat). Within a repeat every prompt runs every mode back to back, in an order rotated per
  prompt and repeat, so slow phases of a shared machine hit all modes alike.
* **tokens per step** (CR) = decode tokens / decode steps over all runs; its distribution is
  over steps of ``accepted + 1``; acceptance of stream j = fraction of steps with >= j accepted.
* **latency** = prompt time + decode time of one generation (end to end), median over runs.
* **peak memory** of a mode = its own weights + the largest extra memory one of its
  generations allocated (MLX peak minus the memory active before it), so baselines loaded
  in the same process do not inflate each other's numbers.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Iterable, Optional, Sequence

import mlx.core as mx

from .baselines import Mode

GB = 1e9


@dataclasses.dataclass
class Run:
    """One timed generation."""

    tokens: list[int]
    prompt_time: float
    decode_time: float
    decode_tokens: int
    accepted: list[int]  # per decode step
    extra_memory: int  # bytes allocated beyond what was active before the run

    @property
    def latency(self) -> float:
        return self.prompt_time + self.decode_time


def time_generation(steps: Iterable[tuple[list[int], int]], max_tokens: int, eos: set[int]) -> Run:
    """Consume a mode's steps until EOS (kept) or ``max_tokens``, timing the first step apart."""
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    tokens: list[int] = []
    accepted: list[int] = []
    start = time.perf_counter()
    first_end = last_end = start
    first_count = 0
    it = iter(steps)
    try:
        for step_tokens, acc in it:
            now = time.perf_counter()
            kept = []
            for t in step_tokens:
                kept.append(t)
                if t in eos or len(tokens) + len(kept) >= max_tokens:
                    break
            tokens.extend(kept)
            if first_count == 0:
                first_end, first_count = now, len(tokens)
            else:
                accepted.append(min(acc, len(kept)))
            last_end = now
            if len(tokens) >= max_tokens or kept[-1] in eos:
                break
    finally:
        getattr(it, "close", lambda: None)()
    mx.synchronize()  # mlx-lm keeps one step in flight: finish it outside the next run's clock
    return Run(tokens, first_end - start, last_end - first_end, len(tokens) - first_count, accepted,
               max(mx.get_peak_memory() - before, 0))


def measure(
    modes: Sequence[Mode],
    prompts: Sequence[list[int]],
    *,
    max_tokens: int,
    repeats: int,
    eos: set[int],
    seed: int = 0,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
) -> dict[str, list[list[Run]]]:
    """``{mode: runs[repeat][prompt]}``. One untimed warm-up generation per mode first."""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}.")
    for mode in modes:
        time_generation(mode.steps(prompts[0], max_tokens), max_tokens, eos)
    runs = {m.name: [[None] * len(prompts) for _ in range(repeats)] for m in modes}
    jobs = [(r, i) for r in range(repeats) for i in range(len(prompts))]
    for r, i in progress(jobs) if progress else jobs:
        k = (r + i) % len(modes)
        for mode in list(modes[k:]) + list(modes[:k]):
            mx.random.seed(seed + i)  # same seed per prompt for every mode (sampling)
            runs[mode.name][r][i] = time_generation(mode.steps(prompts[i], max_tokens), max_tokens, eos)
    return runs


def decode_rates(runs: list[list[Run]]) -> list[float]:
    """Decode tokens/s per repeat: total decode tokens / total decode time of the repeat."""
    out = []
    for rep in runs:
        seconds = sum(r.decode_time for r in rep)
        out.append(sum(r.decode_tokens for r in rep) / seconds if seconds > 0 else 0.0)
    return out


def summarize(mode: Mode, runs: list[list[Run]], reference: Optional[list[list[Run]]] = None) -> dict:
    """JSON-ready statistics of one mode; ``reference`` (the AR runs) gives identical_fraction."""
    flat = [r for rep in runs for r in rep]
    rates = decode_rates(runs)
    steps = [a for r in flat for a in r.accepted]
    decode_tokens = sum(r.decode_tokens for r in flat)
    depth = max(steps, default=0)
    out = {
        "decode_tokens_per_sec": statistics.median(rates),
        "decode_tokens_per_sec_per_repeat": rates,
        "tokens_per_step": decode_tokens / len(steps) if steps else 0.0,
        "tokens_per_step_distribution": {
            str(k + 1): sum(a == k for a in steps) / len(steps) for k in range(depth + 1)} if steps else {},
        "stream_acceptance": [sum(a >= j for a in steps) / len(steps) for j in range(1, depth + 1)],
        "latency_s": statistics.median(r.latency for r in flat),
        "prompt_time_s": statistics.median(r.prompt_time for r in flat),
        "generated_tokens_mean": statistics.fmean(len(r.tokens) for r in flat),
        "peak_memory_gb": (mode.weights_bytes + max(r.extra_memory for r in flat)) / GB,
    }
    if reference is not None:
        pairs = [(a.tokens, b.tokens) for ra, rb in zip(runs, reference) for a, b in zip(ra, rb)]
        out["identical_fraction"] = sum(a == b for a, b in pairs) / len(pairs)
    return out


def speedups(num: list[list[Run]], den: list[list[Run]]) -> list[float]:
    """Per-repeat ratio of decode tokens/s (``num`` over ``den``)."""
    return [a / b if b > 0 else 0.0 for a, b in zip(decode_rates(num), decode_rates(den))]
