"""Per-step cost of speculative vs autoregressive steps, as the generator runs them.

Times one decoding step at a fixed context length: the autoregressive step (1 token) and
speculative steps over draft trees, each node carrying its stream tokens through the
multi-stream layers, plus acceptance, drafting and the cache commit. Steps run as the
generator runs them (compiled, :mod:`mlx_specstream.compiled`); ``--eager`` adds the same
steps run op by op. Models: random-weight Llamas of a few sizes, and/or a model directory.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python examples/perf/step_cost.py [--sizes 30M,100M] [--model DIR] [--repeats 15] [--eager]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_specstream.cache import make_cache
from mlx_specstream.compiled import step_function
from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.sampling import SamplingParams
from mlx_specstream.streams import AR_PLAN, prefill_plan, tree_plan
from mlx_specstream.testing import random_model
from mlx_specstream.tree import parse_tree_spec

SIZES = {
    "30M": dict(hidden_size=384, num_hidden_layers=8, intermediate_size=1024, num_attention_heads=6),
    "100M": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12),
}
TREES = ["1", "1,1", "1,1,1", "1,1,1,1", "2,1,1,1", "3,1,1,1", "2,2,1", "4,2,2,1",
         "[[0],[1],[0,0],[0,0,0],[0,0,0,0]]"]
CONTEXT = 128
GAMMA = 4


def config(size: str) -> dict:
    return dict(model_type="llama", vocab_size=32000, tie_word_embeddings=True, rms_norm_eps=1e-5, **SIZES[size])


def median_time(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prepared_step(model, tree: str, context: int, compile: bool):
    """``(step function, its arguments, tree nodes, tokens in the MSA layers)`` for one decoding
    step of ``tree`` ("ar" or a tree spec) after ``context`` committed tokens."""
    vocab = model.base.args.vocab_size
    if tree == "ar":
        kind, plan, tokens, nodes, new = "ar", AR_PLAN, mx.array([1], dtype=mx.int32), 1, 1
    else:
        spec = parse_tree_spec(tree)
        if spec.max_depth > model.num_streams:
            raise SystemExit(f"Tree {tree} is deeper than the model's {model.num_streams} streams.")
        kind, plan, nodes = "tree", tree_plan(spec, model.num_streams), spec.size
        tokens, new = mx.random.randint(0, vocab, (nodes,)).astype(mx.int32), plan.msa_mask.shape[0]
    cache = make_cache(model.num_layers)  # sized as the generator sizes it: just past the new tokens
    model.forward(mx.random.randint(0, vocab, (1, context)), cache, prefill_plan(context, 0), streams=False)
    for c in cache:
        c.commit(None, context)
        c.reserve(context + new)
    keys, values = [c.keys for c in cache], [c.values for c in cache]
    mx.eval(tokens, keys, values)
    fn = step_function(model, kind, plan, SamplingParams(), compile)
    return fn, (tokens, mx.array(context, dtype=mx.int32), keys, values), nodes, new


def step_runner(model, tree: str, context: int = CONTEXT, compile: bool = True):
    """``(run, tree nodes, tokens in the MSA layers)`` for one decoding step of ``tree`` ("ar" or
    a tree spec) after ``context`` committed tokens: ``run()`` executes that step to completion
    as the generator runs it, on the same inputs every time (a steady loop)."""
    fn, step_args, nodes, new = prepared_step(model, tree, context, compile)
    return (lambda: mx.eval(fn(*step_args))), nodes, new


def step_outputs(model, tree: str, context: int = CONTEXT, compile: bool = True) -> tuple:
    """The (lazy, unevaluated) outputs of one such step: its graph, for inspection."""
    fn, step_args, _, _ = prepared_step(model, tree, context, compile)
    return fn(*step_args)


def step_costs(model, trees: list[str], repeats: int, compile: bool) -> list[tuple[str, int, int, float]]:
    """(step, tree nodes, tokens in the MSA layers, seconds) per step kind, context CONTEXT."""
    rows = []
    for name, tree in [("autoregressive", "ar")] + [(spec, spec) for spec in trees]:
        if tree != "ar" and parse_tree_spec(tree).max_depth > model.num_streams:
            continue
        run, nodes, msa = step_runner(model, tree, CONTEXT, compile)
        rows.append((name, nodes, msa, median_time(run, repeats)))
    return rows


def report(name: str, model, args) -> None:
    n_params = sum(v.size for _, v in tree_flatten(model.base.parameters()))
    print(f"\n## {name} ({n_params / 1e6:.1f}M params, {model.num_layers} layers, γ={model.num_streams}, "
          f"N_s={model.num_layers - model.msa_start}, context {CONTEXT})\n")
    modes = [("compiled", True)] + ([("eager", False)] if args.eager else [])
    print("| step | tree nodes | tokens in MSA layers | " + " | ".join(f"{m} ms | x AR" for m, _ in modes) + " |")
    print("|---|---|---|" + "---|---|" * len(modes))
    results = [step_costs(model, args.trees.split(";"), args.repeats, c) for _, c in modes]
    for i, (step, nodes, msa, _) in enumerate(results[0]):
        cells = " | ".join(f"{r[i][3] * 1e3:.2f} | {r[i][3] / r[0][3]:.2f}" for r in results)
        print(f"| {step} | {nodes} | {msa} | {cells} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="30M,100M", help="random-weight Llamas to time ('' for none)")
    ap.add_argument("--model", help="also time this model directory")
    ap.add_argument("--trees", default=";".join(TREES), help="';'-separated tree specs")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--eager", action="store_true", help="also time the steps run op by op")
    args = ap.parse_args()
    if args.model:
        from mlx_specstream import load

        model, _ = load(args.model)
        report(args.model, model, args)
    for size in filter(None, args.sizes.split(",")):
        spec = SpecStreamConfig(num_streams=GAMMA, num_msa_layers=SIZES[size]["num_hidden_layers"] // 2)
        report(f"{size} random Llama", random_model(config(size), spec, seed=0), args)


if __name__ == "__main__":
    main()
