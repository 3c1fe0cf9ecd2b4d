"""Per-step cost of speculative vs autoregressive steps on random-weight Llamas (issue 2).

For a ~30M and a ~100M parameter Llama (float32), times one forward pass at a fixed context
length: the autoregressive step (1 token) and speculative steps over draft trees of 1..32
nodes, each node carrying γ stream tokens through the multi-stream layers. Then runs a whole
speculative generation and splits its wall time into MLX evaluation and everything else
(Python: graph building, tree bookkeeping, cache commit), the overhead the runtime must keep
under 15% of the step time.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
        python examples/perf/step_cost.py [--sizes 30M,100M] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from mlx_specstream.cache import make_cache
from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.generate import generate_step
from mlx_specstream.streams import AR_PLAN, prefill_plan, tree_plan
from mlx_specstream.testing import random_model
from mlx_specstream.tree import parse_tree_spec

SIZES = {
    "30M": dict(hidden_size=384, num_hidden_layers=8, intermediate_size=1024, num_attention_heads=6),
    "100M": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12),
}
TREES = ["1", "3", "1,1,1", "7", "2,2,1", "4,2,1", "4,2,2,1", "4,3,2,1", "[[0],[1],[2],[3],[0,0],[0,1],[1,0],[0,0,0],[0,0,0,0]]"]
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


def step_costs(model, repeats: int) -> list[tuple[str, int, int, float]]:
    cache = make_cache(model.num_layers, capacity=CONTEXT + 256)
    prompt = mx.random.randint(0, 32000, (1, CONTEXT))
    model.forward(prompt, cache, prefill_plan(CONTEXT, 0), streams=False)
    for c in cache:
        c.commit(None, CONTEXT)
    mx.eval([c.keys for c in cache])

    def run(plan, tokens, streams):
        out = model.forward(tokens, cache, plan, streams)
        mx.eval(out.logits, out.stream_hidden) if out.stream_hidden is not None else mx.eval(out.logits)

    rows = [("autoregressive", 1, 1, median_time(lambda: run(AR_PLAN, prompt[:, :1], False), repeats))]
    for spec in TREES:
        tree = parse_tree_spec(spec)
        plan = tree_plan(tree, model.num_streams)
        tokens = mx.random.randint(0, 32000, (1, tree.size))
        rows.append((spec, tree.size, tree.size * (1 + GAMMA), median_time(lambda: run(plan, tokens, True), repeats)))
    return rows


def overhead(model, tree: str, tokens: int = 200) -> tuple[float, float]:
    """(total seconds, seconds inside mx.eval) of one speculative generation's decode steps."""
    real_eval = mx.eval
    spent = [0.0]

    def timed_eval(*args):
        t = time.perf_counter()
        real_eval(*args)
        spent[0] += time.perf_counter() - t

    prompt = mx.random.randint(0, 32000, (CONTEXT,))
    steps = generate_step(model, prompt, max_tokens=tokens, tree=tree)
    next(steps)  # prefill excluded
    mx.eval = timed_eval
    try:
        t = time.perf_counter()
        for _ in steps:
            pass
        total = time.perf_counter() - t
    finally:
        mx.eval = real_eval
    return total, spent[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="30M,100M")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--overhead-tree", default="4,2,2,1")
    args = ap.parse_args()
    for size in args.sizes.split(","):
        spec = SpecStreamConfig(num_streams=GAMMA, num_msa_layers=SIZES[size]["num_hidden_layers"] // 2)
        model = random_model(config(size), spec, seed=0)
        n_params = sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(model.base.parameters()))
        print(f"\n## {size} random Llama ({n_params / 1e6:.1f}M params, float32, γ={GAMMA}, N_s=N/2, context {CONTEXT})\n")
        print("| step | tree nodes | tokens in MSA layers | ms / step | x autoregressive |")
        print("|---|---|---|---|---|")
        rows = step_costs(model, args.repeats)
        ar = rows[0][3]
        for name, nodes, msa_tokens, t in rows:
            print(f"| {name} | {nodes} | {msa_tokens} | {t * 1e3:.2f} | {t / ar:.2f} |")
        total, in_eval = overhead(model, args.overhead_tree)
        print(
            f"\nWhole speculative generation (tree {args.overhead_tree}, 200 tokens): {total:.3f} s of decode, "
            f"{in_eval:.3f} s in mx.eval, outside MLX evaluation {100 * (1 - in_eval / total):.1f}%"
        )


if __name__ == "__main__":
    main()
