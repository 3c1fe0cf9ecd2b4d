"""Run one kind of decoding step in a loop, for a native profiler to attach to.

Builds the compiled step the generator runs (autoregressive, or a tree step with its stream
tokens, acceptance, drafting and cache commit) at a fixed context, then calls it for
``--seconds`` and prints the mean time per step. Python-level profilers mostly see the
import; attach a native one once the loop runs:

    export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
    python examples/perf/profile_step.py --model runs/stories260k/lossless_mlx --tree 1,1 --seconds 20 &
    sleep 12; perf record -F 4000 -g -p $! -o step.perf -- sleep 4
    perf report -i step.perf --no-children --sort sym

``--tree ar`` profiles the autoregressive step.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from mlx_specstream import load
from mlx_specstream.cache import make_cache
from mlx_specstream.compiled import step_function
from mlx_specstream.sampling import SamplingParams
from mlx_specstream.streams import AR_PLAN, prefill_plan, tree_plan
from mlx_specstream.tree import parse_tree_spec


def step_loop(model, tree: str, context: int):
    """A zero-argument function running one compiled step of ``tree`` ("ar" or a spec) to completion."""
    vocab = model.base.args.vocab_size
    if tree == "ar":
        kind, plan, tokens, new = "ar", AR_PLAN, mx.array([1], dtype=mx.int32), 1
    else:
        spec = parse_tree_spec(tree)
        if spec.max_depth > model.num_streams:
            raise SystemExit(f"Tree {tree} is deeper than the model's {model.num_streams} streams.")
        kind, plan = "tree", tree_plan(spec, model.num_streams)
        tokens, new = mx.random.randint(0, vocab, (spec.size,)).astype(mx.int32), plan.msa_mask.shape[0]
    cache = make_cache(model.num_layers)
    model.forward(mx.random.randint(0, vocab, (1, context)), cache, prefill_plan(context, 0), streams=False)
    for c in cache:
        c.commit(None, context)
        c.reserve(context + new)
    keys, values = [c.keys for c in cache], [c.values for c in cache]
    mx.eval(tokens, keys, values)
    fn = step_function(model, kind, plan, SamplingParams())
    offset = mx.array(context, dtype=mx.int32)
    return lambda: mx.eval(fn(tokens, offset, keys, values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: the bundled demo)")
    ap.add_argument("--tree", default="ar", help='"ar" or a tree spec such as 1,1 (default: ar)')
    ap.add_argument("--context", type=int, default=64, help="committed tokens before the step")
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    model, _ = load(args.model)
    step = step_loop(model, args.tree, args.context)
    for _ in range(5):
        step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        step()
        n += 1
    print(f"{args.tree}: {(time.perf_counter() - start) / n * 1e3:.3f} ms per step over {n} steps", flush=True)


if __name__ == "__main__":
    main()
