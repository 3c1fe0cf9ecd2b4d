"""Streams of the accepted node only, after verification, vs streams of every node in the verifying pass.

Our step (the paper's) carries every tree node's stream tokens through the multi-stream (MSA)
layers in the pass that verifies the tree, although the next tree is drafted from the
accepted node's streams alone. The *split* step here verifies with the main stream only (T
rows in every layer), walks the tree, gathers the accepted path into place, and then runs the
accepted node's g stream tokens through the MSA layers as a causal block right after the
committed path (stream j at position node + j sees the prefix, the path and streams 1..j:
DESIGN.md rule 3). That is T + g rows in the MSA layers instead of T (1 + g), for a second
pass over their weights. Both steps are timed as the generator runs steps (compiled, a
steady loop after ``--context`` committed tokens), for a model directory and/or random-weight
Llamas, and both are checked to emit the same tokens and draft the same next tree.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python examples/perf/split_pass.py [--model DIR] [--sizes 30M,100M] [--trees "1;1,1;1,1,1"] [--repeats 15]
"""

from __future__ import annotations

import argparse
import functools

import mlx.core as mx
import numpy as np

import step_cost  # this folder's step builder (the script's folder is on sys.path)
from mlx_specstream.cache import KVCache
from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.models.base import Context
from mlx_specstream.sampling import SamplingParams, make_sampler
from mlx_specstream.streams import tree_plan
from mlx_specstream.testing import random_model
from mlx_specstream.tree import causal_mask, parse_tree_spec
from mlx_specstream.verify import accept, draft


def split_step(model, plan, sampler, tokens, offset, keys, values):
    """The generator's tree step (same inputs and outputs, :mod:`mlx_specstream.compiled`), with
    the streams run after acceptance for the accepted node only."""
    base, layers, start = model.base, model.base.layers, model.msa_start
    cache = [KVCache.view(k, v, offset) for k, v in zip(keys, values)]
    pos = plan.main_offsets + offset
    ctx = Context(pos, cache[0].attention_mask(plan.main_mask, plan.n_main), plan.n_main, base.rope_tables(pos))
    h = base.embed(tokens[None], pos)
    for i, layer in enumerate(layers):
        if i == start:
            inserted = h  # [1, T, h] main states where streams are inserted
        h = layer(h, ctx, cache[i])
    chosen = sampler(base.head(h)[0])
    best, path_tokens = accept(tokens, chosen, plan)
    bonus = chosen[best][None]
    if not plan.is_chain:
        for c in cache:
            c.gather(plan.paths_dev[best])
    depth = plan.depth_dev[best]
    committed = offset + depth + 1

    g = plan.num_streams
    x = model._insert_streams(inserted[:, best][:, None], np.zeros(1, dtype=np.int64), g)  # [1, g, h]
    cache = [KVCache.view(c.keys, c.values, committed) for c in cache]
    pos = mx.arange(g, dtype=mx.int32) + committed
    ctx = Context(pos, cache[0].attention_mask(mx.array(causal_mask(g)), g), 0, base.rope_tables(pos),
                  mx.ones((g, 1)))
    for i in range(start, len(layers)):
        x = layers[i](x, ctx, cache[i])
    drafts = draft(model, x[0], plan)
    info = mx.concatenate([depth[None], path_tokens, bonus])
    return (info, mx.concatenate([bonus, drafts]), committed,
            [c.keys for c in cache], [c.values for c in cache])


def compare(model, tree: str, context: int, repeats: int) -> dict:
    """Both steps of ``tree`` on the same inputs: their times (median seconds) and whether
    they emitted the same tokens and drafted the same next tree."""
    joint, step_args, nodes, msa_rows = step_cost.prepared_step(model, tree, context, True)
    plan = tree_plan(parse_tree_spec(tree), model.num_streams)
    split = mx.compile(functools.partial(split_step, model, plan, make_sampler(SamplingParams())),
                       inputs=model.state)
    ours, theirs = joint(*step_args), split(*step_args)
    same = all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(ours[:2], theirs[:2]))
    times = {name: step_cost.median_time(lambda fn=fn: mx.eval(fn(*step_args)), repeats)
             for name, fn in (("joint", joint), ("split", split))}
    return dict(nodes=nodes, joint_rows=msa_rows, split_rows=nodes + plan.num_streams, same=same, **times)


def report(name: str, model, trees: list[str], context: int, repeats: int) -> None:
    ar = step_cost.median_time(step_cost.step_runner(model, "ar", context)[0], repeats)
    print(f"\n## {name} (context {context}; AR step {ar * 1e3:.2f} ms)\n")
    print("| tree | nodes | MSA rows, joint | MSA rows, split | joint ms | split ms | split / joint | same output |")
    print("|---|---|---|---|---|---|---|---|")
    for tree in trees:
        if parse_tree_spec(tree).max_depth > model.num_streams:
            continue
        r = compare(model, tree, context, repeats)
        print(f"| {tree} | {r['nodes']} | {r['joint_rows']} | {r['split_rows']} | {r['joint'] * 1e3:.2f} | "
              f"{r['split'] * 1e3:.2f} | {r['split'] / r['joint']:.2f} | {'yes' if r['same'] else 'NO'} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="also time this model directory")
    ap.add_argument("--sizes", default="30M,100M", help="random-weight Llamas to time ('' for none)")
    ap.add_argument("--trees", default="1;1,1;1,1,1;1,1,1,1", help="';'-separated tree specs")
    ap.add_argument("--context", type=int, default=step_cost.CONTEXT)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    trees = args.trees.split(";")
    if args.model:
        from mlx_specstream import load

        report(args.model, load(args.model)[0], trees, args.context, args.repeats)
    for size in filter(None, args.sizes.split(",")):
        spec = SpecStreamConfig(num_streams=step_cost.GAMMA, num_msa_layers=step_cost.SIZES[size]["num_hidden_layers"] // 2)
        report(f"{size} random Llama", random_model(step_cost.config(size), spec, seed=0), trees, args.context, args.repeats)


if __name__ == "__main__":
    main()
