"""Pipelined vs sequential decoding steps, AR and tree, in real generations.

Generates greedily from the first N prompts of an E2E file with four settings, interleaved
per prompt (as `specstream bench` interleaves its modes; each prompt starts with the next
setting in turn), and prints decode tokens/s per
setting after each round: cumulative, or of that round alone with ``--per-round`` (prefill
excluded; each generation stops at EOS).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python examples/perf/pipeline.py [--model DIR] [--data CSV] [--num-samples 40] [--rounds 4] [--per-round] [--settings NAMES]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from mlx_specstream import load
from mlx_specstream.bench.data import load_bench_data
from mlx_specstream.generate import generate_step
from mlx_specstream.prompting import format_prompt

SETTINGS = {
    "AR, pipelined": dict(speculate=False, pipeline=True),
    "AR, sequential": dict(speculate=False, pipeline=False),
    "tree, pipelined": dict(pipeline=True),
    "tree, sequential": dict(pipeline=False),
}


def generation(model, prompt: mx.array, eos: set[int], max_tokens: int, **kwargs) -> tuple[list[int], float]:
    """(tokens up to the first EOS or ``max_tokens``, decode seconds) of one greedy generation,
    prefill excluded; ``kwargs`` go to ``generate_step`` (``speculate``, ``pipeline``, ...)."""
    tokens, start = [], None
    for step in generate_step(model, prompt, max_tokens=max_tokens, **kwargs):
        if step.prefill:
            start = time.perf_counter()
            continue
        tokens += step.tokens
        if eos & set(step.tokens):
            break
    elapsed = time.perf_counter() - start
    tokens = tokens[: max_tokens - 1]  # a last step may overshoot; the prefill made the first token
    end = next((i for i, t in enumerate(tokens) if t in eos), len(tokens) - 1)
    return tokens[: end + 1], elapsed


def generation_parser(description: str, num_samples: int, rounds: int) -> argparse.ArgumentParser:
    """The options of a generation-timing script: this one, and the BLAS A/Bs of docs/lab/scripts."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", help="model directory (default: the bundled demo)")
    ap.add_argument("--data", default="../shared/data/e2e/devset.csv.gz")
    ap.add_argument("--num-samples", type=int, default=num_samples)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=rounds)
    return ap


def encoded_prompts(model, tokenizer, data: str, num_samples: int) -> list[mx.array]:
    """The first ``num_samples`` prompts of ``data``, in the model's prompt template, as token ids."""
    examples = load_bench_data(data, num_samples).examples
    return [mx.array(tokenizer.encode(format_prompt(model, ex.prompt)), dtype=mx.int32) for ex in examples]


def interleaved_rounds(names: list[str], prompts: list[mx.array], run, rounds: int, warmup: int = 5,
                       cumulative: bool = True):
    """Time every setting on every prompt, ``rounds`` times over; each prompt starts with the
    next setting in turn. ``run(name, prompt)`` returns ``(tokens, decode seconds)``. First runs
    every setting untimed on the first ``warmup`` prompts (traces every step kind and cache
    size). Yields ``(round, {name: decode tokens/s}, prompts whose outputs differed so far)``
    after each round: tokens/s since the first round, or of that round alone when not
    ``cumulative``."""
    for name in names:
        for p in prompts[:warmup]:
            run(name, p)
    totals = {name: [0, 0.0] for name in names}
    differ = 0
    for r in range(1, rounds + 1):
        if not cumulative:
            totals = {name: [0, 0.0] for name in names}
        for i, p in enumerate(prompts):
            outputs = []
            for name in names[i % len(names):] + names[: i % len(names)]:
                tokens, t = run(name, p)
                outputs.append(tokens)
                totals[name][0] += len(tokens)
                totals[name][1] += t
            differ += any(o != outputs[0] for o in outputs)
        yield r, {name: n / t for name, (n, t) in totals.items()}, differ


def main() -> None:
    ap = generation_parser(__doc__.split("\n\n")[0], num_samples=40, rounds=4)
    ap.add_argument("--per-round", action="store_true", help="tokens/s of each round, not cumulative")
    ap.add_argument("--settings", help="';'-separated subset of: " + "; ".join(SETTINGS) + " (default: all)")
    args = ap.parse_args()
    settings = SETTINGS
    if args.settings:
        names = [n.strip() for n in args.settings.split(";")]
        unknown = [n for n in names if n not in SETTINGS]
        if unknown:
            ap.error(f"unknown settings {unknown}; choose from: " + "; ".join(SETTINGS))
        settings = {n: SETTINGS[n] for n in names}
    model, tokenizer = load(args.model)
    eos = set(tokenizer.eos_token_ids)
    prompts = encoded_prompts(model, tokenizer, args.data, args.num_samples)

    def run(name: str, prompt: mx.array) -> tuple[list[int], float]:
        return generation(model, prompt, eos, args.max_tokens, **settings[name])

    print("| round | " + " | ".join(settings) + " |\n|---|" + "---|" * len(settings))
    for r, tps, differ in interleaved_rounds(list(settings), prompts, run, args.rounds, cumulative=not args.per_round):
        print(f"| {r} | " + " | ".join(f"{v:.1f}" for v in tps.values()) + " |", flush=True)
    print(f"prompts whose outputs were not all the same: {differ} of {len(prompts) * args.rounds}")

if __name__ == "__main__":
    main()
